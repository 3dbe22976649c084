// One user: their details and limits, their tokens, their bots, their usage and their history.
import { api, listAll, withQuery } from '../api.js';
import { act, append, badge, cell, confirmAction, field, h, lacks, numberText, say, showError, table, time } from '../ui.js';
import { editTokenDialog, mintTokenForm, rotateToken, revokeToken, tokenRow, TOKEN_COLUMNS } from './token-parts.js';
import { usageChart } from './usage-chart.js';
import { auditTable } from './audit.js';

export async function userView(ctx, id) {
  const user = await api('GET', `admin/users/${id}`);
  const label = user.name ? `${user.name} (${user.email})` : user.email;
  const sections = [
    h('p', { class: 'crumbs' }, h('a', { href: '#/users' }, '\u2190 All users')),
    detailsSection(ctx, user, label),
    ctx.can('tokens:read') ? tokensSection(ctx, user) : h('section', { class: 'panel' }, h('h2', {}, 'Tokens'), lacks('tokens:read', 'see this user\u2019s tokens')),
    ctx.can('bots:read') ? botsSection(ctx, user) : null,
    ctx.can('usage:read') ? usageSection(user) : null,
    ctx.can('audit:read') ? historySection(user) : null,
  ];
  const settled = await Promise.all(sections);
  return h('div', { class: 'user-page' }, settled);
}

// ---- details --------------------------------------------------------------------------------------

function detailsSection(ctx, user, label) {
  const facts = h(
    'dl',
    { class: 'facts' },
    fact('Email', user.email),
    fact('External id', user.external_id || '\u2014'),
    fact('Status', badge(user.disabled ? 'disabled' : 'active'), user.disabled ? [' since ', time(user.disabled_at)] : null),
    fact('Bots running', `${user.active_bots} of ${user.max_concurrent_bots}`),
    fact('Rate limit', `${numberText(user.rate_limit_per_minute)} requests a minute`),
    fact('Credits', numberText(user.credits)),
    fact('SSO identity', user.sso_subject || '\u2014'),
    fact('Created', time(user.created_at)),
  );
  const head = h('div', { class: 'section-head' }, h('h2', { id: 'user-title' }, label));
  if (!ctx.can('users:write')) return h('section', { class: 'panel', 'aria-labelledby': 'user-title' }, head, facts, lacks('users:write', 'change or delete this user'));

  const name = h('input', { type: 'text', name: 'name', maxlength: 200, value: user.name || '', autocomplete: 'off' });
  const externalId = h('input', { type: 'text', name: 'external_id', maxlength: 256, value: user.external_id || '', autocomplete: 'off', spellcheck: 'false' });
  const bots = h('input', { type: 'number', name: 'max_concurrent_bots', min: 0, max: 100000, step: 1, value: String(user.max_concurrent_bots) });
  const rate = h('input', { type: 'number', name: 'rate_limit_per_minute', min: 0, max: 1000000, step: 1, value: String(user.rate_limit_per_minute) });
  const credits = h('input', { type: 'number', name: 'credits', min: 0, step: 1, value: String(user.credits) });
  const save = h('button', { type: 'submit', class: 'button primary' }, 'Save changes');
  const form = h(
    'form',
    { novalidate: true, id: 'edit-user-form' },
    h('div', { class: 'grid' }, field('Name', name), field('External id', externalId), field('Concurrent bots', bots), field('Rate limit per minute', rate), field('Credits', credits, 'Sets the balance.')),
    save,
  );
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const body = {};
    const newName = name.value.trim() === '' ? null : name.value.trim();
    if (newName !== user.name) body.name = newName;
    const newExternalId = externalId.value.trim() === '' ? null : externalId.value.trim();
    if (newExternalId !== user.external_id) body.external_id = newExternalId;
    for (const input of [bots, rate, credits]) {
      if (input.value !== '' && Number(input.value) !== user[input.name]) body[input.name] = Number(input.value);
    }
    if (Object.keys(body).length === 0) return say('Nothing changed.');
    if (await act(save, () => api('PATCH', `admin/users/${user.id}`, body))) {
      say(`Saved ${user.email}.`);
      ctx.rerender();
    }
  });

  const toggle = h('button', { type: 'button', class: user.disabled ? 'button' : 'button danger' }, user.disabled ? 'Enable user' : 'Disable user');
  toggle.addEventListener('click', async () => {
    const disabling = !user.disabled;
    if (disabling && !(await confirmAction(`Disable ${user.email}?`, 'Every one of their keys is refused (403 USER_DISABLED) until you enable them again. Nothing is deleted.', 'Disable'))) return;
    if (await act(toggle, () => api('PATCH', `admin/users/${user.id}`, { disabled: disabling }))) {
      say(`${user.email} ${disabling ? 'disabled' : 'enabled'}.`);
      ctx.rerender();
    }
  });
  const remove = h('button', { type: 'button', class: 'button danger' }, 'Delete user');
  remove.addEventListener('click', async () => {
    const ok = await confirmAction(
      `Delete ${user.email}?`,
      `${label} disappears and every one of their keys stops working now (401 API_KEY_REVOKED). This cannot be undone.`,
      `Delete ${user.email}`,
    );
    if (ok && (await act(remove, () => api('DELETE', `admin/users/${user.id}`))) !== undefined) {
      ctx.navigate('users', undefined, `User ${user.email} deleted.`);
    }
  });
  return h(
    'section',
    { class: 'panel', 'aria-labelledby': 'user-title' },
    head,
    facts,
    h('h3', {}, 'Change'),
    form,
    h('div', { class: 'actions-row' }, toggle, remove),
  );
}

