import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { networkInterfaces } from 'node:os';
import request from 'supertest';
import { normalizeClientIp } from '../src/tokens/ip-allowlist';
import { checksum, randomBase62 } from '../src/tokens/token-format';
import { admin, createTestApp, createUser, expectError, mintToken, type TestContext } from './helpers/app';

/**
 * IP allowlists on tokens: what the admin may set, how it is stored, and which address a request is
 * judged by. The address is the socket's unless TRUST_PROXY names the peer as a proxy, so a client
 * cannot talk its way into an allowlist with a header.
 */

const contexts: TestContext[] = [];
async function app(env: Record<string, string> = {}): Promise<TestContext> {
  const ctx = await createTestApp({ env });
  contexts.push(ctx);
  return ctx;
}

const servers: Server[] = [];
afterEach(async () => {
  for (const server of servers.splice(0)) {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
  for (const ctx of contexts.splice(0)) await ctx.close();
});

const tokenRow = (ctx: TestContext, id: number) =>
  ctx.storage.db.selectFrom('tokens').selectAll().where('id', '=', id).executeTakeFirstOrThrow();
const tokenCount = async (ctx: TestContext) => (await ctx.storage.db.selectFrom('tokens').select('id').execute()).length;

const me = (ctx: TestContext, token: string, headers: Record<string, string> = {}) =>
  request(ctx.app).get('/v1/me').set('X-API-Key', token).set(headers);

/** The same selector with another secret and a valid checksum: it reaches bcrypt and fails there. */
function wrongSecret(token: string): string {
  const body = `${token.slice(0, token.length - 38)}${randomBase62(32)}`;
  return body + checksum(body);
}

async function userWithToken(ctx: TestContext, body: Record<string, unknown>) {
  const user = await createUser(ctx);
  return { user, minted: await mintToken(ctx, user.id, body) };
}

describe('allowed_ips when minting (POST /admin/users/{id}/tokens)', () => {
  test('stores the list in canonical form and shows it in the response, the DB and GET', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    const res = await request(ctx.app)
      .post(`/admin/users/${user.id}/tokens`)
      .set(admin)
      .send({ allowed_ips: ['10.1.2.3/8', '2001:0DB8:0:0:0:0:0:1', '203.0.113.9/32', '10.0.0.0/8', '2001:db8:abcd::/32', '::ffff:127.0.0.1'] });
    expect(res.status).toBe(201);
    const expected = ['10.0.0.0/8', '2001:db8::1', '203.0.113.9', '2001:db8::/32', '127.0.0.1'];
    expect(res.body.allowed_ips).toEqual(expected);
    expect(JSON.parse((await tokenRow(ctx, res.body.id)).allowed_ips!)).toEqual(expected);
    const got = await request(ctx.app).get(`/admin/tokens/${res.body.id}`).set(admin);
    expect(got.body.allowed_ips).toEqual(expected);
  });

  test('without allowed_ips, or with null, the token may be used from anywhere', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    const omitted = await mintToken(ctx, user.id);
    const nulled = await mintToken(ctx, user.id, { allowed_ips: null });
    for (const t of [omitted, nulled]) {
      expect((t as unknown as { allowed_ips: unknown }).allowed_ips).toBeNull();
      expect((await tokenRow(ctx, t.id)).allowed_ips).toBeNull();
      const res = await me(ctx, t.token);
      expect(res.status).toBe(200);
      expect(res.body.token.allowed_ips).toBeNull();
    }
  });

  test('names every bad entry in a 400 on allowed_ips and stores no token', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    const bad = ['1.2.3.4/33', '10.0.0.1/', 'nope', '1.2.3', '::g', '2001:db8::/129', '1.2.3.4/08x'];
    const res = await request(ctx.app).post(`/admin/users/${user.id}/tokens`).set(admin).send({ allowed_ips: ['10.0.0.1', ...bad, '::1'] });
    const error = expectError(res, 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual(bad.map((entry) => ({ field: 'allowed_ips', in: 'body', message: `"${entry}" is not an IPv4/IPv6 address or CIDR range` })));
    expect(await tokenCount(ctx)).toBe(0);
  });

  test.each([
    ['an empty list', [], 'allowed_ips', 'must NOT have fewer than 1 items'],
    ['101 entries', Array.from({ length: 101 }, (_, i) => `10.0.${i >> 8}.${i & 255}`), 'allowed_ips', 'must NOT have more than 100 items'],
    ['a single string instead of a list', '10.0.0.0/8', 'allowed_ips', 'must be array,null'],
    ['an entry that is not a string', ['10.0.0.1', 7], 'allowed_ips.1', 'must be string'],
    ['an empty entry', [''], 'allowed_ips.0', 'must NOT have fewer than 1 characters'],
  ])('refuses %s with 400 on allowed_ips and stores no token', async (_what, allowed, field, message) => {
    const ctx = await app();
    const user = await createUser(ctx);
    const res = await request(ctx.app).post(`/admin/users/${user.id}/tokens`).set(admin).send({ allowed_ips: allowed });
    const error = expectError(res, 400, 'VALIDATION_ERROR');
    expect(error.details).toContainEqual({ field, in: 'body', message });
    expect(await tokenCount(ctx)).toBe(0);
  });

  test('accepts exactly 100 entries', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    const entries = Array.from({ length: 100 }, (_, i) => `10.0.0.${i}`);
    const minted = await mintToken(ctx, user.id, { allowed_ips: entries });
    expect(JSON.parse((await tokenRow(ctx, minted.id)).allowed_ips!)).toEqual(entries);
  });

  test('rotation carries the allowlist over to the new token', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'] });
    const res = await request(ctx.app).post(`/admin/tokens/${minted.id}/rotate`).set(admin);
    expect(res.status).toBe(201);
    expect(res.body.allowed_ips).toEqual(['10.0.0.0/8']);
    expectError(await me(ctx, res.body.token), 403, 'FORBIDDEN_IP');
  });
});

