import request from 'supertest';
import { checksum, generateToken, randomBase62 } from '../src/tokens/token-format';
import { ADMIN_KEY, admin, appsClosedAfterEach, createUser, expectError, mintToken, type TestContext } from './helpers/app';

/**
 * Forward auth (GET /auth/verify, issue "forward auth for gateways"): nginx auth_request, Traefik
 * forwardAuth and Caddy forward_auth ask keyward about the key of a request they are about to pass
 * upstream. A 200 lets the request through and the X-Keyward-* headers are copied upstream as the
 * caller's identity, so the tests care as much about what a refusal must NOT carry as about the 200.
 * Everything /v1 refuses must be refused here too, or the gateway would be a way around it.
 */

const app = appsClosedAfterEach();

const verify = (ctx: TestContext, key: string | undefined, query = '', headers: Record<string, string> = {}) => {
  const req = request(ctx.app).get(`/auth/verify${query}`);
  if (key !== undefined) req.set('X-API-Key', key);
  return req.set(headers);
};
const from = (ip: string) => ({ 'X-Forwarded-For': ip });

/** Same selector, another secret, a valid checksum: it gets as far as bcrypt and fails there. */
function wrongSecret(token: string): string {
  const body = `${token.slice(0, token.length - 38)}${randomBase62(32)}`;
  return body + checksum(body);
}

interface Minted {
  id: number;
  token: string;
  scopes: string[];
}

async function userWithToken(ctx: TestContext, token: Record<string, unknown> = {}, user: Record<string, unknown> = {}) {
  const created = await createUser(ctx, user);
  return { user: created, minted: (await mintToken(ctx, created.id, token)) as Minted };
}

/** The X-Keyward-* response headers, which a gateway would copy upstream. */
function identityHeaders(res: request.Response): Record<string, string> {
  return Object.fromEntries(Object.entries(res.headers).filter(([name]) => name.startsWith('x-keyward-'))) as Record<string, string>;
}

/** A refusal in the one envelope that carries no identity a gateway could forward by mistake. */
function expectRefused(res: request.Response, status: number, code: string): { message: string; details: unknown } {
  const error = expectError(res, status, code);
  expect(identityHeaders(res)).toEqual({});
  return error;
}

function expectIdentity(
  res: request.Response,
  user: { id: number; email: string; external_id?: string | null },
  token: { id: number; metadata?: Record<string, unknown> | null },
  scopes: string[],
  environment: 'live' | 'test' = 'live',
): void {
  expect(res.status).toBe(200);
  const externalId = user.external_id ?? null;
  const metadata = token.metadata ?? null;
  expect(identityHeaders(res)).toEqual({
    'x-keyward-user-id': String(user.id),
    'x-keyward-user-email': user.email,
    'x-keyward-token-id': String(token.id),
    'x-keyward-scopes': scopes.join(' '),
    'x-keyward-environment': environment,
    'x-keyward-external-id': externalId ?? '',
    'x-keyward-token-metadata': metadata === null ? '' : Buffer.from(JSON.stringify(metadata)).toString('base64url'),
  });
  expect(res.body).toEqual({ user_id: user.id, email: user.email, external_id: externalId, token_id: token.id, scopes, environment, metadata });
}

function expectWithinWindow(value: unknown): number {
  expect(value).toMatch(/^\d+$/);
  const n = Number(value);
  expect(n).toBeGreaterThanOrEqual(1);
  expect(n).toBeLessThanOrEqual(60);
  return n;
}

/** The RateLimit-* fields of a counted response. */
function quota(res: request.Response): { limit: number; remaining: number; reset: number } {
  for (const name of ['ratelimit-limit', 'ratelimit-remaining', 'ratelimit-reset']) expect(res.headers[name]).toMatch(/^\d+$/);
  return {
    limit: Number(res.headers['ratelimit-limit']),
    remaining: Number(res.headers['ratelimit-remaining']),
    reset: expectWithinWindow(res.headers['ratelimit-reset']),
  };
}

