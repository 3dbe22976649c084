import { join } from 'node:path';
import { Writable } from 'node:stream';
import request from 'supertest';
import { checksum } from '../src/tokens/token-format';
import { ADMIN_KEY, admin, createTestApp, createUser, mintToken, type TestContext } from './helpers/app';
import { jsonLines, makeTempDir, removeTempDirs, startServer, stopAllServers } from './helpers/server-process';

/**
 * The structured request log: one JSON line per request saying who did what with which outcome, and
 * never a credential, wherever the client put one (headers, cookies, query string, path, body, request
 * id) and whatever the server sent back (minted and rotated tokens).
 */

const SSO_SECRET = 'sso-shared-secret-0123456789abcdefghijKLMNOP';
const METRICS_TOKEN = 'metrics-token-0123456789abcdefghijklmnopqrstuv';
const WRONG_ADMIN_KEY = 'wrong-admin-key-ZYXWVUTSRQPONMLKJIHGFEDCBA9876';
const CSRF = { 'X-Keyward-CSRF': '1' };

/** Every key a request line has, and only those: no header, query, body or response field. */
const REQUEST_LINE_KEYS = ['duration_ms', 'error_code', 'level', 'method', 'msg', 'path', 'request_id', 'route', 'service', 'status', 'time', 'token_id', 'user_id'];

class LogSink extends Writable {
  text = '';
  override _write(chunk: Buffer | string, _encoding: BufferEncoding, done: (error?: Error | null) => void): void {
    this.text += chunk.toString();
    done();
  }
  lines(): Array<Record<string, unknown>> {
    return jsonLines(this.text);
  }
}

const contexts: TestContext[] = [];
async function loggedApp(env: Record<string, string> = {}): Promise<{ ctx: TestContext; sink: LogSink }> {
  const sink = new LogSink();
  const ctx = await createTestApp({ env, logDestination: sink });
  contexts.push(ctx);
  return { ctx, sink };
}
afterEach(async () => {
  for (const ctx of contexts.splice(0)) await ctx.close();
  await stopAllServers();
});
afterAll(() => removeTempDirs());

/** The secret part of a keyward token: the 32 characters before the 6-character checksum. */
const secretOf = (token: string) => token.slice(-38, -6);

function wrongSecret(token: string): string {
  const body = token.slice(0, -6);
  const secret = body.slice(-32);
  const changed = body.slice(0, -32) + (secret.startsWith('A') ? 'B' : 'A') + secret.slice(1);
  return changed + checksum(changed);
}

/** Lets 'finish' handlers that run after the client has its answer write their line. */
const settle = () => new Promise((r) => setImmediate(r));

function expectNoSecrets(text: string, secrets: Record<string, string>): void {
  expect(text.length).toBeGreaterThan(0);
  const found = Object.entries(secrets)
    .filter(([, value]) => text.includes(value) || text.includes(encodeURIComponent(value)))
    .map(([name]) => name);
  expect(found).toEqual([]);
}

interface Sent {
  res: request.Response;
  method: string;
  route: string | null;
  path: string;
  userId?: number | null;
  tokenId?: number | null;
}

