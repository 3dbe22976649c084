// Named admin keys: for scripts that need part of the admin API. The console lists, mints and
// revokes them; the secret is shown once, like a user's token.
import { api, listAll } from '../api.js';
import { act, badge, cell, checkboxes, checkedValues, confirmAction, field, h, lacks, say, showSecret, table, time } from '../ui.js';

let adminScopes;
/** The admin scopes as the contract lists them (AdminScopes in /openapi.json), read once. */
async function scopeCatalog() {
  if (!adminScopes) {
    const res = await fetch(new URL('../../../openapi.json', import.meta.url), { cache: 'no-store' });
    const doc = await res.json();
    adminScopes = doc.components.schemas.AdminScopes.items.enum;
  }
  return adminScopes;
}

export async function adminKeysView(ctx) {
  const keys = await listAll('admin/admin-keys');
  const writable = ctx.can('admin-keys:write');
  keys.sort((a, b) => (a.status === 'active' ? 0 : 1) - (b.status === 'active' ? 0 : 1) || b.id - a.id);
  const rows = keys.map((k) => {
    const revoke = writable && k.status === 'active' ? h('button', { type: 'button', class: 'button small danger', 'aria-label': `Revoke ${k.name}` }, 'Revoke') : null;
    revoke?.addEventListener('click', async () => {
      if (!(await confirmAction(`Revoke the admin key \u201c${k.name}\u201d?`, `The key ${k.masked} stops working now. Scripts that use it get 401 ADMIN_KEY_REVOKED.`, 'Revoke'))) return;
      if ((await act(revoke, () => api('DELETE', `admin/admin-keys/${k.id}`))) === undefined) return;
      say(`Admin key \u201c${k.name}\u201d revoked.`);
      ctx.rerender();
    });
    return h(
      'tr',
      { 'data-admin-key-id': k.id },
      cell('Name', 'c-name', k.name),
      cell('Key', 'c-masked', h('code', {}, k.masked)),
      cell('Scopes', 'c-scopes', k.scopes.join(', ')),
      cell('Status', 'c-status', badge(k.status)),
      cell('Created', 'c-created', time(k.created_at), h('div', { class: 'note' }, `by ${k.created_by}`)),
      cell('Last used', 'c-used', time(k.last_used_at, 'Never')),
      cell('Expires', 'c-expires', k.status === 'revoked' ? ['Revoked ', time(k.revoked_at)] : time(k.expires_at, 'Never')),
      cell('', 'c-actions', revoke),
    );
  });
  return h(
    'div',
    {},
    h(
      'section',
      { class: 'panel', 'aria-labelledby': 'admin-keys-title' },
      h('h2', { id: 'admin-keys-title' }, 'Admin keys'),
      keys.length === 0
        ? h('p', { class: 'empty' }, 'No admin keys yet.')
        : table('Admin keys', [{ label: 'Name' }, { label: 'Key' }, { label: 'Scopes' }, { label: 'Status' }, { label: 'Created' }, { label: 'Last used' }, { label: 'Expires' }, { hidden: 'Actions' }], rows),
    ),
    writable ? await mintForm(ctx) : h('section', { class: 'panel' }, lacks('admin-keys:write', 'mint or revoke admin keys')),
  );
}

async function mintForm(ctx) {
  const name = h('input', { type: 'text', name: 'name', maxlength: 100, required: true, autocomplete: 'off' });
  const expiry = h('select', { name: 'expiry' }, [['never', 'Never'], ['2592000', 'In 30 days'], ['7776000', 'In 90 days'], ['31536000', 'In a year']].map(([v, l]) => h('option', { value: v }, l)));
  const submit = h('button', { type: 'submit', class: 'button primary' }, 'Mint admin key');
  const form = h(
    'form',
    { novalidate: true, id: 'mint-admin-key-form' },
    h('div', { class: 'grid' }, field('Key name', name, 'What the key is for, e.g. billing-sync.'), field('Expires', expiry)),
    checkboxes('Scopes', 'admin-scopes', await scopeCatalog(), []),
    submit,
  );
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const body = { name: name.value.trim(), scopes: checkedValues(form, 'admin-scopes') };
    if (expiry.value !== 'never') body.expires_in = Number(expiry.value);
    const minted = await act(submit, () => api('POST', 'admin/admin-keys', body));
    if (!minted) return;
    await ctx.rerender();
    say(`Admin key \u201c${minted.name}\u201d minted.`);
    showSecret({ ...minted, token: minted.key }, `The new admin key \u201c${minted.name}\u201d`);
  });
  return h('section', { class: 'panel', 'aria-labelledby': 'new-admin-key-title' }, h('h2', { id: 'new-admin-key-title' }, 'New admin key'), form);
}