function expectOverLimit(res: request.Response, limit: number): void {
  const error = expectRefused(res, 429, 'RATE_LIMITED');
  const retryAfter = expectWithinWindow(res.headers['retry-after']);
  expect(error.details).toEqual({ limit, retry_after: retryAfter });
  expect(quota(res)).toEqual({ limit, remaining: 0, reset: retryAfter });
}

const tokenView = async (ctx: TestContext, id: number) => (await request(ctx.app).get(`/admin/tokens/${id}`).set(admin).expect(200)).body;

const CHALLENGE = 'Bearer realm="keyward"';
const INVALID_TOKEN_CHALLENGE = 'Bearer realm="keyward", error="invalid_token"';

describe('a good key', () => {
  test('X-API-Key: 200 with the identity in exactly five X-Keyward-* headers and the same in the JSON body', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx, { scopes: ['tokens:read', 'bots:read'] });
    const res = await verify(ctx, minted.token);
    expectIdentity(res, user, minted, ['bots:read', 'tokens:read']);
    expect(res.headers['content-type']).toMatch(/^application\/json/);
    expect(res.headers['x-request-id']).toEqual(expect.any(String));
    // A cache between gateway and keyward must not keep answering 200 after the key is revoked.
    expect(res.headers['cache-control']).toBe('no-store');
  });

  test('Authorization: Bearer (any case) gives the same answer, and so do both headers carrying the same key', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx);
    for (const headers of <Array<Record<string, string>>>[
      { Authorization: `Bearer ${minted.token}` },
      { Authorization: `bearer ${minted.token}` },
      { Authorization: `Bearer ${minted.token}`, 'X-API-Key': minted.token },
    ]) {
      expectIdentity(await verify(ctx, undefined, '', headers), user, minted, ['bots:read', 'bots:write']);
    }
  });

  test('a test key reports X-Keyward-Environment: test', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx, { environment: 'test', scopes: ['bots:read'] });
    expect(minted.token).toMatch(/^kw_test_/);
    expectIdentity(await verify(ctx, minted.token, '?scope=bots:read'), user, minted, ['bots:read'], 'test');
  });

  test('EXTRA_SCOPES are reported in X-Keyward-Scopes and can be required with ?scope=', async () => {
    // This is what EXTRA_SCOPES exist for: the self-hoster's own services learn them only from here.
    const ctx = await app({ EXTRA_SCOPES: 'reports:read,reports:write' });
    const { user, minted } = await userWithToken(ctx, { scopes: ['reports:read', 'bots:read'] });
    expectIdentity(await verify(ctx, minted.token, '?scope=reports:read'), user, minted, ['bots:read', 'reports:read']);
    expectIdentity(await verify(ctx, minted.token, '?scope=reports:read,bots:read'), user, minted, ['bots:read', 'reports:read']);
    const error = expectRefused(await verify(ctx, minted.token, '?scope=reports:read,reports:write'), 403, 'INSUFFICIENT_SCOPE');
    expect(error.details).toEqual({ required: ['reports:write'] });
  });

  test('X-Keyward-* headers sent by the client have no effect on the answer', async () => {
    // A gateway forwards the client's headers; a client must not be able to pose as someone else.
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx, { scopes: ['bots:read'] });
    const victim = await userWithToken(ctx, { scopes: ['tokens:write'] });
    const forged = {
      'X-Keyward-User-Id': String(victim.user.id),
      'X-Keyward-User-Email': victim.user.email,
      'X-Keyward-Token-Id': String(victim.minted.id),
      'X-Keyward-Scopes': 'tokens:write',
      'X-Keyward-Environment': 'test',
    };
    expectIdentity(await verify(ctx, minted.token, '', forged), user, minted, ['bots:read']);
    expectRefused(await verify(ctx, minted.token, '?scope=tokens:write', forged), 403, 'INSUFFICIENT_SCOPE');
    expectRefused(await verify(ctx, undefined, '', forged), 401, 'AUTHENTICATION_REQUIRED');
  });

  test('the check counts as a use of the key: last_used_at and last_used_ip show it', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx);
    expect(await tokenView(ctx, minted.id)).toMatchObject({ last_used_at: null, last_used_ip: null });
    ctx.clock.advance(90);
    await verify(ctx, minted.token).expect(200);
    expect(await tokenView(ctx, minted.id)).toMatchObject({ last_used_at: '2026-01-01T00:01:30.000Z', last_used_ip: '127.0.0.1' });
  });

  test('HEAD works too: 200 with the identity headers and no body', async () => {
    // Gateways are configured to send GET; HEAD is what Express gives every GET route, so pin it down.
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx, { scopes: ['bots:read'] });
    const res = await request(ctx.app).head('/auth/verify?scope=bots:read').set('X-API-Key', minted.token);
    expect(res.status).toBe(200);
    expect(identityHeaders(res)).toEqual({
      'x-keyward-user-id': String(user.id),
      'x-keyward-user-email': user.email,
      'x-keyward-token-id': String(minted.id),
      'x-keyward-scopes': 'bots:read',
      'x-keyward-environment': 'live',
      'x-keyward-external-id': '',
      'x-keyward-token-metadata': '',
    });
    expect(res.text).toBeUndefined();
    const refused = await request(ctx.app).head('/auth/verify?scope=bots:write').set('X-API-Key', minted.token);
    expect(refused.status).toBe(403);
    expect(identityHeaders(refused)).toEqual({});
  });
});

