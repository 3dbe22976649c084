// Tokens as the user page and the tokens page both show them: a row, its actions, the mint form.
import { api } from '../api.js';
import { act, allowlistFrom, badge, cell, checkboxes, checkedValues, confirmAction, field, h, isoFromLocal, localFromIso, say, showSecret, time } from '../ui.js';

const BUILT_IN_SCOPES = ['bots:read', 'bots:write', 'tokens:read', 'tokens:write'];

export const TOKEN_COLUMNS = [
  { label: 'Name' },
  { label: 'Key' },
  { label: 'Scopes' },
  { label: 'Environment' },
  { label: 'Status' },
  { label: 'Last used' },
  { label: 'Expires' },
  { label: 'Rotation' },
  { hidden: 'Actions' },
];

export const tokenLabel = (t) => (t.name ? `\u201c${t.name}\u201d` : t.masked);

/** A token's row; `withUser` adds a link to its owner first (the tokens page). */
export function tokenRow(t, { writable, onEdit, onRotate, onRevoke, withUser = false }) {
  const label = t.name || t.masked;
  const actions = cell('', 'c-actions');
  if (writable && t.status === 'active') {
    const edit = h('button', { type: 'button', class: 'button small', 'aria-label': `Change ${label}` }, 'Change');
    edit.addEventListener('click', () => onEdit(edit));
    actions.appendChild(edit);
    if (t.rotated_to === null) {
      const rotate = h('button', { type: 'button', class: 'button small', 'aria-label': `Rotate ${label}` }, 'Rotate');
      rotate.addEventListener('click', () => onRotate(rotate));
      actions.appendChild(rotate);
    }
    const revoke = h('button', { type: 'button', class: 'button small danger', 'aria-label': `Revoke ${label}` }, 'Revoke');
    revoke.addEventListener('click', () => onRevoke(revoke));
    actions.appendChild(revoke);
  }
  const rotation = [];
  // Both tokens of a rotation belong to the same user: the link opens their page at the other one.
  const toToken = (id) => `#/users/${t.user_id}?focus=token-${id}`;
  if (t.rotated_from !== null) rotation.push(h('a', { href: toToken(t.rotated_from), class: 'rotation-link' }, `replaces #${t.rotated_from}`));
  if (t.rotated_to !== null) rotation.push(h('a', { href: toToken(t.rotated_to), class: 'rotation-link' }, `replaced by #${t.rotated_to}`));
  return h(
    'tr',
    { id: `token-${t.id}`, 'data-token-id': t.id },
    withUser ? cell('User', 'c-owner', h('a', { href: `#/users/${t.user_id}` }, `user ${t.user_id}`)) : null,
    cell('Name', t.name ? 'c-name' : 'c-name muted', t.name || '(unnamed)'),
    cell('Key', 'c-masked', h('code', {}, t.masked)),
    cell('Scopes', 'c-scopes', t.scopes.join(', '), t.allowed_ips ? h('div', { class: 'note' }, `from ${t.allowed_ips.join(', ')}`) : null),
    cell('Environment', 'c-env', t.environment),
    cell('Status', 'c-status', badge(t.status)),
    cell('Last used', 'c-used', t.last_used_at ? [time(t.last_used_at), t.last_used_ip ? h('div', { class: 'note' }, `from ${t.last_used_ip}`) : null] : 'Never'),
    cell('Expires', 'c-expires', t.status === 'revoked' ? ['Revoked ', time(t.revoked_at)] : time(t.expires_at, 'Never')),
    cell('Rotation', 'c-rotation', rotation),
    actions,
  );
}

/** The scope checkboxes plus a field for the deployment's own scopes (EXTRA_SCOPES). */
function scopeFields(current) {
  const extra = h('input', { type: 'text', name: 'extra-scopes', value: current.filter((s) => !BUILT_IN_SCOPES.includes(s)).join(' '), autocomplete: 'off', spellcheck: 'false' });
  return {
    nodes: [checkboxes('Scopes', 'scopes', BUILT_IN_SCOPES, current), field('More scopes', extra, 'Your deployment\u2019s own (EXTRA_SCOPES), separated by spaces.')],
    read: (root) => [...checkedValues(root, 'scopes'), ...extra.value.split(/[\s,]+/).filter((s) => s !== '')],
  };
}

