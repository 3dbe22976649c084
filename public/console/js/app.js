// keyward's admin console: a page over the /admin API for people in SSO_ADMIN_GROUPS, signed in
// through the sign-in proxy. It holds no admin key: every call carries the proxy's identity, and
// keyward checks the person's scopes (SSO_ADMIN_SCOPES) on each one. Served under keyward's CSP.
import { api, ApiError, credential, proxyUserInfo } from './api.js';
import { append, clearError, h, hideSecret, say, showError, wireSecretPanel } from './ui.js';
import { usersView } from './views/users.js';
import { userView } from './views/user.js';
import { tokensView } from './views/tokens.js';
import { auditView } from './views/audit.js';
import { adminKeysView } from './views/admin-keys.js';

// Each view with the scope it needs to be shown at all; what it may change it decides itself.
const VIEWS = [
  { path: 'users', label: 'Users', scope: 'users:read', render: usersView },
  { path: 'tokens', label: 'Tokens', scope: 'tokens:read', render: tokensView },
  { path: 'audit', label: 'Audit log', scope: 'audit:read', render: auditView },
  { path: 'admin-keys', label: 'Admin keys', scope: 'admin-keys:read', render: adminKeysView },
];

const can = (scope) => (credential.scopes || []).includes(scope);

/** The route in the URL's fragment: `#/users/12?x=1` → { parts: ['users', '12'], query }. */
function currentRoute() {
  const hash = window.location.hash.replace(/^#\/?/, '');
  const [path, search] = hash.split('?');
  return { parts: (path || '').split('/').filter((p) => p !== ''), query: new URLSearchParams(search || '') };
}

// What the last action said, for the view it navigates to; a plain navigation clears the status line.
let message = '';

export function navigate(path, query, said = '') {
  message = said;
  const text = query ? new URLSearchParams(Object.entries(query).filter(([, v]) => v !== undefined && v !== null && v !== '')).toString() : '';
  const target = `#/${path}${text ? `?${text}` : ''}`;
  if (window.location.hash === target) onNavigation();
  else window.location.hash = target;
}

function onNavigation() {
  say(message);
  message = '';
  return render();
}

let renderCount = 0;
async function render() {
  const route = currentRoute();
  const available = VIEWS.filter((v) => can(v.scope));
  const view = VIEWS.find((v) => v.path === route.parts[0]);
  if (!view) {
    if (available.length === 0) return page(h('p', {}, 'Your sign-in holds none of the scopes this console shows (SSO_ADMIN_SCOPES).'));
    return navigate(available[0].path, undefined, message);
  }
  const detail = view.path === 'users' && route.parts[1] !== undefined;
  renderNav(view.path);
  clearError();
  hideSecret();
  const root = document.getElementById('view');
  const mine = ++renderCount;
  // Another route starts blank; the same one (after an action) keeps the old view until the new one
  // is ready, so the reader stays where they were on a long page.
  if (root.dataset.route !== window.location.hash) root.replaceChildren();
  root.setAttribute('aria-busy', 'true');
  const ctx = { can, navigate, query: route.query, rerender: render };
  try {
    const content = !can(view.scope)
      ? h('p', { class: 'note lacks' }, `You cannot see ${view.label.toLowerCase()}: your sign-in does not hold ${view.scope}.`)
      : detail
        ? await userView(ctx, Number(route.parts[1]))
        : await view.render(ctx);
    if (mine !== renderCount) return;
    root.replaceChildren(content);
    // Which route the view shows, once it shows it (what the browser tests wait for).
    root.dataset.route = window.location.hash;
  } catch (err) {
    if (mine === renderCount) {
      root.replaceChildren();
      root.dataset.route = window.location.hash;
    }
    if (mine === renderCount) showError(err);
  } finally {
    if (mine === renderCount) root.removeAttribute('aria-busy');
  }
  // `?focus=<id>` in the route: that element (a token's row), rather than the view's heading.
  const target = route.query.get('focus') ? document.getElementById(route.query.get('focus')) : null;
  if (target && root.contains(target)) {
    target.tabIndex = -1;
    target.classList.add('focused');
    target.focus();
    return;
  }
  const heading = root.querySelector('h2');
  if (heading && document.activeElement && document.activeElement.closest && !document.activeElement.closest('#view')) {
    heading.tabIndex = -1;
    heading.focus({ preventScroll: true });
  }
}

function renderNav(active) {
  const nav = document.getElementById('nav');
  nav.textContent = '';
  nav.hidden = false;
  const list = h('ul', {});
  for (const v of VIEWS.filter((v) => can(v.scope))) {
    list.appendChild(h('li', {}, h('a', { href: `#/${v.path}`, 'aria-current': v.path === active ? 'page' : undefined }, v.label)));
  }
  nav.appendChild(list);
}

/** The whole page is one message: not signed in, not an admin. Nothing else is shown. */
function page(...content) {
  document.getElementById('nav').hidden = true;
  const root = document.getElementById('view');
  root.textContent = '';
  append(root, [h('section', { class: 'panel', id: 'denied' }, content)]);
}

async function renderWho() {
  const info = await proxyUserInfo();
  const who = document.getElementById('who');
  who.textContent = '';
  // oauth2-proxy answers /oauth2/userinfo and /oauth2/sign_out itself.
  if (info) append(who, ['Signed in as ', h('strong', { class: 'who-email' }, info.email), ' \u00b7 ', h('a', { href: '../oauth2/sign_out', class: 'sign-out' }, 'Sign out')]);
  else who.textContent = 'Signed in through your sign-in proxy';
}

async function start() {
  wireSecretPanel();
  // The first answer names the person's scopes; a refusal here is a page of its own.
  const [, first] = await Promise.all([renderWho(), api('GET', 'admin/users?limit=1').then(() => null, (err) => err)]);
  if (first instanceof ApiError && first.status === 401) {
    document.getElementById('who').textContent = 'Not signed in';
    return page(
      h('h2', {}, 'Sign in first'),
      h('p', {}, 'The admin console works only for people signed in through your organisation\u2019s sign-in proxy, on a keyward server whose SSO_ADMIN_GROUPS names their group. Open it at the address your sign-in proxy serves, and sign in.'),
      h('p', { class: 'note' }, first.message),
    );
  }
  if (first instanceof ApiError && first.code === 'SSO_ACCESS_DENIED') {
    return page(
      h('h2', {}, 'This console is for keyward\u2019s admins'),
      h('p', {}, 'You are signed in, but not in a group that may administer keyward. If you should be, ask an admin to add you to one of the groups in SSO_ADMIN_GROUPS.'),
      h('p', {}, 'Your own API keys are on ', h('a', { href: '../sso/' }, 'your keys page'), '.'),
    );
  }
  if (credential.scopes === null) {
    showError(first || new Error('keyward did not say what you may do.'));
    return;
  }
  window.addEventListener('hashchange', onNavigation);
  await render();
}

start().finally(() => document.body.classList.add('ready'));