describe('allowed_ips through PATCH /admin/tokens/{id}', () => {
  test('setting a list takes effect on the very next request, and null lifts it', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, {});
    expect((await me(ctx, minted.token)).status).toBe(200);

    const set = await request(ctx.app).patch(`/admin/tokens/${minted.id}`).set(admin).send({ allowed_ips: ['10.9.9.9/8', '2001:db8::/32'] });
    expect(set.status).toBe(200);
    expect(set.body.allowed_ips).toEqual(['10.0.0.0/8', '2001:db8::/32']);
    expect(JSON.parse((await tokenRow(ctx, minted.id)).allowed_ips!)).toEqual(['10.0.0.0/8', '2001:db8::/32']);
    // The secret is already cached from the first request: the allowlist must still be read anew.
    expectError(await me(ctx, minted.token), 403, 'FORBIDDEN_IP');

    const widened = await request(ctx.app).patch(`/admin/tokens/${minted.id}`).set(admin).send({ allowed_ips: ['10.0.0.0/8', '127.0.0.1'] });
    expect(widened.body.allowed_ips).toEqual(['10.0.0.0/8', '127.0.0.1']);
    expect((await me(ctx, minted.token)).status).toBe(200);

    const lifted = await request(ctx.app).patch(`/admin/tokens/${minted.id}`).set(admin).send({ allowed_ips: null });
    expect(lifted.status).toBe(200);
    expect(lifted.body.allowed_ips).toBeNull();
    expect((await tokenRow(ctx, minted.id)).allowed_ips).toBeNull();
    expect((await me(ctx, minted.token)).status).toBe(200);
  });

  test.each([
    ['bad entries', ['10.0.0.1', 'nope', '::g'], [
      { field: 'allowed_ips', in: 'body', message: '"nope" is not an IPv4/IPv6 address or CIDR range' },
      { field: 'allowed_ips', in: 'body', message: '"::g" is not an IPv4/IPv6 address or CIDR range' },
    ]],
    ['an empty list', [], [{ field: 'allowed_ips', in: 'body', message: 'must NOT have fewer than 1 items' }]],
    ['101 entries', Array.from({ length: 101 }, (_, i) => `10.0.1.${i}`), [{ field: 'allowed_ips', in: 'body', message: 'must NOT have more than 100 items' }]],
  ])('refuses %s with 400 and leaves the allowlist as it was', async (_what, allowed, details) => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { allowed_ips: ['127.0.0.1'] });
    const res = await request(ctx.app).patch(`/admin/tokens/${minted.id}`).set(admin).send({ allowed_ips: allowed });
    expect(expectError(res, 400, 'VALIDATION_ERROR').details).toEqual(details);
    expect((await tokenRow(ctx, minted.id)).allowed_ips).toBe('["127.0.0.1"]');
    expect((await me(ctx, minted.token)).status).toBe(200);
  });
});