function fact(term, ...value) {
  return h('div', {}, h('dt', {}, term), h('dd', {}, ...value));
}

// ---- tokens ---------------------------------------------------------------------------------------

async function tokensSection(ctx, user) {
  const tokens = await listAll('admin/tokens', { user_id: user.id });
  const writable = ctx.can('tokens:write');
  const refresh = () => ctx.rerender();
  // Newest first, working keys before revoked and expired ones.
  tokens.sort((a, b) => (a.status === 'active' ? 0 : 1) - (b.status === 'active' ? 0 : 1) || b.id - a.id);
  const rows = tokens.map((t) =>
    tokenRow(t, {
      writable,
      onEdit: (button) => editTokenDialog(t, button, refresh),
      onRotate: (button) => rotateToken(t, button, refresh),
      onRevoke: (button) => revokeToken(t, button, refresh),
    }),
  );
  return h(
    'section',
    { class: 'panel', 'aria-labelledby': 'tokens-title' },
    h('h2', { id: 'tokens-title' }, 'Tokens'),
    tokens.length === 0 ? h('p', { class: 'empty', id: 'tokens-empty' }, 'This user has no tokens yet.') : table(`Tokens of ${user.email}`, TOKEN_COLUMNS, rows),
    writable ? mintTokenForm(user, refresh) : lacks('tokens:write', 'mint, change, rotate or revoke tokens'),
  );
}

// ---- bots -----------------------------------------------------------------------------------------

async function botsSection(ctx, user) {
  const bots = await listAll(`admin/users/${user.id}/bots`, { status: 'active' });
  const rows = bots.map((b) => {
    const release = ctx.can('bots:write') ? h('button', { type: 'button', class: 'button small danger', 'aria-label': `Force-release bot ${b.id}` }, 'Force-release') : null;
    release?.addEventListener('click', async () => {
      const ok = await confirmAction(`Force-release bot ${b.id}?`, `${user.email} gets the slot back now; whatever holds the bot is told it ended (ended_by admin).`, 'Force-release');
      if (ok && (await act(release, () => api('DELETE', `admin/bots/${b.id}`))) !== undefined) {
        say(`Bot ${b.id} released.`);
        ctx.rerender();
      }
    });
    return h(
      'tr',
      { 'data-bot-id': b.id },
      cell('Bot', 'c-name', String(b.id)),
      cell('Label', '', b.label || b.native_meeting_id || ''),
      cell('Platform', '', b.platform || ''),
      cell('Started', '', time(b.created_at)),
      cell('Lease until', '', time(b.expires_at)),
      cell('', 'c-actions', release),
    );
  });
  return h(
    'section',
    { class: 'panel', 'aria-labelledby': 'bots-title' },
    h('h2', { id: 'bots-title' }, `Bots running (${bots.length} of ${user.max_concurrent_bots})`),
    bots.length === 0 ? h('p', { class: 'empty' }, 'No bots are running.') : table('Running bots', [{ label: 'Bot' }, { label: 'Label' }, { label: 'Platform' }, { label: 'Started' }, { label: 'Lease until' }, { hidden: 'Actions' }], rows),
    ctx.can('bots:write') ? null : lacks('bots:write', 'force-release bots'),
  );
}

// ---- usage ----------------------------------------------------------------------------------------

async function usageSection(user) {
  const usage = await api('GET', `admin/users/${user.id}/usage`);
  return h(
    'section',
    { class: 'panel', 'aria-labelledby': 'usage-title' },
    h('h2', { id: 'usage-title' }, 'Usage, last 30 days'),
    h('p', { class: 'note' }, `${numberText(usage.totals.requests)} requests and ${numberText(usage.totals.bot_minutes)} bot-minutes from ${usage.from} to ${usage.to} (UTC days).`),
    usageChart(usage),
  );
}

// ---- history --------------------------------------------------------------------------------------

async function historySection(user) {
  const section = h('section', { class: 'panel', 'aria-labelledby': 'history-title' }, h('h2', { id: 'history-title' }, 'History'));
  const body = h('div', {});
  section.appendChild(body);
  const load = async (cursor) => {
    const page = await api('GET', withQuery(`admin/users/${user.id}/audit`, { limit: 20, cursor }));
    const more = page.meta.next_cursor ? h('button', { type: 'button', class: 'button small' }, 'Older entries') : null;
    more?.addEventListener('click', () => act(more, async () => (more.remove(), append(body, [await load(page.meta.next_cursor)]))));
    return h('div', {}, page.data.length === 0 && !cursor ? h('p', { class: 'empty' }, 'Nothing recorded yet.') : auditTable(page.data), more);
  };
  try {
    body.appendChild(await load());
  } catch (err) {
    showError(err);
  }
  return section;
}
