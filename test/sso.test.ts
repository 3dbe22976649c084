import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { networkInterfaces } from 'node:os';
import type { KyselyPlugin } from 'kysely';
import request from 'supertest';
import { createApp } from '../src/app';
import { createLogger } from '../src/logger';
import { admin, createTestApp, createUser, expectError, mintToken, type TestContext } from './helpers/app';

/**
 * Single sign-on behind oauth2-proxy. The identity headers are only as good as the peer that sent them,
 * so most of these tests are about who is NOT believed: an untrusted address, a header-based address
 * (X-Forwarded-For), a missing or wrong shared secret. Then how a person maps onto a keyward user, the
 * self-service key routes, their CSRF guard and the rate limit they share with the user's API keys.
 */

// supertest dials 127.0.0.1; the app may see it as ::ffff:127.0.0.1, which must count as 127.0.0.1.
const TRUSTED = { SSO_TRUSTED_PROXIES: '127.0.0.1, ::1' };
// The same configuration with only a proxy that is not us: our requests are forged as far as keyward knows.
const UNTRUSTED = { SSO_TRUSTED_PROXIES: '10.0.0.5' };
const SECRET = 'sso-shared-secret-0123456789abcdefghij';
const CSRF = { 'X-Keyward-CSRF': '1' };

const contexts: TestContext[] = [];
const interleaving: { stop: () => Promise<void> }[] = [];
async function app(env: Record<string, string> = {}): Promise<TestContext> {
  const ctx = await createTestApp({ env });
  contexts.push(ctx);
  return ctx;
}