describe('enforcement with TRUST_PROXY off (the default)', () => {
  test('a token allowed from the caller\'s address works, and /v1/me shows its allowlist', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { allowed_ips: ['127.0.0.1', '10.0.0.0/8'] });
    const res = await me(ctx, minted.token);
    expect(res.status).toBe(200);
    expect(res.body.token.allowed_ips).toEqual(['127.0.0.1', '10.0.0.0/8']);
  });

  test('a request from outside the allowlist is 403 FORBIDDEN_IP naming the address keyward saw', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'] });
    const error = expectError(await me(ctx, minted.token), 403, 'FORBIDDEN_IP');
    expect(error.details).toEqual({ ip: '127.0.0.1' });
    expect(error.message).toContain('127.0.0.1');
  });

  test('the Bearer form is held to the same allowlist', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'] });
    const res = await request(ctx.app).get('/v1/me').set('Authorization', `Bearer ${minted.token}`);
    expect(expectError(res, 403, 'FORBIDDEN_IP').details).toEqual({ ip: '127.0.0.1' });
  });

  test('a forged X-Forwarded-For from an untrusted peer does not get a token into its allowlist', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'] });
    const forged: Array<Record<string, string>> = [
      { 'X-Forwarded-For': '10.1.2.3' },
      { 'X-Forwarded-For': '10.1.2.3, 10.1.2.4' },
      { 'X-Real-IP': '10.1.2.3' },
      { Forwarded: 'for=10.1.2.3' },
      { 'X-Client-IP': '10.1.2.3' },
    ];
    for (const headers of forged) {
      const error = expectError(await me(ctx, minted.token, headers), 403, 'FORBIDDEN_IP');
      expect([headers, error.details]).toEqual([headers, { ip: '127.0.0.1' }]);
    }
  });

  test('a forged X-Forwarded-For from an untrusted peer does not lock a token out either', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { allowed_ips: ['127.0.0.1'] });
    const res = await me(ctx, minted.token, { 'X-Forwarded-For': '8.8.8.8' });
    expect(res.status).toBe(200);
    // And the use is recorded against the real peer, not the claimed one.
    expect(ctx.app.lastUse.pending(minted.id)).toEqual({ at: '2026-01-01T00:00:00.000Z', ip: '127.0.0.1' });
  });

  test('TRUST_PROXY naming some other proxy does not make the peer trusted', async () => {
    const ctx = await app({ TRUST_PROXY: '10.0.0.1' });
    const { minted } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'] });
    const error = expectError(await me(ctx, minted.token, { 'X-Forwarded-For': '10.1.2.3' }), 403, 'FORBIDDEN_IP');
    expect(error.details).toEqual({ ip: '127.0.0.1' });
  });
});

