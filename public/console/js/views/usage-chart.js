// A user's requests and bot-minutes per UTC day, drawn as two bar charts (SVG, no library: two
// series of at most 31 bars), with each day's numbers on hover and in a table beside them.
import { h, numberText, svg } from '../ui.js';

const WIDTH = 620;
const HEIGHT = 150;
const LEFT = 48;
const BOTTOM = 22;

/** Every UTC day from `from` to `to` (YYYY-MM-DD), with the days the API reported filled in. */
export function everyDay(usage) {
  const reported = new Map(usage.days.map((d) => [d.day, d]));
  const days = [];
  for (let t = Date.parse(`${usage.from}T00:00:00Z`); t <= Date.parse(`${usage.to}T00:00:00Z`); t += 86_400_000) {
    const day = new Date(t).toISOString().slice(0, 10);
    const d = reported.get(day);
    days.push({ day, requests: d ? d.requests : 0, bot_minutes: d ? d.bot_minutes : 0 });
  }
  return days;
}

function bars(days, key, title, cls, readout) {
  const most = Math.max(0, ...days.map((d) => d[key]));
  const max = Math.max(1, most);
  const plotW = WIDTH - LEFT - 4;
  const plotH = HEIGHT - BOTTOM - 8;
  const step = plotW / days.length;
  const chart = svg(
    'svg',
    { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: `chart ${cls}`, role: 'img', 'aria-label': `${title} per day: at most ${numberText(most)} in a day` },
    svg('line', { x1: LEFT, y1: 8 + plotH, x2: WIDTH - 4, y2: 8 + plotH, class: 'axis' }),
    svg('text', { x: LEFT - 6, y: 14, class: 'tick', 'text-anchor': 'end' }, numberText(max)),
    svg('text', { x: LEFT - 6, y: 8 + plotH, class: 'tick', 'text-anchor': 'end' }, '0'),
    svg('text', { x: LEFT, y: HEIGHT - 4, class: 'tick' }, days[0].day.slice(5)),
    svg('text', { x: WIDTH - 4, y: HEIGHT - 4, class: 'tick', 'text-anchor': 'end' }, days[days.length - 1].day.slice(5)),
  );
  days.forEach((d, i) => {
    const value = d[key];
    const barH = (value / max) * plotH;
    const text = `${d.day}: ${numberText(value)} ${title.toLowerCase()}`;
    // A full-height hit area per day, so a day with nothing still answers the pointer.
    const group = svg(
      'g',
      { class: 'day', 'data-day': d.day, 'data-value': value },
      svg('title', {}, text),
      svg('rect', { x: LEFT + i * step, y: 8, width: step, height: plotH, class: 'hit' }),
      svg('rect', { x: LEFT + i * step + step * 0.15, y: 8 + plotH - barH, width: step * 0.7, height: Math.max(barH, value > 0 ? 1 : 0), class: 'bar' }),
    );
    group.addEventListener('mouseenter', () => (readout.textContent = text));
    chart.appendChild(group);
  });
  return h('figure', { class: 'chart-figure' }, h('figcaption', {}, title), chart);
}

export function usageChart(usage) {
  const days = everyDay(usage);
  const readout = h('p', { class: 'chart-readout note', 'aria-live': 'polite' }, 'Point at a day to see its numbers.');
  const rows = days
    .slice()
    .reverse()
    .map((d) => h('tr', { 'data-day': d.day }, h('th', { scope: 'row' }, d.day), h('td', { class: 'num c-requests' }, numberText(d.requests)), h('td', { class: 'num c-bot-minutes' }, numberText(d.bot_minutes))));
  return h(
    'div',
    { class: 'usage' },
    h('div', { class: 'usage-charts' }, bars(days, 'requests', 'Requests', 'chart-requests', readout), bars(days, 'bot_minutes', 'Bot-minutes', 'chart-bot-minutes', readout), readout),
    h(
      'div',
      { class: 'usage-table table-wrap', tabindex: 0, role: 'region', 'aria-label': 'Usage by day' },
      h('table', { class: 'numbers' }, h('caption', {}, 'By day (UTC), newest first'), h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Day'), h('th', { scope: 'col' }, 'Requests'), h('th', { scope: 'col' }, 'Bot-minutes'))), h('tbody', {}, rows)),
    ),
  );
}