export function mintTokenForm(user, done) {
  const name = h('input', { type: 'text', name: 'name', maxlength: 100, autocomplete: 'off' });
  const env = h('select', { name: 'environment' }, h('option', { value: 'live' }, 'live'), h('option', { value: 'test' }, 'test'));
  const expiry = h('select', { name: 'expiry' }, [['never', 'Never'], ['604800', 'In 7 days'], ['2592000', 'In 30 days'], ['7776000', 'In 90 days'], ['31536000', 'In a year']].map(([v, l]) => h('option', { value: v }, l)));
  const ips = h('textarea', { name: 'allowed_ips', rows: 2, autocomplete: 'off', spellcheck: 'false' });
  const scopes = scopeFields(['bots:read', 'bots:write']);
  const submit = h('button', { type: 'submit', class: 'button primary' }, 'Mint token');
  const form = h(
    'form',
    { novalidate: true, id: 'mint-token-form' },
    h('div', { class: 'grid' }, field('Token name', name, 'So the owner can tell keys apart.'), field('Environment', env), field('Expires', expiry)),
    scopes.nodes,
    field('Allowed addresses', ips, 'Addresses or CIDR ranges, one per line. Empty: from anywhere.'),
    submit,
  );
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const body = { scopes: scopes.read(form), environment: env.value };
    if (name.value.trim()) body.name = name.value.trim();
    if (expiry.value !== 'never') body.expires_in = Number(expiry.value);
    const allowed = allowlistFrom(ips.value);
    if (allowed) body.allowed_ips = allowed;
    const minted = await act(submit, () => api('POST', `admin/users/${user.id}/tokens`, body));
    if (!minted) return;
    say(`Token ${tokenLabel(minted)} minted for ${user.email}.`);
    await done();
    showSecret(minted, `The new token ${tokenLabel(minted)} for ${user.email}`);
  });
  return h('div', { class: 'subpanel' }, h('h3', { id: 'mint-title' }, 'Mint a token'), form);
}

export async function editTokenDialog(t, button, done) {
  const name = h('input', { type: 'text', name: 'name', maxlength: 100, value: t.name || '', autocomplete: 'off' });
  const ips = h('textarea', { name: 'allowed_ips', rows: 2, spellcheck: 'false' }, (t.allowed_ips || []).join('\n'));
  const expires = h('input', { type: 'datetime-local', name: 'expires_at', value: localFromIso(t.expires_at) });
  const scopes = scopeFields(t.scopes);
  const fields = h('div', { class: 'dialog-fields' }, field('Token name', name), scopes.nodes, field('Allowed addresses', ips, 'One per line; empty: from anywhere.'), field('Expires', expires, 'Empty: never (within MAX_TOKEN_LIFETIME).'));
  if (!(await confirmAction(`Change ${tokenLabel(t)}`, `The token ${t.masked} keeps its secret; these take effect on its next request.`, 'Save', fields))) return;
  const body = {};
  const newName = name.value.trim() === '' ? null : name.value.trim();
  if (newName !== t.name) body.name = newName;
  const newScopes = scopes.read(fields);
  if ([...newScopes].sort().join(' ') !== [...t.scopes].sort().join(' ')) body.scopes = newScopes;
  const allowed = allowlistFrom(ips.value);
  if (JSON.stringify(allowed) !== JSON.stringify(t.allowed_ips)) body.allowed_ips = allowed;
  const at = isoFromLocal(expires.value) ?? null;
  if ((at === null) !== (t.expires_at === null) || (at !== null && localFromIso(at) !== localFromIso(t.expires_at))) body.expires_at = at;
  if (Object.keys(body).length === 0) return say('Nothing changed.');
  if (await act(button, () => api('PATCH', `admin/tokens/${t.id}`, body))) {
    say(`Token ${tokenLabel(t)} changed.`);
    await done();
  }
}

export async function rotateToken(t, button, done) {
  const grace = h('select', { name: 'grace' }, [['86400', 'One day (default)'], ['3600', 'One hour'], ['604800', 'Seven days'], ['0', 'None: stop it now']].map(([v, l]) => h('option', { value: v }, l)));
  const ok = await confirmAction(
    `Rotate ${tokenLabel(t)}?`,
    'A new token replaces it with the same name, scopes, environment and allowlist. The old one keeps working for the grace period, then stops.',
    'Rotate',
    field('Grace period for the old token', grace),
  );
  if (!ok) return;
  const minted = await act(button, () => api('POST', `admin/tokens/${t.id}/rotate`, { grace_period_seconds: Number(grace.value) }));
  if (!minted) return;
  say(`Token ${tokenLabel(t)} rotated.`);
  await done();
  showSecret(minted, `The token replacing ${tokenLabel(t)}`);
}

export async function revokeToken(t, button, done) {
  if (!(await confirmAction(`Revoke ${tokenLabel(t)}?`, `The token ${t.masked} stops working now (401 API_KEY_REVOKED). This cannot be undone.`, 'Revoke'))) return;
  if ((await act(button, () => api('DELETE', `admin/tokens/${t.id}`))) === undefined) return;
  say(`Token ${tokenLabel(t)} revoked.`);
  await done();
}