describe('what gateways send along', () => {
  test('the X-Forwarded-* and X-Original-* headers of Traefik, Caddy and nginx do not change the answer', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx, { scopes: ['bots:read'] });
    const gateway = {
      'X-Forwarded-Method': 'POST',
      'X-Forwarded-Proto': 'https',
      'X-Forwarded-Host': 'app.example.com',
      'X-Forwarded-Uri': '/v1/bots?scope=tokens:write',
      'X-Original-URI': '/v1/bots',
      'X-Original-Method': 'DELETE',
    };
    expectIdentity(await verify(ctx, minted.token, '?scope=bots:read', gateway), user, minted, ['bots:read']);
    expectRefused(await verify(ctx, minted.token, '?scope=bots:write', gateway), 403, 'INSUFFICIENT_SCOPE');
  });

  test('Content-Length: 0 (what a proxy may send for a request with its body stripped) is no body', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx);
    expectIdentity(await verify(ctx, minted.token, '', { 'Content-Length': '0' }), user, minted, ['bots:read', 'bots:write']);
  });

  test('a forwarded body is refused with 400: the gateway must be set up not to pass it on', async () => {
    // nginx: proxy_pass_request_body off; Traefik: forwardBody false (its default). A body here is a
    // misconfiguration, and a loud 400 says so where silently passing would hide it.
    const ctx = await app();
    const { minted } = await userWithToken(ctx);
    const res = await verify(ctx, minted.token).set('Content-Type', 'application/json').send('{"bot":1}');
    const error = expectRefused(res, 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([{ field: 'body', in: 'body', message: 'this operation takes no request body' }]);
  });
});