const servers: Server[] = [];
afterEach(async () => {
  // The racing apps share a context's database, so they stop before it closes.
  for (const racing of interleaving.splice(0)) await racing.stop();
  for (const server of servers.splice(0)) {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
  for (const ctx of contexts.splice(0)) await ctx.close();
});

/**
 * In-memory SQLite answers every query within the same microtask run, so requests sent "at once" would
 * still be handled one after another and a check-then-write race could never show. This gives the same
 * database a second app whose every query yields to the event loop, so concurrent requests interleave.
 */
const yieldEveryQuery: KyselyPlugin = {
  transformQuery: (args) => args.node,
  transformResult: async (args) => {
    await new Promise((resolve) => setImmediate(resolve));
    return args.result;
  },
};
function interleavingApp(ctx: TestContext) {
  const app = createApp({ config: ctx.config, db: ctx.storage.db.withPlugin(yieldEveryQuery), clock: ctx.clock, logger: createLogger('silent') });
  interleaving.push({
    stop: async () => {
      app.bots.stop();
      await app.lastUse.stop();
    },
  });
  return app;
}

interface Person {
  email: string;
  subject?: string;
  username?: string;
  groups?: string;
}

/** What oauth2-proxy forwards for a signed-in person. */
function identity(person: Person, prefix = 'X-Forwarded-'): Record<string, string> {
  const headers: Record<string, string> = { [`${prefix}Email`]: person.email };
  if (person.subject !== undefined) headers[`${prefix}User`] = person.subject;
  if (person.username !== undefined) headers[`${prefix}Preferred-Username`] = person.username;
  if (person.groups !== undefined) headers[`${prefix}Groups`] = person.groups;
  return headers;
}

const ALICE: Person = { email: 'alice@example.com', subject: 'idp|alice', username: 'alice', groups: 'staff, keyward-users' };

const get = (ctx: TestContext, path: string, person: Person, extra: Record<string, string> = {}) =>
  request(ctx.app).get(path).set(identity(person)).set(extra);
const post = (ctx: TestContext, path: string, person: Person, body?: object, extra: Record<string, string> = CSRF) => {
  const req = request(ctx.app).post(path).set(identity(person)).set(extra);
  return body === undefined ? req : req.send(body);
};
const del = (ctx: TestContext, path: string, person: Person, extra: Record<string, string> = CSRF) =>
  request(ctx.app).delete(path).set(identity(person)).set(extra);

const userRow = (ctx: TestContext, id: number) => ctx.storage.db.selectFrom('users').selectAll().where('id', '=', id).executeTakeFirstOrThrow();
const allUsers = (ctx: TestContext) => ctx.storage.db.selectFrom('users').selectAll().orderBy('id').execute();
const tokenRow = (ctx: TestContext, id: number) => ctx.storage.db.selectFrom('tokens').selectAll().where('id', '=', id).executeTakeFirstOrThrow();
const allTokens = (ctx: TestContext) => ctx.storage.db.selectFrom('tokens').selectAll().orderBy('id').execute();

/** Every SSO route, each with what it needs to get past the CSRF check, so a 401 is about identity only. */
function everyRoute(ctx: TestContext, person: Person, tokenId: number, extra: Record<string, string> = {}) {
  return [
    get(ctx, '/sso/me', person, extra),
    get(ctx, '/sso/tokens', person, extra),
    post(ctx, '/sso/tokens', person, {}, { ...CSRF, ...extra }),
    post(ctx, `/sso/tokens/${tokenId}/rotate`, person, undefined, { ...CSRF, ...extra }),
    del(ctx, `/sso/tokens/${tokenId}`, person, { ...CSRF, ...extra }),
  ];
}

/** A user linked to ALICE with one key, the state every forged request must leave untouched. */
async function aliceWithKey(ctx: TestContext) {
  const user = await createUser(ctx, { email: ALICE.email });
  await ctx.storage.db.updateTable('users').set({ sso_subject: ALICE.subject! }).where('id', '=', user.id).execute();
  const key = await mintToken(ctx, user.id, { name: 'existing' });
  return { user, key };
}

describe('whose identity headers are believed', () => {
  test('with SSO_TRUSTED_PROXIES empty, SSO is off: every route is 401 AUTHENTICATION_REQUIRED and nothing changes', async () => {
    const ctx = await app();
    const { key } = await aliceWithKey(ctx);
    for (const res of await Promise.all(everyRoute(ctx, ALICE, key.id))) {
      expect(expectError(res, 401, 'AUTHENTICATION_REQUIRED').message).toMatch(/SSO_TRUSTED_PROXIES/);
    }
    expect((await allTokens(ctx)).map((t) => [t.id, t.revoked_at, t.rotated_to])).toEqual([[key.id, null, null]]);
  });

  test('a forged identity from an untrusted address gets nothing on any route, and changes nothing', async () => {
    const ctx = await app(UNTRUSTED);
    const { user, key } = await aliceWithKey(ctx);
    // An unlinked user too: a forged request must not even link a subject to it.
    const bob = await createUser(ctx, { email: 'bob@example.com' });
    for (const res of await Promise.all([
      ...everyRoute(ctx, ALICE, key.id),
      ...everyRoute(ctx, { email: 'bob@example.com', subject: 'idp|mallory' }, key.id),
    ])) {
      expectError(res, 401, 'AUTHENTICATION_REQUIRED');
      expect(res.headers['ratelimit-remaining']).toBeUndefined();
    }
    expect((await allTokens(ctx)).map((t) => [t.id, t.user_id, t.revoked_at, t.rotated_to])).toEqual([[key.id, user.id, null, null]]);
    expect((await userRow(ctx, bob.id)).sso_subject).toBeNull();
    expect(await allUsers(ctx)).toHaveLength(2);
  });

  test('an untrusted request is not made trusted by X-Forwarded-For, even with TRUST_PROXY trusting the loopback peer', async () => {
    const ctx = await app({ ...UNTRUSTED, TRUST_PROXY: 'loopback' });
    const { key } = await aliceWithKey(ctx);
    for (const xff of ['10.0.0.5', '203.0.113.1, 10.0.0.5']) {
      for (const res of await Promise.all(everyRoute(ctx, ALICE, key.id, { 'X-Forwarded-For': xff }))) {
        expectError(res, 401, 'AUTHENTICATION_REQUIRED');
      }
    }
    expect((await allTokens(ctx)).map((t) => [t.id, t.revoked_at])).toEqual([[key.id, null]]);
  });

  test('a trusted peer stays trusted whatever X-Forwarded-For says (the proxy appends the browser\'s address)', async () => {
    const ctx = await app({ ...TRUSTED, TRUST_PROXY: 'loopback' });
    const { user } = await aliceWithKey(ctx);
    const res = await get(ctx, '/sso/me', ALICE, { 'X-Forwarded-For': '198.51.100.7' });
    expect(res.status).toBe(200);
    expect(res.body.user.id).toBe(user.id);
  });

  test('CIDR ranges are accepted in SSO_TRUSTED_PROXIES', async () => {
    const trusted = await app({ SSO_TRUSTED_PROXIES: '127.0.0.0/8' });
    await aliceWithKey(trusted);
    expect((await get(trusted, '/sso/me', ALICE)).status).toBe(200);

    const untrusted = await app({ SSO_TRUSTED_PROXIES: '10.0.0.0/8, 2001:db8::/32' });
    await aliceWithKey(untrusted);
    expectError(await get(untrusted, '/sso/me', ALICE), 401, 'AUTHENTICATION_REQUIRED');
  });

  test('with SSO_SHARED_SECRET set, a missing or wrong X-Keyward-SSO-Secret is 401; the right one is 200', async () => {
    const ctx = await app({ ...TRUSTED, SSO_SHARED_SECRET: SECRET });
    const { key } = await aliceWithKey(ctx);
    for (const sent of [undefined, '', 'wrong', SECRET.slice(0, -1), `${SECRET}x`, SECRET.toUpperCase()]) {
      const extra: Record<string, string> = sent === undefined ? {} : { 'X-Keyward-SSO-Secret': sent };
      for (const res of await Promise.all(everyRoute(ctx, ALICE, key.id, extra))) {
        expectError(res, 401, 'AUTHENTICATION_REQUIRED');
      }
    }
    expect((await allTokens(ctx)).map((t) => [t.id, t.revoked_at, t.rotated_to])).toEqual([[key.id, null, null]]);

    const ok = await get(ctx, '/sso/me', ALICE, { 'X-Keyward-SSO-Secret': SECRET });
    expect(ok.status).toBe(200);
    expect(ok.body.identity.email).toBe(ALICE.email);
  });

  test('the right shared secret does not help a request from an untrusted address', async () => {
    const ctx = await app({ ...UNTRUSTED, SSO_SHARED_SECRET: SECRET });
    await aliceWithKey(ctx);
    expectError(await get(ctx, '/sso/me', ALICE, { 'X-Keyward-SSO-Secret': SECRET }), 401, 'AUTHENTICATION_REQUIRED');
  });

  test('a trusted proxy that sends no email (or a blank one) gets 401, whatever else it sends', async () => {
    const ctx = await app({ ...TRUSTED, SSO_AUTO_PROVISION: 'on' });
    await aliceWithKey(ctx);
    const noEmail = request(ctx.app).get('/sso/me').set({ 'X-Forwarded-User': ALICE.subject!, 'X-Forwarded-Preferred-Username': 'alice' });
    expectError(await noEmail, 401, 'AUTHENTICATION_REQUIRED');
    expectError(await get(ctx, '/sso/me', { ...ALICE, email: '   ' }), 401, 'AUTHENTICATION_REQUIRED');
    expect(await allUsers(ctx)).toHaveLength(1);
  });

  test('an email header that is not an email address is 401 and provisions, links or matches nothing', async () => {
    const ctx = await app({ ...TRUSTED, SSO_AUTO_PROVISION: 'on' });
    await aliceWithKey(ctx);
    for (const email of ['alice', 'alice@', '@example.com', 'alice@example.com, mallory@example.com', 'alice smith@example.com', `${'a'.repeat(250)}@example.com`]) {
      const res = await get(ctx, '/sso/me', { ...ALICE, email });
      expectError(res, 401, 'AUTHENTICATION_REQUIRED');
      expect(res.body.error.message).toMatch(/not an email address/);
    }
    const users = await allUsers(ctx);
    expect(users).toHaveLength(1);
    expect(users[0]!.email).toBe(ALICE.email);
  });

  test('an identity longer than the admin API allows (subject 256, username 200, 100 groups of 256) is 401 and stores nothing', async () => {
    const ctx = await app({ ...TRUSTED, SSO_AUTO_PROVISION: 'on' });
    const longest: Person = {
      email: 'long@example.com',
      subject: 's'.repeat(256),
      username: 'u'.repeat(200),
      // 100 groups, one of them 256 characters long (100 that long would not fit in 16 KiB of headers).
      groups: [...Array.from({ length: 99 }, (_, i) => `group-${i}`), 'g'.repeat(256)].join(','),
    };
    const fits = await get(ctx, '/sso/me', longest);
    expect(fits.status).toBe(200);
    expect(fits.body.identity.groups).toHaveLength(100);
    for (const tooLong of [
      { ...longest, email: 'a@example.com', subject: 's'.repeat(257) },
      { ...longest, email: 'b@example.com', username: 'u'.repeat(201) },
      { ...longest, email: 'c@example.com', groups: `${longest.groups},one-more` },
      { ...longest, email: 'd@example.com', groups: 'g'.repeat(257) },
    ]) {
      const res = await get(ctx, '/sso/me', tooLong);
      expectError(res, 401, 'AUTHENTICATION_REQUIRED');
      expect(res.body.error.message).toMatch(/longer than keyward accepts/);
    }
    expect((await allUsers(ctx)).map((u) => u.email)).toEqual(['long@example.com']);
  });

  test('SSO_HEADER_PREFIX=X-Auth-Request- reads the X-Auth-Request-* headers and ignores X-Forwarded-*', async () => {
    const ctx = await app({ ...TRUSTED, SSO_HEADER_PREFIX: 'X-Auth-Request-' });
    const { user } = await aliceWithKey(ctx);
    const res = await request(ctx.app).get('/sso/me').set(identity(ALICE, 'X-Auth-Request-'));
    expect(res.status).toBe(200);
    expect(res.body.user.id).toBe(user.id);
    expect(res.body.identity).toEqual({ email: ALICE.email, subject: ALICE.subject, username: 'alice', groups: ['staff', 'keyward-users'] });

    expectError(await get(ctx, '/sso/me', ALICE), 401, 'AUTHENTICATION_REQUIRED');
  });
});

/** Real listening sockets: the address under test is the kernel's, not anything the client wrote. */
const HAS_IPV6_LOOPBACK = Object.values(networkInterfaces())
  .flat()
  .some((i) => i?.address === '::1');
if (!HAS_IPV6_LOOPBACK) console.warn('sso: this host has no ::1 address, so the IPv6 socket tests are skipped');
const ipv6Test = HAS_IPV6_LOOPBACK ? test : test.skip;

async function listen(ctx: TestContext, host: string): Promise<{ base: string; peers: string[] }> {
  const server = createServer(ctx.app);
  servers.push(server);
  const peers: string[] = [];
  server.on('connection', (socket) => peers.push(socket.remoteAddress ?? ''));
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, host, () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  return { base: `http://${host.includes(':') ? `[${host}]` : host}:${port}`, peers };
}

describe('real sockets', () => {
  ipv6Test("over ::1, SSO_TRUSTED_PROXIES '::1' is believed and '127.0.0.1' is not", async () => {
    const v6 = await app({ SSO_TRUSTED_PROXIES: '::1' });
    const { user } = await aliceWithKey(v6);
    const server = await listen(v6, '::1');
    const res = await request(server.base).get('/sso/me').set(identity(ALICE));
    expect(res.status).toBe(200);
    expect(res.body.user.id).toBe(user.id);
    expect(new Set(server.peers)).toEqual(new Set(['::1']));

    const v4only = await app({ SSO_TRUSTED_PROXIES: '127.0.0.1' });
    await aliceWithKey(v4only);
    const other = await listen(v4only, '::1');
    expectError(await request(other.base).get('/sso/me').set(identity(ALICE)), 401, 'AUTHENTICATION_REQUIRED');
  });

  test("over 127.0.0.1, SSO_TRUSTED_PROXIES '::1' alone is not believed", async () => {
    const ctx = await app({ SSO_TRUSTED_PROXIES: '::1' });
    await aliceWithKey(ctx);
    const server = await listen(ctx, '127.0.0.1');
    expectError(await request(server.base).get('/sso/me').set(identity(ALICE)), 401, 'AUTHENTICATION_REQUIRED');
  });
});

describe('which keyward user a signed-in person is', () => {
  test('matched by email, case-insensitively, on first sign-in: the subject is linked and shown to the admin', async () => {
    const ctx = await app(TRUSTED);
    const user = await createUser(ctx, { email: 'Alice@Example.com' });
    const res = await get(ctx, '/sso/me', { ...ALICE, email: 'ALICE@example.COM' });
    expect(res.status).toBe(200);
    expect(res.body.user.id).toBe(user.id);
    expect((await userRow(ctx, user.id)).sso_subject).toBe(ALICE.subject);
    const shown = await request(ctx.app).get(`/admin/users/${user.id}`).set(admin);
    expect(shown.body.sso_subject).toBe(ALICE.subject);

    // From now on the subject decides, even if the person's email changes at the identity provider.
    const renamed = await get(ctx, '/sso/me', { ...ALICE, email: 'alice.new@example.com' });
    expect(renamed.status).toBe(200);
    expect(renamed.body.user.id).toBe(user.id);
  });

  test('without a user header the email stands in for the subject', async () => {
    const ctx = await app(TRUSTED);
    const user = await createUser(ctx, { email: ALICE.email });
    const res = await get(ctx, '/sso/me', { email: ALICE.email });
    expect(res.status).toBe(200);
    expect(res.body.identity).toEqual({ email: ALICE.email, subject: ALICE.email, username: null, groups: [] });
    expect((await userRow(ctx, user.id)).sso_subject).toBe(ALICE.email);
  });

  test('an email that belongs to a user linked to another subject is 403 SSO_ACCESS_DENIED, and the link stays', async () => {
    const ctx = await app({ ...TRUSTED, SSO_AUTO_PROVISION: 'on' });
    const { user } = await aliceWithKey(ctx);
    const impostor = { ...ALICE, email: 'ALICE@example.com', subject: 'idp|someone-else' };
    expectError(await get(ctx, '/sso/me', impostor), 403, 'SSO_ACCESS_DENIED');
    expectError(await post(ctx, '/sso/tokens', impostor, {}), 403, 'SSO_ACCESS_DENIED');
    expect((await userRow(ctx, user.id)).sso_subject).toBe(ALICE.subject);
    expect(await allUsers(ctx)).toHaveLength(1);
    expect(await allTokens(ctx)).toHaveLength(1);
  });

  test('an unknown person is 403 SSO_ACCESS_DENIED when SSO_AUTO_PROVISION is off (the default), and no user is created', async () => {
    const ctx = await app(TRUSTED);
    expect(ctx.config.ssoAutoProvision).toBe(false);
    expectError(await get(ctx, '/sso/me', ALICE), 403, 'SSO_ACCESS_DENIED');
    expectError(await post(ctx, '/sso/tokens', ALICE, {}), 403, 'SSO_ACCESS_DENIED');
    expect(await allUsers(ctx)).toEqual([]);
    expect(await allTokens(ctx)).toEqual([]);
  });

  test('SSO_AUTO_PROVISION creates an unknown person as a user with the configured defaults, once', async () => {
    const ctx = await app({ ...TRUSTED, SSO_AUTO_PROVISION: 'on', SSO_DEFAULT_MAX_CONCURRENT_BOTS: '7', RATE_LIMIT_PER_MINUTE: '42' });
    const res = await get(ctx, '/sso/me', { ...ALICE, email: 'Alice@Example.com' });
    expect(res.status).toBe(200);
    const users = await allUsers(ctx);
    expect(users).toHaveLength(1);
    expect(users[0]).toMatchObject({
      email: 'Alice@Example.com',
      email_lower: 'alice@example.com',
      name: 'alice',
      max_concurrent_bots: 7,
      rate_limit_per_minute: 42,
      sso_subject: ALICE.subject,
      disabled_at: null,
      deleted_at: null,
    });
    expect(res.body).toEqual({
      user: {
        id: users[0]!.id,
        email: 'Alice@Example.com',
        name: 'alice',
        max_concurrent_bots: 7,
        rate_limit_per_minute: 42,
        credits: 0,
        external_id: null,
        sso_subject: ALICE.subject,
        data: null,
        disabled: false,
        disabled_at: null,
        created_at: '2026-01-01T00:00:00.000Z',
        updated_at: '2026-01-01T00:00:00.000Z',
      },
      identity: { email: 'Alice@Example.com', subject: ALICE.subject, username: 'alice', groups: ['staff', 'keyward-users'] },
      allowed_scopes: ['bots:read', 'bots:write'],
    });

    expect((await get(ctx, '/sso/me', ALICE)).body.user.id).toBe(users[0]!.id);
    expect(await allUsers(ctx)).toHaveLength(1);
  });

  test('concurrent first requests of the same new person create exactly one user', async () => {
    const ctx = await app({ ...TRUSTED, SSO_AUTO_PROVISION: 'on' });
    const racing = interleavingApp(ctx);
    const responses = await Promise.all(Array.from({ length: 6 }, () => request(racing).get('/sso/me').set(identity(ALICE))));
    expect(responses.map((r) => r.status)).toEqual(Array(6).fill(200));
    const users = await allUsers(ctx);
    expect(users.map((u) => [u.email, u.sso_subject])).toEqual([[ALICE.email, ALICE.subject]]);
    expect(new Set(responses.map((r) => r.body.user.id))).toEqual(new Set([users[0]!.id]));
  });

  // Fails today: SsoService.find falls through to "no keyward user" when linkSsoSubject loses the race.
  test('concurrent first requests of a person the admin created all reach that user (auto-provisioning off)', async () => {
    // Two tabs restoring after sign-in: both see the user unlinked, one links it. The other must then find
    // the user by its subject, not fall through to "no keyward user for you".
    const ctx = await app(TRUSTED);
    const user = await createUser(ctx, { email: ALICE.email });
    const racing = interleavingApp(ctx);
    const responses = await Promise.all(Array.from({ length: 6 }, () => request(racing).get('/sso/me').set(identity(ALICE))));
    expect(responses.map((r) => [r.status, r.body.user?.id ?? r.body.error?.code])).toEqual(Array(6).fill([200, user.id]));
    expect((await userRow(ctx, user.id)).sso_subject).toBe(ALICE.subject);
  });

  test('SSO_ALLOWED_DOMAINS applies to every sign-in, not only to provisioning', async () => {
    const ctx = await app({ ...TRUSTED, SSO_AUTO_PROVISION: 'on', SSO_ALLOWED_DOMAINS: 'Example.com, corp.example.org' });
    const { user } = await aliceWithKey(ctx);

    // Alice is linked by subject, but today the proxy vouches for an address in another domain.
    expectError(await get(ctx, '/sso/me', { ...ALICE, email: 'alice@evil.test' }), 403, 'SSO_ACCESS_DENIED');
    expectError(await get(ctx, '/sso/me', { email: 'carol@sub.example.com', subject: 'idp|carol' }), 403, 'SSO_ACCESS_DENIED');
    expectError(await get(ctx, '/sso/me', { email: 'dave@example.com.evil.test', subject: 'idp|dave' }), 403, 'SSO_ACCESS_DENIED');
    expect((await allUsers(ctx)).map((u) => u.id)).toEqual([user.id]);

    expect((await get(ctx, '/sso/me', { ...ALICE, email: 'alice@EXAMPLE.COM' })).body.user.id).toBe(user.id);
    const erin = await get(ctx, '/sso/me', { email: 'erin@corp.example.org', subject: 'idp|erin' });
    expect(erin.status).toBe(200);
    expect(await allUsers(ctx)).toHaveLength(2);
  });

  test('SSO_ALLOWED_GROUPS applies to every sign-in: someone in none of them is 403 SSO_ACCESS_DENIED', async () => {
    const ctx = await app({ ...TRUSTED, SSO_AUTO_PROVISION: 'on', SSO_ALLOWED_GROUPS: 'keyward-users, admins' });
    const { user, key } = await aliceWithKey(ctx);

    for (const groups of [undefined, '', 'staff', 'keyward-users-old, staff', 'Keyward-Users']) {
      expectError(await get(ctx, '/sso/me', { ...ALICE, groups }), 403, 'SSO_ACCESS_DENIED');
      expectError(await del(ctx, `/sso/tokens/${key.id}`, { ...ALICE, groups }), 403, 'SSO_ACCESS_DENIED');
    }
    expectError(await get(ctx, '/sso/me', { email: 'frank@example.com', subject: 'idp|frank', groups: 'staff' }), 403, 'SSO_ACCESS_DENIED');
    expect((await allUsers(ctx)).map((u) => u.id)).toEqual([user.id]);
    expect((await tokenRow(ctx, key.id)).revoked_at).toBeNull();

    expect((await get(ctx, '/sso/me', { ...ALICE, groups: 'staff,admins' })).body.user.id).toBe(user.id);
    expect((await get(ctx, '/sso/me', ALICE)).status).toBe(200);
  });

  test('a disabled user is 403 USER_DISABLED on every route, and is back once enabled', async () => {
    const ctx = await app(TRUSTED);
    const { user, key } = await aliceWithKey(ctx);
    expect((await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: true })).status).toBe(200);
    for (const res of await Promise.all(everyRoute(ctx, ALICE, key.id))) expectError(res, 403, 'USER_DISABLED');
    expect((await allTokens(ctx)).map((t) => [t.id, t.revoked_at, t.rotated_to])).toEqual([[key.id, null, null]]);

    expect((await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: false })).status).toBe(200);
    expect((await get(ctx, '/sso/me', ALICE)).status).toBe(200);
  });

  test("a deleted user's subject and email are provisioned afresh, with none of the old keys", async () => {
    const ctx = await app({ ...TRUSTED, SSO_AUTO_PROVISION: 'on' });
    const { user, key } = await aliceWithKey(ctx);
    expect((await request(ctx.app).delete(`/admin/users/${user.id}`).set(admin)).status).toBe(204);

    const res = await get(ctx, '/sso/me', ALICE);
    expect(res.status).toBe(200);
    expect(res.body.user.id).not.toBe(user.id);
    expect(res.body.user).toMatchObject({ email: ALICE.email, sso_subject: ALICE.subject });
    expect((await userRow(ctx, user.id)).deleted_at).not.toBeNull();
    const list = await get(ctx, '/sso/tokens', ALICE);
    expect(list.body.data).toEqual([]);
    expectError(await del(ctx, `/sso/tokens/${key.id}`, ALICE), 404, 'NOT_FOUND');
  });

  test("a deleted user's person is 403 SSO_ACCESS_DENIED without auto-provisioning, never the deleted user", async () => {
    const ctx = await app(TRUSTED);
    const { user } = await aliceWithKey(ctx);
    expect((await request(ctx.app).delete(`/admin/users/${user.id}`).set(admin)).status).toBe(204);
    expectError(await get(ctx, '/sso/me', ALICE), 403, 'SSO_ACCESS_DENIED');
  });
});