describe('request log lines', () => {
  test('a credential sent anywhere, or minted in a response, never reaches the log', async () => {
    const { ctx, sink } = await loggedApp({ SSO_TRUSTED_PROXIES: '127.0.0.1, ::1', SSO_SHARED_SECRET: SSO_SECRET, METRICS_TOKEN });
    const user = await createUser(ctx, { email: 'keyholder@example.com' });
    const key = await mintToken(ctx, user.id, { scopes: ['bots:read', 'bots:write', 'tokens:read', 'tokens:write'] });
    const token = key.token;
    const wrong = wrongSecret(token);
    const http = () => request(ctx.app);
    const sso = { 'X-Forwarded-Email': user.email, 'X-Keyward-SSO-Secret': SSO_SECRET };
    const minted: string[] = [];
    const sent: Sent[] = [];
    const send = async (r: request.Test, expectStatus: number, meta: Omit<Sent, 'res' | 'method'>) => {
      const method = r.method;
      const res = await r;
      expect({ path: meta.path, status: res.status }).toEqual({ path: meta.path, status: expectStatus });
      sent.push({ res, method, ...meta });
      return res;
    };
    const asKey = { route: 'getMe', path: '/v1/me', userId: user.id, tokenId: key.id };
    const anonymousMe = { route: 'getMe', path: '/v1/me', userId: null, tokenId: null };
    const asAdmin = { userId: null, tokenId: null };

    // Headers, right and wrong.
    await send(http().get('/v1/me').set('X-API-Key', token), 200, asKey);
    await send(http().get('/v1/me').set('Authorization', `Bearer ${token}`), 200, asKey);
    await send(http().get('/v1/me').set('X-API-Key', wrong), 401, anonymousMe);
    await send(http().get('/v1/me').set('Authorization', `Bearer ${wrong}`), 401, anonymousMe);
    await send(http().get('/v1/me').set('X-API-Key', token).set('Authorization', `Bearer ${wrong}`), 401, anonymousMe);
    await send(http().get('/admin/users').set(admin), 200, { route: 'listUsers', path: '/admin/users', ...asAdmin });
    await send(http().get('/admin/users').set('X-Admin-API-Key', WRONG_ADMIN_KEY), 401, { route: 'listUsers', path: '/admin/users', ...asAdmin });
    await send(http().get('/v1/me').set(admin), 401, anonymousMe);
    await send(http().get('/admin/users').set('X-API-Key', token), 401, { route: 'listUsers', path: '/admin/users', ...asAdmin });
    // Cookies.
    await send(http().get('/v1/me').set('Cookie', `keyward_key=${token}; admin=${ADMIN_KEY}; sso=${SSO_SECRET}`), 401, anonymousMe);
    await send(http().get('/v1/me').set('X-API-Key', token).set('Cookie', `session=${wrong}`), 200, asKey);
    // The query string.
    await send(http().get(`/v1/me?api_key=${token}`), 401, anonymousMe);
    // (/v1/me takes no query parameters: 400 after authentication.)
    await send(http().get(`/v1/me?token=${token}&admin_key=${ADMIN_KEY}`).set('X-API-Key', token), 400, asKey);
    await send(http().get(`/auth/verify?scope=bots:read&token=${token}`).set('X-API-Key', token), 400, { route: 'verifyKey', path: '/auth/verify', userId: user.id, tokenId: key.id });
    await send(http().get(`/admin/users?email=${encodeURIComponent(ADMIN_KEY)}`).set(admin), 200, { route: 'listUsers', path: '/admin/users', ...asAdmin });
    // The path: of a route (only its template is logged) and of no route (token-like runs masked).
    await send(http().get(`/admin/users/email/${token}`).set(admin), 404, { route: 'getUserByEmail', path: '/admin/users/email/{email}', ...asAdmin });
    await send(http().get(`/admin/users/email/${encodeURIComponent(user.email)}`).set(admin), 200, { route: 'getUserByEmail', path: '/admin/users/email/{email}', ...asAdmin });
    await send(http().get(`/v1/bots/${token}`).set('X-API-Key', token), 400, { route: 'getMyBot', path: '/v1/bots/{id}', userId: user.id, tokenId: key.id });
    const unmatched = await send(http().get(`/keys/${token}`), 404, { route: null, path: `/keys/${token.slice(0, 21)}[redacted]`, userId: null, tokenId: null });
    await send(http().get(`/${ADMIN_KEY}/${SSO_SECRET}/${METRICS_TOKEN}/${secretOf(token)}`), 404, { route: null, path: '/kw-admin-[redacted]/sso-shared-secret-[redacted]/metrics-token-[redacted]/[redacted]', userId: null, tokenId: null });
    await send(http().delete(`/v1/me/${token}`).set('X-API-Key', token), 404, { route: null, path: `/v1/me/${token.slice(0, 21)}[redacted]`, userId: null, tokenId: null });
    // A JSON body (a user's name and data, a key's name, a malformed body).
    const created = await send(
      http().post('/admin/users').set(admin).send({ email: 'body@example.com', name: token, data: { token, api_key: token, admin: ADMIN_KEY, nested: { secret: SSO_SECRET } } }),
      201,
      { route: 'createUser', path: '/admin/users', ...asAdmin },
    );
    await send(http().patch(`/admin/users/${created.body.id}`).set(admin).send({ name: `again ${token}` }), 200, { route: 'updateUser', path: '/admin/users/{id}', ...asAdmin });
    await send(http().post('/admin/users').set(admin).set('Content-Type', 'application/json').send(`{"email": "${token}`), 400, { route: 'createUser', path: '/admin/users', ...asAdmin });
    await send(http().post('/admin/users').set(admin).send({ email: token, unknown: ADMIN_KEY }), 400, { route: 'createUser', path: '/admin/users', ...asAdmin });
    // Request ids the server does not keep, because they are not short and plain.
    await send(http().get('/v1/me').set('X-API-Key', token).set('X-Request-Id', `Bearer ${token}`), 200, asKey);
    await send(http().get('/v1/me').set('X-API-Key', token).set('X-Request-Id', `${token}-${ADMIN_KEY}`), 200, asKey);
    // Minted and rotated tokens: in the response, never in the log.
    const mint = await send(http().post(`/admin/users/${user.id}/tokens`).set(admin).send({ name: token }), 201, { route: 'mintToken', path: '/admin/users/{id}/tokens', ...asAdmin });
    minted.push(mint.body.token);
    const rotated = await send(http().post(`/admin/tokens/${mint.body.id}/rotate`).set(admin), 201, { route: 'rotateToken', path: '/admin/tokens/{id}/rotate', ...asAdmin });
    minted.push(rotated.body.token);
    const mine = await send(http().post('/v1/tokens').set('X-API-Key', token).send({ scopes: ['bots:read'] }), 201, { route: 'mintMyToken', path: '/v1/tokens', userId: user.id, tokenId: key.id });
    minted.push(mine.body.token);
    // SSO, with the shared secret right and wrong.
    await send(http().get('/sso/me').set(sso), 200, { route: 'getSsoMe', path: '/sso/me', userId: user.id, tokenId: null });
    await send(http().get('/sso/me').set({ ...sso, 'X-Keyward-SSO-Secret': `${SSO_SECRET}x` }), 401, { route: 'getSsoMe', path: '/sso/me', userId: null, tokenId: null });
    const ssoMint = await send(http().post('/sso/tokens').set(sso).set(CSRF).send({ name: 'laptop' }), 201, { route: 'mintSsoToken', path: '/sso/tokens', userId: user.id, tokenId: null });
    minted.push(ssoMint.body.token);
    // The metrics token, right and wrong.
    await send(http().get('/metrics').set('Authorization', `Bearer ${METRICS_TOKEN}`), 200, { route: 'getMetrics', path: '/metrics', userId: null, tokenId: null });
    await send(http().get('/metrics').set('Authorization', `Bearer ${METRICS_TOKEN.slice(0, -1)}`), 401, { route: 'getMetrics', path: '/metrics', userId: null, tokenId: null });
    // Minted keys used once.
    for (const t of minted.slice(1)) await send(http().get('/v1/me').set('X-API-Key', t), 200, { route: 'getMe', path: '/v1/me' });
    await settle();

    for (const t of minted) expect(t).toMatch(/^kw_live_/);
    const secrets: Record<string, string> = {
      token,
      tokenSecret: secretOf(token),
      wrongToken: wrong,
      wrongSecret: secretOf(wrong),
      adminKey: ADMIN_KEY,
      wrongAdminKey: WRONG_ADMIN_KEY,
      ssoSecret: SSO_SECRET,
      metricsToken: METRICS_TOKEN,
    };
    minted.forEach((t, i) => {
      secrets[`minted${i}`] = t;
      secrets[`minted${i}Secret`] = secretOf(t);
    });
    expectNoSecrets(sink.text, secrets);

    // One line per request, and each says what happened.
    const lines = sink.lines().filter((l) => l.msg === 'request');
    for (const { res, method, route, path, userId, tokenId } of sent) {
      const requestId = res.headers['x-request-id'] as string;
      expect(requestId).toMatch(/^[0-9a-f-]{36}$/);
      const mine = lines.filter((l) => l.request_id === requestId);
      expect(mine).toHaveLength(1);
      const line = mine[0]!;
      const failed = res.status >= 400;
      const expected: Record<string, unknown> = {
        level: 'info',
        time: expect.stringMatching(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/),
        service: 'keyward',
        msg: 'request',
        request_id: requestId,
        method,
        path,
        route,
        status: res.status,
        duration_ms: expect.any(Number),
        user_id: userId === undefined ? expect.any(Number) : userId,
        token_id: tokenId === undefined ? expect.any(Number) : tokenId,
        error_code: failed ? res.body.error.code : null,
      };
      expect(line).toEqual(expected);
      expect(Object.keys(line).sort()).toEqual(REQUEST_LINE_KEYS);
      expect(line.duration_ms as number).toBeGreaterThanOrEqual(0);
      expect(line.duration_ms as number).toBeLessThan(10_000);
    }
    // The unmatched path keeps its shape, so an operator can still tell what was asked for.
    expect(lines.find((l) => l.request_id === unmatched.headers['x-request-id'])?.path).toMatch(/^\/keys\/kw_live_[A-Za-z0-9]{12}_\[redacted\]$/);
  });

  test('an incoming X-Request-Id that is short and plain is kept, and the log line carries it', async () => {
    const { ctx, sink } = await loggedApp();
    const user = await createUser(ctx);
    const { token, id } = await mintToken(ctx, user.id);
    const res = await request(ctx.app).get('/v1/me').set('X-API-Key', token).set('X-Request-Id', 'edge-7f3a.42:trace');
    expect(res.headers['x-request-id']).toBe('edge-7f3a.42:trace');
    const err = await request(ctx.app).get('/v1/me').set('X-Request-Id', 'edge-401');
    expect(err.body.error.request_id).toBe('edge-401');
    await settle();
    const lines = sink.lines();
    expect(lines.find((l) => l.request_id === 'edge-7f3a.42:trace')).toMatchObject({ status: 200, user_id: user.id, token_id: id, error_code: null, route: 'getMe' });
    expect(lines.find((l) => l.request_id === 'edge-401')).toMatchObject({ status: 401, user_id: null, token_id: null, error_code: 'AUTHENTICATION_REQUIRED' });
  });

  test('an X-Request-Id that holds an API key is replaced, so the key does not reach the log', async () => {
    const { ctx, sink } = await loggedApp();
    const user = await createUser(ctx);
    const { token } = await mintToken(ctx, user.id);
    // A client (or a proxy) that copies the key into the request id. Both values are short and made of
    // the characters a plain id may have, so only their content tells them apart from one.
    for (const requestId of [token, `req:${token}`]) {
      const res = await request(ctx.app).get('/v1/me').set('X-API-Key', token).set('X-Request-Id', requestId);
      expect(res.status).toBe(200);
      await settle();
      const lines = sink.lines().filter((l) => l.msg === 'request');
      // The id the client was given is the one logged: correlation still works.
      expect(lines[lines.length - 1]!.request_id).toBe(res.headers['x-request-id']);
    }
    expectNoSecrets(sink.text, { token, tokenSecret: secretOf(token) });
  });

  test('a request refused because the server is draining is still one line with its error code', async () => {
    const sink = new LogSink();
    const lifecycle = { draining: false };
    const ctx = await createTestApp({ logDestination: sink, lifecycle });
    contexts.push(ctx);
    const user = await createUser(ctx);
    const { token } = await mintToken(ctx, user.id);
    lifecycle.draining = true;
    const res = await request(ctx.app).get('/v1/me').set('X-API-Key', token);
    expect(res.status).toBe(503);
    await settle();
    const line = sink.lines().find((l) => l.msg === 'request' && l.request_id === res.headers['x-request-id']);
    expect(line).toMatchObject({ level: 'error', status: 503, error_code: 'UNAVAILABLE', user_id: null, token_id: null });
    expectNoSecrets(sink.text, { token, admin: ADMIN_KEY });
  });
});