describe('enforcement with TRUST_PROXY=loopback (the peer is a trusted proxy)', () => {
  test('the forwarded address is the one judged: inside the list passes', async () => {
    const ctx = await app({ TRUST_PROXY: 'loopback' });
    const { minted } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'] });
    expect((await me(ctx, minted.token, { 'X-Forwarded-For': '10.1.2.3' })).status).toBe(200);
    expect(ctx.app.lastUse.pending(minted.id)?.ip).toBe('10.1.2.3');
  });

  test('the forwarded address is the one judged: outside the list fails even though the proxy itself is allowed', async () => {
    const ctx = await app({ TRUST_PROXY: 'loopback' });
    const { minted } = await userWithToken(ctx, { allowed_ips: ['127.0.0.1'] });
    const error = expectError(await me(ctx, minted.token, { 'X-Forwarded-For': '8.8.8.8' }), 403, 'FORBIDDEN_IP');
    expect(error.details).toEqual({ ip: '8.8.8.8' });
  });

  test('a client-supplied entry to the left of what the proxy appended is not believed', async () => {
    const ctx = await app({ TRUST_PROXY: 'loopback' });
    const { minted } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'] });
    // The client sent "X-Forwarded-For: 10.9.9.9"; the proxy appended the real client, 8.8.8.8.
    const error = expectError(await me(ctx, minted.token, { 'X-Forwarded-For': '10.9.9.9, 8.8.8.8' }), 403, 'FORBIDDEN_IP');
    expect(error.details).toEqual({ ip: '8.8.8.8' });
  });

  test('a forwarded IPv6 client is matched against IPv6 ranges', async () => {
    const ctx = await app({ TRUST_PROXY: 'loopback' });
    const { minted } = await userWithToken(ctx, { allowed_ips: ['2001:db8::/32'] });
    expect((await me(ctx, minted.token, { 'X-Forwarded-For': '2001:db8::5' })).status).toBe(200);
    const error = expectError(await me(ctx, minted.token, { 'X-Forwarded-For': '2001:db9::5' }), 403, 'FORBIDDEN_IP');
    expect(error.details).toEqual({ ip: '2001:db9::5' });
  });

  test('without X-Forwarded-For the proxy\'s own address is used', async () => {
    const ctx = await app({ TRUST_PROXY: 'loopback' });
    const { minted } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'] });
    expect(expectError(await me(ctx, minted.token), 403, 'FORBIDDEN_IP').details).toEqual({ ip: '127.0.0.1' });
  });

  test.each([
    ['loopback', 'not-an-address'],
    ['loopback', '10.1.2.3, <script>'],
    ['2', 'anything, 127.0.0.1'],
  ])('TRUST_PROXY=%s: a client address that is not an IP address (X-Forwarded-For: %s) is refused with 400, on every API', async (trust, forwarded) => {
    const ctx = await app({ TRUST_PROXY: trust });
    const { minted } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'] });
    const bad = { 'X-Forwarded-For': forwarded };
    const answers = [
      await me(ctx, minted.token, bad),
      await request(ctx.app).get('/admin/users').set(admin).set(bad),
      await request(ctx.app).get('/healthz').set(bad),
    ];
    for (const res of answers) {
      expect(expectError(res, 400, 'VALIDATION_ERROR').details).toEqual([{ field: 'X-Forwarded-For', in: 'header', message: 'must list IP addresses' }]);
    }
    expect(ctx.app.lastUse.pending(minted.id)).toBeUndefined();
  });
});

describe('the allowlist is checked after the key itself', () => {
  // Nobody outside the allowlist learns whether a key is good, revoked or expired from a 403:
  // each of these answers is the same as it would be from an allowed address.
  test('a wrong secret from a disallowed address is 401 INVALID_API_KEY', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'] });
    expectError(await me(ctx, wrongSecret(minted.token)), 401, 'INVALID_API_KEY');
    expect(ctx.app.lastUse.pending(minted.id)).toBeUndefined();
  });

  test('an unknown selector from a disallowed address is 401 INVALID_API_KEY', async () => {
    const ctx = await app();
    await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'] });
    const body = `kw_live_${randomBase62(12)}_${randomBase62(32)}`;
    expectError(await me(ctx, body + checksum(body)), 401, 'INVALID_API_KEY');
  });

  test('a revoked key from a disallowed address is 401 API_KEY_REVOKED', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'] });
    await request(ctx.app).delete(`/admin/tokens/${minted.id}`).set(admin).expect(204);
    expectError(await me(ctx, minted.token), 401, 'API_KEY_REVOKED');
  });

  test('an expired key from a disallowed address is 401 API_KEY_EXPIRED', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'], expires_in: 60 });
    ctx.clock.advance(61);
    expectError(await me(ctx, minted.token), 401, 'API_KEY_EXPIRED');
  });

  test('the allowlist comes before the route\'s scope: a disallowed caller does not learn what a route needs', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { allowed_ips: ['10.0.0.0/8'], scopes: ['bots:read'] });
    const res = await request(ctx.app).get('/v1/tokens').set('X-API-Key', minted.token);
    expect(expectError(res, 403, 'FORBIDDEN_IP').details).toEqual({ ip: '127.0.0.1' });
  });
});

