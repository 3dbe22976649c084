// The admin API as the console calls it: same origin, the sign-in proxy's cookie, no admin key.
// keyward's root is two folders above this file (/console/js/api.js), whatever prefix the proxy adds.
const ROOT = new URL('../../', import.meta.url);

/**
 * What the signed-in person may do: keyward names the admin scopes of the credential on every /admin
 * answer (X-Keyward-Admin-Scopes), refusals included. Null until the first answer.
 */
export const credential = { scopes: null };

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

// fetch with the CSRF header on changes (keyward refuses changes from people without it) and the
// error envelope unwrapped into an ApiError.
export async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  const init = { method, headers, credentials: 'same-origin', cache: 'no-store', redirect: 'error' };
  if (method !== 'GET' && method !== 'HEAD') headers['X-Keyward-CSRF'] = '1';
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(new URL(path.replace(/^\//, ''), ROOT), init);
  } catch {
    throw new ApiError(0, 'NETWORK_ERROR', 'Could not reach keyward. Check your connection and try again.');
  }
  const scopes = res.headers.get('X-Keyward-Admin-Scopes');
  if (scopes !== null) credential.scopes = scopes.split(' ').filter((s) => s !== '');
  if (res.status === 204) return null;
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (res.ok) return data;
  const err = data && data.error ? data.error : {};
  throw new ApiError(
    res.status,
    typeof err.code === 'string' ? err.code : `HTTP_${res.status}`,
    typeof err.message === 'string' ? err.message : `The server answered ${res.status} ${res.statusText}.`,
    err.details,
  );
}

/** A path with a query string made of the defined, non-empty values. */
export function withQuery(path, query) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value !== undefined && value !== null && value !== '') params.set(key, String(value));
  }
  const text = params.toString();
  return text ? `${path}?${text}` : path;
}

/** Every page of a list, up to `max` items (the console's lists that are not paginated on screen). */
export async function listAll(path, query = {}, max = 1000) {
  const all = [];
  let cursor;
  do {
    const page = await api('GET', withQuery(path, { ...query, limit: 100, cursor }));
    all.push(...page.data);
    cursor = page.meta.next_cursor;
  } while (cursor && all.length < max);
  return all;
}

/** The sign-in proxy's own account of the person (oauth2-proxy's /oauth2/userinfo), or null. */
export async function proxyUserInfo() {
  try {
    const res = await fetch(new URL('oauth2/userinfo', ROOT), { credentials: 'same-origin', cache: 'no-store', redirect: 'error' });
    if (!res.ok || !/json/.test(res.headers.get('content-type') || '')) return null;
    const info = await res.json();
    return info && typeof info.email === 'string' ? info : null;
  } catch {
    return null;
  }
}