describe('PATCH /admin/users/{id} sso_subject', () => {
  test('links a subject, so the person gets in whatever email the proxy sends; null unlinks it', async () => {
    const ctx = await app(TRUSTED);
    const user = await createUser(ctx, { email: 'a.smith@example.com' });
    const linked = await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ sso_subject: 'idp|alice' });
    expect(linked.status).toBe(200);
    expect(linked.body.sso_subject).toBe('idp|alice');
    expect((await userRow(ctx, user.id)).sso_subject).toBe('idp|alice');
    expect((await get(ctx, '/sso/me', ALICE)).body.user.id).toBe(user.id);

    const unlinked = await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ sso_subject: null });
    expect(unlinked.status).toBe(200);
    expect(unlinked.body.sso_subject).toBeNull();
    expect((await userRow(ctx, user.id)).sso_subject).toBeNull();
    expectError(await get(ctx, '/sso/me', ALICE), 403, 'SSO_ACCESS_DENIED');
  });

  test("linking a subject another user has is 409 CONFLICT naming that user, and changes nothing", async () => {
    const ctx = await app(TRUSTED);
    const { user: holder } = await aliceWithKey(ctx);
    const other = await createUser(ctx);
    const error = expectError(
      await request(ctx.app).patch(`/admin/users/${other.id}`).set(admin).send({ sso_subject: ALICE.subject, name: 'changed' }),
      409,
      'CONFLICT',
    );
    expect(error.details).toEqual({ existing_id: holder.id });
    expect(await userRow(ctx, other.id)).toMatchObject({ sso_subject: null, name: null });

    // Re-linking the holder's own subject is not a conflict.
    expect((await request(ctx.app).patch(`/admin/users/${holder.id}`).set(admin).send({ sso_subject: ALICE.subject })).status).toBe(200);
  });

  // Fails today: the check-then-update in UsersService.update loses the race, and the unique index's
  // error escapes as 500 INTERNAL_ERROR.
  test('two admins linking the same subject to two users at once: one 200, one 409 CONFLICT (never a 500)', async () => {
    const ctx = await app(TRUSTED);
    const a = await createUser(ctx);
    const b = await createUser(ctx);
    const racing = interleavingApp(ctx);
    const [ra, rb] = await Promise.all([
      request(racing).patch(`/admin/users/${a.id}`).set(admin).send({ sso_subject: 'idp|shared' }),
      request(racing).patch(`/admin/users/${b.id}`).set(admin).send({ sso_subject: 'idp|shared' }),
    ]);
    expect([ra.status, rb.status].sort((x, y) => x - y)).toEqual([200, 409]);
    const lost = ra.status === 409 ? ra : rb;
    const winner = ra.status === 200 ? a : b;
    expect(expectError(lost, 409, 'CONFLICT').details).toEqual({ existing_id: winner.id });
  });

  test('a subject freed by deleting its user can be linked to another', async () => {
    const ctx = await app(TRUSTED);
    const { user } = await aliceWithKey(ctx);
    const other = await createUser(ctx);
    expect((await request(ctx.app).delete(`/admin/users/${user.id}`).set(admin)).status).toBe(204);
    expect((await request(ctx.app).patch(`/admin/users/${other.id}`).set(admin).send({ sso_subject: ALICE.subject })).status).toBe(200);
    expect((await get(ctx, '/sso/me', ALICE)).body.user.id).toBe(other.id);
  });
});