describe('a real server process', () => {
  test('its start-up, request and shutdown lines on stdout hold no credential', async () => {
    const dir = makeTempDir('logs');
    const adminKey = 'e2e-admin-key-ZYXWVUTSRQPONMLKJIHGFEDCBA0123456789';
    const server = await startServer({
      env: {
        ADMIN_API_TOKEN: adminKey,
        DATABASE_PATH: join(dir, 'k.db'),
        BCRYPT_ROUNDS: '4',
        PORT: '0',
        HOST: '127.0.0.1',
        SSO_TRUSTED_PROXIES: '127.0.0.1',
        SSO_SHARED_SECRET: SSO_SECRET,
        METRICS_TOKEN,
      },
    });
    const base = server.baseUrl;
    const adminHeaders = { 'X-Admin-API-Key': adminKey, 'Content-Type': 'application/json' };
    const created = await fetch(`${base}/admin/users`, { method: 'POST', headers: adminHeaders, body: JSON.stringify({ email: 'proc@example.com', name: adminKey }) });
    expect(created.status).toBe(201);
    const { id } = (await created.json()) as { id: number };
    const mintRes = await fetch(`${base}/admin/users/${id}/tokens`, { method: 'POST', headers: adminHeaders, body: '{}' });
    expect(mintRes.status).toBe(201);
    const { token } = (await mintRes.json()) as { token: string };
    const statuses = await Promise.all([
      fetch(`${base}/v1/me`, { headers: { 'X-API-Key': token } }),
      fetch(`${base}/v1/me`, { headers: { Authorization: `Bearer ${wrongSecret(token)}` } }),
      fetch(`${base}/v1/me?api_key=${token}`, { headers: { Cookie: `k=${token}` } }),
      fetch(`${base}/${token}`),
      fetch(`${base}/admin/users`, { headers: { 'X-Admin-API-Key': `${adminKey}0` } }),
      fetch(`${base}/sso/me`, { headers: { 'X-Forwarded-Email': 'proc@example.com', 'X-Keyward-SSO-Secret': SSO_SECRET } }),
      fetch(`${base}/metrics`, { headers: { Authorization: `Bearer ${METRICS_TOKEN}` } }),
    ]).then((all) => all.map((r) => r.status));
    expect(statuses).toEqual([200, 401, 401, 404, 401, 200, 200]);
    expect(await server.stop()).toEqual({ code: 0, signal: null });

    const lines = jsonLines(server.stdout);
    const messages = lines.map((l) => l.msg);
    expect(messages).toContain('keyward listening');
    expect(messages).toContain('shutting down: finishing in-flight requests');
    expect(messages).toContain('stopped');
    expect(lines.filter((l) => l.msg === 'request')).toHaveLength(9);
    for (const line of lines) expect(line).toMatchObject({ service: 'keyward', level: expect.any(String), time: expect.any(String) });
    expect(server.stderr).toBe('');
    expectNoSecrets(server.logs, {
      adminKey,
      wrongAdminKey: `${adminKey}0`,
      token,
      tokenSecret: secretOf(token),
      ssoSecret: SSO_SECRET,
      metricsToken: METRICS_TOKEN,
    });
  });
});