describe('?scope=', () => {
  test('without ?scope= any valid key passes, whatever its scopes: requiring one is the gateway\'s call', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx, { scopes: ['tokens:read'] });
    expectIdentity(await verify(ctx, minted.token), user, minted, ['tokens:read']);
  });

  test.each([
    ['one scope', '?scope=bots:read'],
    ['commas', '?scope=bots:read,tokens:write'],
    ['a space', '?scope=bots:read%20tokens:write'],
    ['a plus (a space in a query string)', '?scope=bots:read+tokens:write'],
    ['comma and space together, with leading and trailing separators', '?scope=,%20bots:read,%20%20tokens:write,'],
    ['a newline or tab', '?scope=bots:read%0Atokens:write%09tokens:read'],
    ['the same scope twice', '?scope=bots:read,bots:read'],
  ])('passes when the key holds every scope named, separated by %s', async (_what, query) => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx, { scopes: ['bots:read', 'tokens:read', 'tokens:write'] });
    expectIdentity(await verify(ctx, minted.token, query), user, minted, ['bots:read', 'tokens:read', 'tokens:write']);
  });

  test.each([
    ['one of two missing', '?scope=bots:read,tokens:write', ['tokens:write']],
    ['both of two missing, space-separated', '?scope=tokens:read%20tokens:write', ['tokens:read', 'tokens:write']],
    ['every missing one, in the order asked, held ones left out', '?scope=tokens:write,bots:read,bots:write,tokens:read', ['tokens:write', 'bots:write', 'tokens:read']],
    ['a missing scope named twice, once', '?scope=tokens:write,tokens:write', ['tokens:write']],
    ['scopes compared exactly (case matters)', '?scope=BOTS:READ', ['BOTS:READ']],
    ['a scope no key can hold', '?scope=admin:all', ['admin:all']],
  ])('403 INSUFFICIENT_SCOPE names %s in details.required', async (_what, query, required) => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { scopes: ['bots:read'] });
    const res = await verify(ctx, minted.token, query);
    const error = expectRefused(res, 403, 'INSUFFICIENT_SCOPE');
    expect(error.details).toEqual({ required });
    expect(error.message).toBe(`This API key lacks the scope ${required.join(', ')}.`);
  });

  test.each([
    ['a comma', '?scope=,'],
    ['a space', '?scope=%20'],
    ['a plus', '?scope=+'],
    ['commas and spaces', '?scope=,%20,+,'],
  ])('400 VALIDATION_ERROR in:query for a ?scope= of only %s', async (_what, query) => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx);
    const error = expectRefused(await verify(ctx, minted.token, query), 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([{ field: 'scope', in: 'query', message: 'must name at least one scope' }]);
  });

  test('400 for an empty ?scope= (it would otherwise mean "no requirement")', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx);
    const error = expectRefused(await verify(ctx, minted.token, '?scope='), 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([{ field: 'scope', in: 'query', message: 'must NOT have fewer than 1 characters' }]);
  });

  test('400 for a ?scope= over 1000 characters; exactly 1000 is judged', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { scopes: ['bots:read'] });
    const error = expectRefused(await verify(ctx, minted.token, `?scope=bots:read,${'x'.repeat(991)}`), 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([{ field: 'scope', in: 'query', message: 'must NOT have more than 1000 characters' }]);
    const atLimit = expectRefused(await verify(ctx, minted.token, `?scope=bots:read,${'x'.repeat(990)}`), 403, 'INSUFFICIENT_SCOPE');
    expect(atLimit.details).toEqual({ required: ['x'.repeat(990)] });
  });

  test('a change of the key\'s scopes applies to the very next check, with the secret already cached', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx, { scopes: ['bots:read', 'tokens:write'] });
    expectIdentity(await verify(ctx, minted.token, '?scope=tokens:write'), user, minted, ['bots:read', 'tokens:write']);
    await request(ctx.app).patch(`/admin/tokens/${minted.id}`).set(admin).send({ scopes: ['bots:read'] }).expect(200);
    const error = expectRefused(await verify(ctx, minted.token, '?scope=tokens:write'), 403, 'INSUFFICIENT_SCOPE');
    expect(error.details).toEqual({ required: ['tokens:write'] });
    expectIdentity(await verify(ctx, minted.token), user, minted, ['bots:read']);
  });

  test('a misspelt parameter is 400, not ignored: ?scopes=tokens:write must not let a bots:read key through', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { scopes: ['bots:read'] });
    for (const [query, field] of [
      ['?scopes=tokens:write', 'scopes'],
      ['?scope=bots:read&require=tokens:write', 'require'],
      ['?Scope=tokens:write', 'Scope'],
    ]) {
      const error = expectRefused(await verify(ctx, minted.token, query), 400, 'VALIDATION_ERROR');
      expect(error.details).toEqual([{ field, in: 'query', message: 'is not a known field' }]);
    }
  });

  test('a repeated ?scope= is 400: it is documented as one string, and neither copy may be silently dropped', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { scopes: ['bots:read', 'tokens:write'] });
    for (const query of ['?scope=bots:read&scope=tokens:write', '?scope=bots:read&scope=bots:read', '?scope=bots:read&scope=']) {
      const error = expectRefused(await verify(ctx, minted.token, query), 400, 'VALIDATION_ERROR');
      expect(error.details).toEqual([{ field: 'scope', in: 'query', message: 'must be string' }]);
    }
  });

  test('the key is judged before the query: without a valid key a bad ?scope= is 401, not 400', async () => {
    // As on /v1: nobody learns anything about the parameters without holding a key.
    const ctx = await app();
    expectRefused(await verify(ctx, undefined, '?scopes=x'), 401, 'AUTHENTICATION_REQUIRED');
    expectRefused(await verify(ctx, generateToken('kw', 'live').token, '?scope=,'), 401, 'INVALID_API_KEY');
  });
});