describe('self-service keys stay within the calling key\'s allowlist (/v1/tokens)', () => {
  async function caller(ctx: TestContext) {
    return userWithToken(ctx, { allowed_ips: ['127.0.0.0/8'], scopes: ['tokens:read', 'tokens:write', 'bots:read'] });
  }
  const mintMine = (ctx: TestContext, token: string, body: Record<string, unknown>) =>
    request(ctx.app).post('/v1/tokens').set('X-API-Key', token).send(body);

  test('without allowed_ips the new key inherits the caller\'s list; a narrower list is accepted', async () => {
    const ctx = await app();
    const { minted } = await caller(ctx);
    const inherited = await mintMine(ctx, minted.token, { scopes: ['bots:read'] });
    expect(inherited.status).toBe(201);
    expect(inherited.body.allowed_ips).toEqual(['127.0.0.0/8']);
    const narrower = await mintMine(ctx, minted.token, { scopes: ['bots:read'], allowed_ips: ['127.0.0.1'] });
    expect(narrower.status).toBe(201);
    expect(JSON.parse((await tokenRow(ctx, narrower.body.id)).allowed_ips!)).toEqual(['127.0.0.1']);
  });

  test.each([
    ['a wider range', ['0.0.0.0/0']],
    ['a range beside it', ['10.0.0.0/8']],
    ['the other family', ['::1']],
    ['one entry inside and one outside', ['127.0.0.1', '10.0.0.1']],
  ])('refuses %s with 400 on allowed_ips and stores nothing', async (_what, allowed) => {
    const ctx = await app();
    const { minted } = await caller(ctx);
    const before = await tokenCount(ctx);
    const error = expectError(await mintMine(ctx, minted.token, { allowed_ips: allowed }), 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([{ field: 'allowed_ips', in: 'body', message: "must stay within this API key's own allowlist (127.0.0.0/8)" }]);
    expect(await tokenCount(ctx)).toBe(before);
  });

  test('refuses null (anywhere) from a key that has an allowlist', async () => {
    const ctx = await app();
    const { minted } = await caller(ctx);
    const error = expectError(await mintMine(ctx, minted.token, { allowed_ips: null }), 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([
      { field: 'allowed_ips', in: 'body', message: 'cannot be null: this API key has an allowlist, and keys it mints stay within it' },
    ]);
  });
});

/**
 * Real listening sockets, so the address under test is the kernel's and not a header. supertest
 * always dials 127.0.0.1, so these requests go to explicit URLs instead.
 */
const HAS_IPV6_LOOPBACK = Object.values(networkInterfaces())
  .flat()
  .some((i) => i?.address === '::1');
if (!HAS_IPV6_LOOPBACK) {
  // Only a host without ::1 on any interface skips these; the reason shows in the test output.
  console.warn('token-allowlist: this host has no ::1 address, so the IPv6 socket tests are skipped');
}
const ipv6Test = HAS_IPV6_LOOPBACK ? test : test.skip;

interface Listening {
  base: string;
  /** Remote addresses of the connections the server accepted, as the kernel reported them. */
  peers: string[];
}

async function listen(ctx: TestContext, host: string): Promise<Listening> {
  const server = createServer(ctx.app);
  servers.push(server);
  const peers: string[] = [];
  server.on('connection', (socket) => peers.push(socket.remoteAddress ?? ''));
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, host, () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  return { base: `http://${host === '::' ? '127.0.0.1' : host.includes(':') ? `[${host}]` : host}:${port}`, peers };
}

const meAt = (base: string, token: string, headers: Record<string, string> = {}) =>
  request(base).get('/v1/me').set('X-API-Key', token).set(headers);

describe('real sockets', () => {
  ipv6Test('over ::1, IPv6 entries match and IPv4 ones do not', async () => {
    const ctx = await app();
    const server = await listen(ctx, '::1');
    const user = await createUser(ctx);
    const cases: Array<[string[], number]> = [
      [['::1'], 200],
      [['::1/128'], 200],
      [['0:0:0:0:0:0:0:1'], 200],
      [['::/0'], 200],
      [['2001:db8::/32', '::1'], 200],
      [['2001:db8::/32'], 403],
      [['127.0.0.0/8'], 403],
      [['0.0.0.0/0'], 403],
    ];
    for (const [allowed, status] of cases) {
      const minted = await mintToken(ctx, user.id, { allowed_ips: allowed });
      const res = await meAt(server.base, minted.token);
      expect([allowed, res.status]).toEqual([allowed, status]);
      if (status === 403) expect(expectError(res, 403, 'FORBIDDEN_IP').details).toEqual({ ip: '::1' });
    }
    expect(new Set(server.peers)).toEqual(new Set(['::1']));
  });

  ipv6Test('over ::1, the last use is recorded as ::1', async () => {
    const ctx = await app();
    const server = await listen(ctx, '::1');
    const { minted } = await userWithToken(ctx, { allowed_ips: ['::1'] });
    expect((await meAt(server.base, minted.token)).status).toBe(200);
    const got = await request(ctx.app).get(`/admin/tokens/${minted.id}`).set(admin);
    expect(got.body).toMatchObject({ last_used_at: '2026-01-01T00:00:00.000Z', last_used_ip: '::1' });
  });

  test('over 127.0.0.1, IPv4 entries match and IPv6 ones do not', async () => {
    const ctx = await app();
    const server = await listen(ctx, '127.0.0.1');
    const user = await createUser(ctx);
    const cases: Array<[string[], number]> = [
      [['127.0.0.0/8'], 200],
      [['127.0.0.1'], 200],
      [['::ffff:127.0.0.1'], 200],
      [['0.0.0.0/0'], 200],
      [['::1'], 403],
      [['::/0'], 403],
      [['10.0.0.0/8'], 403],
    ];
    for (const [allowed, status] of cases) {
      const minted = await mintToken(ctx, user.id, { allowed_ips: allowed });
      const res = await meAt(server.base, minted.token);
      expect([allowed, res.status]).toEqual([allowed, status]);
      if (status === 403) expect(expectError(res, 403, 'FORBIDDEN_IP').details).toEqual({ ip: '127.0.0.1' });
    }
    expect(new Set(server.peers)).toEqual(new Set(['127.0.0.1']));
  });

  ipv6Test('an IPv4 client on a dual-stack socket arrives as ::ffff:127.0.0.1 and matches 127.0.0.0/8', async () => {
    const ctx = await app();
    const server = await listen(ctx, '::');
    const user = await createUser(ctx);
    const allowed = await mintToken(ctx, user.id, { allowed_ips: ['127.0.0.0/8'] });
    const refused = await mintToken(ctx, user.id, { allowed_ips: ['10.0.0.0/8', '::1'] });

    expect((await meAt(server.base, allowed.token)).status).toBe(200);
    const error = expectError(await meAt(server.base, refused.token), 403, 'FORBIDDEN_IP');
    expect(normalizeClientIp((error.details as { ip: string }).ip)).toBe('127.0.0.1');
    // Proves the scenario is the one named: the kernel reported the mapped form.
    expect(new Set(server.peers)).toEqual(new Set(['::ffff:127.0.0.1']));
  });

  ipv6Test('over ::1 with TRUST_PROXY off, a forged X-Forwarded-For changes nothing', async () => {
    const ctx = await app();
    const server = await listen(ctx, '::1');
    const user = await createUser(ctx);
    const remote = await mintToken(ctx, user.id, { allowed_ips: ['2001:db8::/32'] });
    const local = await mintToken(ctx, user.id, { allowed_ips: ['::1'] });
    const error = expectError(await meAt(server.base, remote.token, { 'X-Forwarded-For': '2001:db8::5' }), 403, 'FORBIDDEN_IP');
    expect(error.details).toEqual({ ip: '::1' });
    expect((await meAt(server.base, local.token, { 'X-Forwarded-For': '2001:db9::5' })).status).toBe(200);
  });

  ipv6Test('over ::1 with TRUST_PROXY=loopback, the forwarded address is judged both ways', async () => {
    const ctx = await app({ TRUST_PROXY: 'loopback' });
    const server = await listen(ctx, '::1');
    const user = await createUser(ctx);
    const remote = await mintToken(ctx, user.id, { allowed_ips: ['2001:db8::/32'] });
    const local = await mintToken(ctx, user.id, { allowed_ips: ['::1'] });
    expect((await meAt(server.base, remote.token, { 'X-Forwarded-For': '2001:db8::5' })).status).toBe(200);
    const error = expectError(await meAt(server.base, local.token, { 'X-Forwarded-For': '2001:db9::5' }), 403, 'FORBIDDEN_IP');
    expect(error.details).toEqual({ ip: '2001:db9::5' });
  });

  test('over 127.0.0.1 with TRUST_PROXY=loopback, the forwarded address is judged both ways', async () => {
    const ctx = await app({ TRUST_PROXY: 'loopback' });
    const server = await listen(ctx, '127.0.0.1');
    const user = await createUser(ctx);
    const remote = await mintToken(ctx, user.id, { allowed_ips: ['10.0.0.0/8'] });
    const local = await mintToken(ctx, user.id, { allowed_ips: ['127.0.0.1'] });
    expect((await meAt(server.base, remote.token, { 'X-Forwarded-For': '10.1.2.3' })).status).toBe(200);
    const error = expectError(await meAt(server.base, local.token, { 'X-Forwarded-For': '8.8.8.8' }), 403, 'FORBIDDEN_IP');
    expect(error.details).toEqual({ ip: '8.8.8.8' });
  });
});
