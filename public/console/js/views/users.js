// Users: a search by email, a page of users at a time, and a form to create one.
import { api, withQuery } from '../api.js';
import { act, badge, cell, field, h, lacks, numberText, table, time } from '../ui.js';

const PAGE = 25;
// The cursors of the pages before this one, so "Previous" works without the server keeping state.
let earlier = [];

export async function usersView(ctx) {
  const email = ctx.query.get('email') || '';
  const cursor = ctx.query.get('cursor') || undefined;
  if (!cursor) earlier = [];
  const list = await api('GET', withQuery('admin/users', { limit: PAGE, email, cursor }));
  const users = list.data;
  // A column only when some user on the page has one.
  const hasExternalId = users.some((u) => u.external_id);

  const search = h('input', { type: 'search', name: 'email', value: email, maxlength: 254, autocomplete: 'off' });
  const searchForm = h(
    'form',
    { class: 'inline-form', role: 'search', onsubmit: (e) => (e.preventDefault(), ctx.navigate('users', { email: search.value.trim() })) },
    field('Search by email', search),
    h('button', { type: 'submit', class: 'button' }, 'Search'),
    email ? h('a', { href: '#/users', class: 'button' }, 'Show all') : null,
  );

  const columns = [
    { label: 'Email' },
    { label: 'Name' },
    hasExternalId ? { label: 'External id' } : null,
    { label: 'Bots' },
    { label: 'Rate limit' },
    { label: 'Credits' },
    { label: 'Status' },
    { label: 'Created' },
  ].filter(Boolean);
  const rows = users.map((u) =>
    h(
      'tr',
      { 'data-user-id': u.id },
      cell('Email', 'c-name', h('a', { href: `#/users/${u.id}` }, u.email)),
      cell('Name', 'c-user-name', u.name || ''),
      hasExternalId ? cell('External id', 'c-external-id', u.external_id || '') : null,
      cell('Bots', 'c-bots', `${u.active_bots} of ${u.max_concurrent_bots}`),
      cell('Rate limit', 'c-rate', `${numberText(u.rate_limit_per_minute)}/min`),
      cell('Credits', 'c-credits', numberText(u.credits)),
      cell('Status', 'c-status', badge(u.disabled ? 'disabled' : 'active')),
      cell('Created', 'c-created', time(u.created_at)),
    ),
  );

  const next = list.meta.next_cursor;
  const pager = h(
    'div',
    { class: 'pager' },
    earlier.length > 0 || cursor
      ? h('button', { type: 'button', class: 'button small', onclick: () => ctx.navigate('users', { email, cursor: earlier.pop() }) }, 'Previous page')
      : null,
    next ? h('button', { type: 'button', class: 'button small', onclick: () => (earlier.push(cursor || ''), ctx.navigate('users', { email, cursor: next })) }, 'Next page') : null,
  );

  return h(
    'div',
    {},
    h(
      'section',
      { class: 'panel', 'aria-labelledby': 'users-title' },
      h('div', { class: 'section-head' }, h('h2', { id: 'users-title' }, 'Users')),
      searchForm,
      users.length === 0 ? h('p', { class: 'empty' }, email ? `No user's email contains \u201c${email}\u201d.` : 'There are no users yet.') : table('Users', columns, rows),
      pager,
    ),
    ctx.can('users:write') ? createUserForm(ctx) : h('section', { class: 'panel' }, lacks('users:write', 'create users')),
  );
}

function createUserForm(ctx) {
  const email = h('input', { type: 'email', name: 'email', required: true, maxlength: 254, autocomplete: 'off' });
  const name = h('input', { type: 'text', name: 'name', maxlength: 200, autocomplete: 'off' });
  const externalId = h('input', { type: 'text', name: 'external_id', maxlength: 256, autocomplete: 'off', spellcheck: 'false' });
  const bots = h('input', { type: 'number', name: 'max_concurrent_bots', min: 0, max: 100000, step: 1, inputmode: 'numeric' });
  const rate = h('input', { type: 'number', name: 'rate_limit_per_minute', min: 0, max: 1000000, step: 1, inputmode: 'numeric' });
  const credits = h('input', { type: 'number', name: 'credits', min: 0, step: 1, inputmode: 'numeric' });
  const submit = h('button', { type: 'submit', class: 'button primary' }, 'Create user');
  const form = h(
    'form',
    { novalidate: true, id: 'create-user-form' },
    h('div', { class: 'grid' }, field('Email', email), field('Name', name, 'Optional.'), field('External id', externalId, 'Your platform\u2019s id for the account. Optional.'), field('Concurrent bots', bots, 'Default 3.'), field('Rate limit per minute', rate, 'Default: the server\u2019s.'), field('Credits', credits, 'Default 0.')),
    submit,
  );
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const body = { email: email.value.trim() };
    if (name.value.trim()) body.name = name.value.trim();
    if (externalId.value.trim()) body.external_id = externalId.value.trim();
    for (const input of [bots, rate, credits]) if (input.value !== '') body[input.name] = Number(input.value);
    const user = await act(submit, () => api('POST', 'admin/users', body));
    if (user) ctx.navigate(`users/${user.id}`, undefined, `User ${user.email} created.`);
  });
  return h('section', { class: 'panel', 'aria-labelledby': 'new-user-title' }, h('h2', { id: 'new-user-title' }, 'New user'), form);
}