describe('the refusals of /v1 apply here too', () => {
  test.each([
    ['no header at all', {}],
    ['an empty X-API-Key', { 'X-API-Key': '' }],
    ['an empty Bearer', { Authorization: 'Bearer ' }],
    ['Basic authorization', { Authorization: 'Basic dXNlcjpwYXNz' }],
    ['only the admin key', { 'X-Admin-API-Key': ADMIN_KEY }],
  ])('401 AUTHENTICATION_REQUIRED with WWW-Authenticate for %s', async (_what, headers) => {
    const ctx = await app();
    const res = await verify(ctx, undefined, '', headers);
    expectRefused(res, 401, 'AUTHENTICATION_REQUIRED');
    expect(res.headers['www-authenticate']).toBe(CHALLENGE);
  });

  test('a valid key in the query string is not accepted', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx);
    for (const name of ['api_key', 'token', 'key']) {
      const res = await verify(ctx, undefined, `?${name}=${minted.token}`);
      const error = expectRefused(res, 401, 'AUTHENTICATION_REQUIRED');
      expect(error.message).toMatch(/query string/);
    }
    expect(await tokenView(ctx, minted.id)).toMatchObject({ last_used_at: null });
  });

  test.each<[string, (token: string) => string]>([
    ['a malformed key', () => 'not-a-key'],
    ['a bad checksum', (t) => t.slice(0, -1) + (t.endsWith('A') ? 'B' : 'A')],
    ['a truncated key', (t) => t.slice(0, -1)],
    ['an unknown selector', () => generateToken('kw', 'live').token],
    ['a wrong secret', (t) => wrongSecret(t)],
    ['the live key respelt as a test key', (t) => {
      const body = t.slice(0, -6).replace(/^kw_live_/, 'kw_test_');
      return body + checksum(body);
    }],
    ['the admin key as a user key', () => ADMIN_KEY],
  ])('401 INVALID_API_KEY for %s', async (_what, spoil) => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx);
    const res = await verify(ctx, spoil(minted.token));
    expectRefused(res, 401, 'INVALID_API_KEY');
    expect(res.headers['www-authenticate']).toBe(INVALID_TOKEN_CHALLENGE);
    // The good key still works afterwards: the refusal was about the spoilt one only.
    await verify(ctx, minted.token).expect(200);
  });

  test('401 INVALID_API_KEY when X-API-Key and Bearer carry different keys, even if both are good', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx);
    const other = await mintToken(ctx, user.id);
    const res = await verify(ctx, minted.token, '', { Authorization: `Bearer ${other.token}` });
    expectRefused(res, 401, 'INVALID_API_KEY');
    expect(res.headers['www-authenticate']).toBe(CHALLENGE);
  });

  test('401 API_KEY_EXPIRED from the moment of expiry, with the secret already cached', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx, { expires_in: 60 });
    ctx.clock.advance(59);
    expectIdentity(await verify(ctx, minted.token), user, minted, ['bots:read', 'bots:write']);
    ctx.clock.advance(1);
    const res = await verify(ctx, minted.token);
    expectRefused(res, 401, 'API_KEY_EXPIRED');
    expect(res.headers['www-authenticate']).toBe(INVALID_TOKEN_CHALLENGE);
    // The key's state comes before the gateway's scope question.
    expectRefused(await verify(ctx, minted.token, '?scope=tokens:write'), 401, 'API_KEY_EXPIRED');
  });

  test('401 API_KEY_REVOKED on the very next check after revocation', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx);
    await verify(ctx, minted.token).expect(200);
    await request(ctx.app).delete(`/admin/tokens/${minted.id}`).set(admin).expect(204);
    const res = await verify(ctx, minted.token);
    expectRefused(res, 401, 'API_KEY_REVOKED');
    expect(res.headers['www-authenticate']).toBe(INVALID_TOKEN_CHALLENGE);
  });

  test('401 API_KEY_REVOKED once the key\'s user is deleted', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx);
    await verify(ctx, minted.token).expect(200);
    await request(ctx.app).delete(`/admin/users/${user.id}`).set(admin).expect(204);
    expectRefused(await verify(ctx, minted.token), 401, 'API_KEY_REVOKED');
  });

  test('403 USER_DISABLED while the user is disabled, and 200 again once enabled', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx);
    await verify(ctx, minted.token).expect(200);
    await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: true }).expect(200);
    expectRefused(await verify(ctx, minted.token), 403, 'USER_DISABLED');
    expectRefused(await verify(ctx, minted.token, '?scope=bots:read'), 403, 'USER_DISABLED');
    await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: false }).expect(200);
    expectIdentity(await verify(ctx, minted.token), user, minted, ['bots:read', 'bots:write']);
  });
});

