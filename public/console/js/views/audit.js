// The audit log, newest first, with the API's filters: actor, action family, target, time range.
import { api, withQuery } from '../api.js';
import { cell, field, h, isoFromLocal, localFromIso, table, time } from '../ui.js';

const FAMILIES = [
  ['', 'any'],
  ['user.*', 'users (user.*)'],
  ['token.*', 'tokens (token.*)'],
  ['bot.*', 'bots (bot.*)'],
  ['admin_key.*', 'admin keys (admin_key.*)'],
  ['auth.*', 'failed sign-ins (auth.*)'],
];

function actorText(a) {
  if (a.type === 'sso') return `${a.email || a.id} (signed in)`;
  if (a.type === 'admin_key') return `admin key ${a.name ? `\u201c${a.name}\u201d` : a.id}`;
  if (a.type === 'key') return `user ${a.user_id}'s key ${a.token_id}`;
  if (a.type === 'admin') return `root admin key (${a.id})`;
  return a.type;
}

function targetCell(t) {
  if (!t) return '';
  if (t.type === 'user') return h('a', { href: `#/users/${t.id}` }, `user ${t.id}`);
  if (t.user_id) return [`${t.type} ${t.id} of `, h('a', { href: `#/users/${t.user_id}` }, `user ${t.user_id}`)];
  return `${t.type} ${t.id}`;
}

/** Entries as a table (the audit page and a user's history). */
export function auditTable(entries) {
  const rows = entries.map((e) =>
    h(
      'tr',
      { 'data-audit-id': e.id },
      cell('When', 'c-when', time(e.at)),
      cell('Action', 'c-action', h('code', {}, e.action)),
      cell('Who', 'c-actor', actorText(e.actor)),
      cell('Target', 'c-target', targetCell(e.target)),
      cell('From', 'c-ip', e.ip || ''),
      cell('Details', 'c-details', e.details ? h('code', { class: 'details' }, JSON.stringify(e.details)) : ''),
    ),
  );
  return table('Audit entries', [{ label: 'When' }, { label: 'Action' }, { label: 'Who' }, { label: 'Target' }, { label: 'From' }, { label: 'Details' }], rows);
}

export async function auditView(ctx) {
  const q = ctx.query;
  const filters = { actor: q.get('actor') || '', action: q.get('action') || '', target: q.get('target') || '', since: q.get('since') || '', until: q.get('until') || '' };
  const cursor = q.get('cursor') || undefined;
  const page = await api('GET', withQuery('admin/audit', { ...filters, limit: 50, cursor }));

  const actor = h('input', { type: 'text', name: 'actor', value: filters.actor, autocomplete: 'off', spellcheck: 'false' });
  const action = h('select', { name: 'action' }, FAMILIES.map(([v, l]) => h('option', { value: v }, l)));
  // An exact action from a link (token.revoked) is offered beside the families.
  if (!FAMILIES.some(([v]) => v === filters.action)) action.appendChild(h('option', { value: filters.action }, filters.action));
  action.value = filters.action;
  const target = h('input', { type: 'text', name: 'target', value: filters.target, autocomplete: 'off', spellcheck: 'false', placeholder: 'token:12' });
  const since = h('input', { type: 'datetime-local', name: 'since', value: localFromIso(filters.since) });
  const until = h('input', { type: 'datetime-local', name: 'until', value: localFromIso(filters.until) });
  const form = h(
    'form',
    { class: 'inline-form wrap-form', id: 'audit-filters' },
    field('Who', actor, 'admin, sso, user:12, admin_key:3…'),
    field('Action', action),
    field('Target', target, 'user:12, token:34 or bot:56'),
    field('From', since),
    field('Until', until),
    h('button', { type: 'submit', class: 'button' }, 'Filter'),
  );
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    ctx.navigate('audit', { actor: actor.value.trim(), action: action.value, target: target.value.trim(), since: isoFromLocal(since.value), until: isoFromLocal(until.value) });
  });
  const next = page.meta.next_cursor;
  return h(
    'section',
    { class: 'panel', 'aria-labelledby': 'audit-title' },
    h('h2', { id: 'audit-title' }, 'Audit log'),
    form,
    Object.values(filters).some((v) => v) ? h('p', {}, h('a', { href: '#/audit', class: 'button small' }, 'Clear filters')) : null,
    page.data.length === 0 ? h('p', { class: 'empty', id: 'audit-empty' }, 'No entry matches.') : auditTable(page.data),
    h(
      'div',
      { class: 'pager' },
      cursor ? h('a', { href: `#${withQuery('/audit', filters)}`, class: 'button small' }, 'Newest entries') : null,
      next ? h('a', { href: `#${withQuery('/audit', { ...filters, cursor: next })}`, class: 'button small' }, 'Older entries') : null,
    ),
  );
}