describe('self-service keys', () => {
  test('GET /sso/me: the user (without active_bots), the identity, and SSO_USER_SCOPES', async () => {
    const ctx = await app({ ...TRUSTED, SSO_USER_SCOPES: 'bots:read tokens:read' });
    const { user } = await aliceWithKey(ctx);
    const res = await get(ctx, '/sso/me', ALICE);
    expect(res.status).toBe(200);
    expect(Object.keys(res.body).sort()).toEqual(['allowed_scopes', 'identity', 'user']);
    expect(res.body.user).not.toHaveProperty('active_bots');
    expect(res.body.user).toMatchObject({ id: user.id, email: ALICE.email, sso_subject: ALICE.subject, disabled: false });
    expect(res.body.identity).toEqual({ email: ALICE.email, subject: ALICE.subject, username: 'alice', groups: ['staff', 'keyward-users'] });
    expect(res.body.allowed_scopes).toEqual(['bots:read', 'tokens:read']);
  });

  test('a signed-in person cannot set metadata on their keys (400): the services behind forward auth trust it', async () => {
    const ctx = await app(TRUSTED);
    await aliceWithKey(ctx);
    const error = expectError(await post(ctx, '/sso/tokens', ALICE, { name: 'mine', metadata: { plan: 'enterprise' } }), 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([{ field: 'metadata', in: 'body', message: 'is set by the admin API only: the services behind forward auth trust it' }]);
    expect(await allTokens(ctx)).toHaveLength(1);
  });

  test("GET /sso/tokens lists the person's own keys, masked, never another user's", async () => {
    const ctx = await app(TRUSTED);
    const { user, key } = await aliceWithKey(ctx);
    const second = await mintToken(ctx, user.id, { name: 'second' });
    const stranger = await createUser(ctx);
    const theirs = await mintToken(ctx, stranger.id, { name: 'not yours' });

    const res = await get(ctx, '/sso/tokens', ALICE);
    expect(res.status).toBe(200);
    expect(res.body.data.map((t: { id: number }) => t.id)).toEqual([key.id, second.id]);
    expect(res.body.meta).toEqual({ limit: 50, next_cursor: null });
    expect(res.body.data[0]).toMatchObject({ user_id: user.id, name: 'existing', masked: key.masked, status: 'active' });
    const text = JSON.stringify(res.body);
    for (const secret of [key.token, second.token, theirs.token]) expect(text).not.toContain(secret);
    expect(text).not.toContain(theirs.masked);
    expect(res.body.data[0]).not.toHaveProperty('token');

    const page = await get(ctx, '/sso/tokens?limit=1', ALICE);
    expect(page.body.data.map((t: { id: number }) => t.id)).toEqual([key.id]);
    expect(page.body.meta.next_cursor).toEqual(expect.any(String));
  });

  test('POST /sso/tokens mints a key for oneself, shown once, that works on GET /v1/me', async () => {
    const ctx = await app(TRUSTED);
    const { user } = await aliceWithKey(ctx);
    const res = await post(ctx, '/sso/tokens', ALICE, { name: 'laptop' });
    expect(res.status).toBe(201);
    expect(res.headers.location).toBe(`/sso/tokens/${res.body.id}`);
    expect(res.body).toMatchObject({ user_id: user.id, name: 'laptop', scopes: ['bots:read', 'bots:write'], environment: 'live', status: 'active', expires_at: null });
    expect(res.body.token).toMatch(/^kw_live_/);
    expect(await tokenRow(ctx, res.body.id)).toMatchObject({ user_id: user.id, scopes: 'bots:read bots:write', revoked_at: null });

    const me = await request(ctx.app).get('/v1/me').set('X-API-Key', res.body.token);
    expect(me.status).toBe(200);
    expect(me.body.user.id).toBe(user.id);
    expect(me.body.token).toMatchObject({ id: res.body.id, scopes: ['bots:read', 'bots:write'] });

    const listed = (await get(ctx, '/sso/tokens', ALICE)).body.data.find((t: { id: number }) => t.id === res.body.id);
    expect(listed).toMatchObject({ masked: res.body.masked });
    expect(listed).not.toHaveProperty('token');
  });

  test('POST /sso/tokens without a body mints a default key', async () => {
    const ctx = await app(TRUSTED);
    await aliceWithKey(ctx);
    const res = await post(ctx, '/sso/tokens', ALICE);
    expect(res.status).toBe(201);
    expect(res.body.scopes).toEqual(['bots:read', 'bots:write']);
  });

  test('scopes beyond SSO_USER_SCOPES are 403 INSUFFICIENT_SCOPE naming them, and nothing is minted', async () => {
    const ctx = await app(TRUSTED);
    await aliceWithKey(ctx);
    const error = expectError(await post(ctx, '/sso/tokens', ALICE, { scopes: ['bots:read', 'tokens:write', 'tokens:read'] }), 403, 'INSUFFICIENT_SCOPE');
    expect(error.details).toEqual({ required: ['tokens:read', 'tokens:write'] });
    expect(await allTokens(ctx)).toHaveLength(1);

    const narrow = await app({ ...TRUSTED, SSO_USER_SCOPES: 'bots:read tokens:read' });
    await aliceWithKey(narrow);
    expect(expectError(await post(narrow, '/sso/tokens', ALICE, {}), 403, 'INSUFFICIENT_SCOPE').details).toEqual({ required: ['bots:write'] });
    const ok = await post(narrow, '/sso/tokens', ALICE, { scopes: ['tokens:read'] });
    expect(ok.status).toBe(201);
    expect(ok.body.scopes).toEqual(['tokens:read']);
  });

  test('MAX_TOKENS_PER_USER applies: 409 CONFLICT once the person has that many active keys', async () => {
    const ctx = await app({ ...TRUSTED, MAX_TOKENS_PER_USER: '2' });
    await aliceWithKey(ctx);
    expect((await post(ctx, '/sso/tokens', ALICE, {})).status).toBe(201);
    const error = expectError(await post(ctx, '/sso/tokens', ALICE, {}), 409, 'CONFLICT');
    expect(error.details).toEqual({ limit: 2, active: 2 });
    expect(await allTokens(ctx)).toHaveLength(2);
  });

  test("POST /sso/tokens/{id}/rotate rotates one's own key; another user's is 404 and untouched", async () => {
    const ctx = await app(TRUSTED);
    const { user, key } = await aliceWithKey(ctx);
    const res = await post(ctx, `/sso/tokens/${key.id}/rotate`, ALICE, { grace_period_seconds: 0 });
    expect(res.status).toBe(201);
    expect(res.headers.location).toBe(`/sso/tokens/${res.body.id}`);
    expect(res.body).toMatchObject({ user_id: user.id, name: 'existing', rotated_from: key.id, status: 'active' });
    expect((await request(ctx.app).get('/v1/me').set('X-API-Key', res.body.token)).status).toBe(200);
    expect((await tokenRow(ctx, key.id)).rotated_to).toBe(res.body.id);

    const stranger = await createUser(ctx);
    const theirs = await mintToken(ctx, stranger.id);
    const foreign = expectError(await post(ctx, `/sso/tokens/${theirs.id}/rotate`, ALICE), 404, 'NOT_FOUND');
    const missing = expectError(await post(ctx, '/sso/tokens/999999/rotate', ALICE), 404, 'NOT_FOUND');
    expect(foreign.message).toBe(missing.message);
    expect(await tokenRow(ctx, theirs.id)).toMatchObject({ rotated_to: null, revoked_at: null });
    expect((await allTokens(ctx)).filter((t) => t.user_id === stranger.id)).toHaveLength(1);
  });

  test("DELETE /sso/tokens/{id} revokes one's own key at once; another user's is 404 and untouched", async () => {
    const ctx = await app(TRUSTED);
    const { key } = await aliceWithKey(ctx);
    const stranger = await createUser(ctx);
    const theirs = await mintToken(ctx, stranger.id);

    const foreign = expectError(await del(ctx, `/sso/tokens/${theirs.id}`, ALICE), 404, 'NOT_FOUND');
    const missing = expectError(await del(ctx, '/sso/tokens/999999', ALICE), 404, 'NOT_FOUND');
    expect(foreign.message).toBe(missing.message);
    expect((await tokenRow(ctx, theirs.id)).revoked_at).toBeNull();
    expect((await request(ctx.app).get('/v1/me').set('X-API-Key', theirs.token)).status).toBe(200);

    const res = await del(ctx, `/sso/tokens/${key.id}`, ALICE);
    expect(res.status).toBe(204);
    expect((await tokenRow(ctx, key.id)).revoked_at).toBe('2026-01-01T00:00:00.000Z');
    expectError(await request(ctx.app).get('/v1/me').set('X-API-Key', key.token), 401, 'API_KEY_REVOKED');
  });
});

describe('CSRF guard on changes', () => {
  test('POST and DELETE without X-Keyward-CSRF: 1 are 403 CSRF_CHECK_FAILED, and nothing is minted, rotated or revoked', async () => {
    const ctx = await app(TRUSTED);
    const { key } = await aliceWithKey(ctx);
    for (const extra of [{}, { 'X-Keyward-CSRF': '0' }, { 'X-Keyward-CSRF': 'true' }, { 'X-Keyward-CSRF': '' }] as Record<string, string>[]) {
      expectError(await post(ctx, '/sso/tokens', ALICE, {}, extra), 403, 'CSRF_CHECK_FAILED');
      expectError(await post(ctx, `/sso/tokens/${key.id}/rotate`, ALICE, undefined, extra), 403, 'CSRF_CHECK_FAILED');
      expectError(await del(ctx, `/sso/tokens/${key.id}`, ALICE, extra), 403, 'CSRF_CHECK_FAILED');
    }
    expect((await allTokens(ctx)).map((t) => [t.id, t.revoked_at, t.rotated_to])).toEqual([[key.id, null, null]]);
  });

  test("with an Origin header, only the request's own host passes; a foreign or malformed one is 403 even with the CSRF header", async () => {
    const ctx = await app(TRUSTED);
    const { key } = await aliceWithKey(ctx);
    const host = 'keys.example.com';
    const refused = ['http://evil.example', 'http://keys.example.com.evil.example', 'http://evil.example:443', 'null', 'not a url', 'http://'];
    for (const origin of refused) {
      const extra = { ...CSRF, Host: host, Origin: origin };
      expectError(await post(ctx, '/sso/tokens', ALICE, {}, extra), 403, 'CSRF_CHECK_FAILED');
      expectError(await post(ctx, `/sso/tokens/${key.id}/rotate`, ALICE, undefined, extra), 403, 'CSRF_CHECK_FAILED');
      expectError(await del(ctx, `/sso/tokens/${key.id}`, ALICE, extra), 403, 'CSRF_CHECK_FAILED');
    }
    expect((await allTokens(ctx)).map((t) => [t.id, t.revoked_at, t.rotated_to])).toEqual([[key.id, null, null]]);

    const same = await post(ctx, '/sso/tokens', ALICE, {}, { ...CSRF, Host: host, Origin: `http://${host}` });
    expect(same.status).toBe(201);
    const withPort = await post(ctx, '/sso/tokens', ALICE, {}, { ...CSRF, Host: `${host}:8056`, Origin: `http://${host}:8056` });
    expect(withPort.status).toBe(201);
    // When the proxy keeps the port in Host, another port is another origin…
    const otherPort = await post(ctx, '/sso/tokens', ALICE, {}, { ...CSRF, Host: `${host}:8056`, Origin: `http://${host}:8443` });
    expectError(otherPort, 403, 'CSRF_CHECK_FAILED');
    // …when it drops it (nginx's $host), only the hostname is left to compare.
    const portDropped = await post(ctx, '/sso/tokens', ALICE, {}, { ...CSRF, Host: host, Origin: `http://${host}:8443` });
    expect(portDropped.status).toBe(201);
    expect(await allTokens(ctx)).toHaveLength(4);
  });

  test('reads need neither the CSRF header nor a matching Origin', async () => {
    const ctx = await app(TRUSTED);
    await aliceWithKey(ctx);
    for (const path of ['/sso/me', '/sso/tokens']) {
      expect((await get(ctx, path, ALICE, { Origin: 'http://evil.example' })).status).toBe(200);
    }
  });
});

describe('rate limit', () => {
  test("every SSO request counts against the user's own budget, shared with the user's API keys", async () => {
    const ctx = await app({ ...TRUSTED, RATE_LIMIT_PER_MINUTE: '3' });
    const { key } = await aliceWithKey(ctx);
    const first = await get(ctx, '/sso/me', ALICE);
    expect(first.status).toBe(200);
    expect({ limit: first.headers['ratelimit-limit'], remaining: first.headers['ratelimit-remaining'] }).toEqual({ limit: '3', remaining: '2' });
    expect(first.headers['ratelimit-reset']).toMatch(/^\d+$/);

    const second = await get(ctx, '/sso/tokens', ALICE);
    expect(second.headers['ratelimit-remaining']).toBe('1');
    expect((await request(ctx.app).get('/v1/me').set('X-API-Key', key.token)).headers['ratelimit-remaining']).toBe('0');

    const limited = await post(ctx, '/sso/tokens', ALICE, {});
    expectError(limited, 429, 'RATE_LIMITED');
    expect(limited.headers['retry-after']).toMatch(/^\d+$/);
    expect(await allTokens(ctx)).toHaveLength(1);
  });
});