describe('the key\'s IP allowlist, judged by the forwarded client address', () => {
  test('TRUST_PROXY=loopback: the gateway\'s X-Forwarded-For is the client address', async () => {
    const ctx = await app({ TRUST_PROXY: 'loopback' });
    const { user, minted: inside } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'] });
    const onlyLocal = await mintToken(ctx, user.id, { allowed_ips: ['127.0.0.1'] });

    expectIdentity(await verify(ctx, inside.token, '', from('10.1.2.3')), user, inside, ['bots:read', 'bots:write']);
    expect(await tokenView(ctx, inside.id)).toMatchObject({ last_used_ip: '10.1.2.3' });

    const error = expectRefused(await verify(ctx, onlyLocal.token, '', from('10.1.2.3')), 403, 'FORBIDDEN_IP');
    expect(error.details).toEqual({ ip: '10.1.2.3' });
    // A client that puts 127.0.0.1 in front of the address the gateway appends is still 10.1.2.3.
    const chained = expectRefused(await verify(ctx, onlyLocal.token, '', from('127.0.0.1, 10.1.2.3')), 403, 'FORBIDDEN_IP');
    expect(chained.details).toEqual({ ip: '10.1.2.3' });
    // Without the header the caller is the gateway itself.
    expectRefused(await verify(ctx, inside.token), 403, 'FORBIDDEN_IP');
    await verify(ctx, onlyLocal.token).expect(200);
  });

  test('TRUST_PROXY off: a forged X-Forwarded-For changes nothing, in either direction', async () => {
    const ctx = await app();
    const { user, minted: inside } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'] });
    const onlyLocal = await mintToken(ctx, user.id, { allowed_ips: ['127.0.0.1'] });

    // It does not let a key in...
    const error = expectRefused(await verify(ctx, inside.token, '', from('10.1.2.3')), 403, 'FORBIDDEN_IP');
    expect(error.details).toEqual({ ip: '127.0.0.1' });
    // ...nor keep one out.
    expectIdentity(await verify(ctx, onlyLocal.token, '', from('10.1.2.3')), user, onlyLocal, ['bots:read', 'bots:write']);
    expect(await tokenView(ctx, onlyLocal.id)).toMatchObject({ last_used_ip: '127.0.0.1' });
  });

  test('a refusal for the address is not a use of the key, and comes before the scope question', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'], scopes: ['bots:read'] });
    expectRefused(await verify(ctx, minted.token), 403, 'FORBIDDEN_IP');
    expectRefused(await verify(ctx, minted.token, '?scope=tokens:write'), 403, 'FORBIDDEN_IP');
    expect(await tokenView(ctx, minted.id)).toMatchObject({ last_used_at: null, last_used_ip: null });
  });
});

