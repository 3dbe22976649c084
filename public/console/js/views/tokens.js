// Every user's tokens, by status and environment, with the two questions admins ask most as
// ready-made filters: which keys were never used, and which expire within a week.
import { api, withQuery } from '../api.js';
import { field, h, table } from '../ui.js';
import { editTokenDialog, revokeToken, rotateToken, tokenRow, TOKEN_COLUMNS } from './token-parts.js';

const WEEK = 7 * 86_400_000;
const READY_MADE = {
  unused: { label: 'Never used', query: () => ({ status: 'active', never_used: 'true' }) },
  expiring: { label: 'Expiring within 7 days', query: () => ({ status: 'active', expires_before: new Date(Date.now() + WEEK).toISOString() }) },
};

export async function tokensView(ctx) {
  const q = ctx.query;
  const preset = READY_MADE[q.get('filter') || ''];
  const filters = preset ? preset.query() : { status: q.get('status') || '', environment: q.get('environment') || '' };
  const cursor = q.get('cursor') || undefined;
  const list = await api('GET', withQuery('admin/tokens', { ...filters, limit: 50, cursor }));

  const status = h('select', { name: 'status' }, ['', 'active', 'expired', 'revoked'].map((v) => h('option', { value: v }, v || 'any')));
  const env = h('select', { name: 'environment' }, ['', 'live', 'test'].map((v) => h('option', { value: v }, v || 'any')));
  status.value = preset ? '' : filters.status;
  env.value = preset ? '' : filters.environment;
  const form = h(
    'form',
    { class: 'inline-form', id: 'token-filters', onsubmit: (e) => (e.preventDefault(), ctx.navigate('tokens', { status: status.value, environment: env.value })) },
    field('Status', status),
    field('Environment', env),
    h('button', { type: 'submit', class: 'button' }, 'Filter'),
  );
  const presets = h(
    'p',
    { class: 'presets' },
    'Ready-made: ',
    Object.entries(READY_MADE).map(([key, p]) => h('a', { href: `#/tokens?filter=${key}`, class: 'button small', 'aria-current': preset === p ? 'true' : undefined }, p.label)),
    preset || filters.status || filters.environment ? h('a', { href: '#/tokens', class: 'button small' }, 'All tokens') : null,
  );
  const refresh = () => ctx.rerender();
  const writable = ctx.can('tokens:write');
  const rows = list.data.map((t) =>
    tokenRow(t, {
      withUser: true,
      writable,
      onEdit: (b) => editTokenDialog(t, b, refresh),
      onRotate: (b) => rotateToken(t, b, refresh),
      onRevoke: (b) => revokeToken(t, b, refresh),
    }),
  );
  const next = list.meta.next_cursor;
  const here = preset ? { filter: q.get('filter') } : { status: filters.status, environment: filters.environment };
  return h(
    'section',
    { class: 'panel', 'aria-labelledby': 'all-tokens-title' },
    h('h2', { id: 'all-tokens-title' }, preset ? `Tokens: ${preset.label.toLowerCase()}` : 'Tokens'),
    form,
    presets,
    list.data.length === 0 ? h('p', { class: 'empty', id: 'tokens-empty' }, 'No token matches.') : table('Tokens', [{ label: 'User' }, ...TOKEN_COLUMNS], rows),
    h(
      'div',
      { class: 'pager' },
      cursor ? h('a', { href: `#${withQuery('/tokens', here)}`, class: 'button small' }, 'First page') : null,
      next ? h('a', { href: `#${withQuery('/tokens', { ...here, cursor: next })}`, class: 'button small' }, 'Next page') : null,
    ),
  );
}