describe('rate limits', () => {
  test('the user\'s rate_limit_per_minute: RateLimit-* on each answer, the third check 429 with Retry-After', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx, {}, { rate_limit_per_minute: 2 });
    const first = await verify(ctx, minted.token);
    expectIdentity(first, user, minted, ['bots:read', 'bots:write']);
    expect(quota(first)).toMatchObject({ limit: 2, remaining: 1 });
    const second = await verify(ctx, minted.token);
    expectIdentity(second, user, minted, ['bots:read', 'bots:write']);
    expect(quota(second)).toMatchObject({ limit: 2, remaining: 0 });
    expectOverLimit(await verify(ctx, minted.token), 2);
    // HEAD has no body to carry the envelope; the status and headers must still refuse.
    const head = await request(ctx.app).head('/auth/verify').set('X-API-Key', minted.token);
    expect(head.status).toBe(429);
    expect(identityHeaders(head)).toEqual({});
    expectWithinWindow(head.headers['retry-after']);
  });

  test('one budget with /v1: checks at the gateway and direct calls count together', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, {}, { rate_limit_per_minute: 2 });
    await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token).expect(200);
    await verify(ctx, minted.token).expect(200);
    expectOverLimit(await verify(ctx, minted.token), 2);
    expectOverLimit(await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token), 2);
  });

  test('refusals after the key is verified are counted and say so; a missing key is not', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { scopes: ['bots:read'] }, { rate_limit_per_minute: 2 });
    const noKey = await verify(ctx, undefined);
    expectRefused(noKey, 401, 'AUTHENTICATION_REQUIRED');
    expect(noKey.headers['ratelimit-limit']).toBeUndefined();
    const scope = await verify(ctx, minted.token, '?scope=tokens:write');
    expectRefused(scope, 403, 'INSUFFICIENT_SCOPE');
    expect(quota(scope)).toMatchObject({ limit: 2, remaining: 1 });
    const invalid = await verify(ctx, minted.token, '?scope=,');
    expectRefused(invalid, 400, 'VALIDATION_ERROR');
    expect(quota(invalid)).toMatchObject({ limit: 2, remaining: 0 });
    expectOverLimit(await verify(ctx, minted.token, '?scope=bots:read'), 2);
  });

  test('a user with a limit of 0 is refused every check', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, {}, { rate_limit_per_minute: 0 });
    expectOverLimit(await verify(ctx, minted.token), 0);
  });

  test('wrong keys behind a trusted gateway block the client that sent them, not every client of the gateway', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3', TRUST_PROXY: 'loopback' });
    const { user, minted } = await userWithToken(ctx);
    await verify(ctx, minted.token, '', from('10.0.0.1')).expect(200);
    for (let i = 0; i < 3; i++) expectRefused(await verify(ctx, generateToken('kw', 'live').token, '', from('10.0.0.1')), 401, 'INVALID_API_KEY');
    const blocked = await verify(ctx, generateToken('kw', 'live').token, '', from('10.0.0.1'));
    expectRefused(blocked, 429, 'RATE_LIMITED');
    expectWithinWindow(blocked.headers['retry-after']);
    // A key this process has already verified still passes from the blocked client.
    expectIdentity(await verify(ctx, minted.token, '', from('10.0.0.1')), user, minted, ['bots:read', 'bots:write']);
    expectRefused(await verify(ctx, generateToken('kw', 'live').token, '', from('10.0.0.2')), 401, 'INVALID_API_KEY');
  });
});

describe('methods', () => {
  test.each(['post', 'put', 'patch', 'delete', 'options'] as const)('%s is 405 METHOD_NOT_ALLOWED with Allow, even with a good key', async (method) => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx);
    const res = await request(ctx.app)[method]('/auth/verify').set('X-API-Key', minted.token);
    const error = expectRefused(res, 405, 'METHOD_NOT_ALLOWED');
    expect(res.headers.allow).toBe('GET, HEAD');
    expect(error.details).toEqual({ allow: ['GET', 'HEAD'] });
    expect(await tokenView(ctx, minted.id)).toMatchObject({ last_used_at: null });
  });
});
