import request from 'supertest';
import { ConfigError } from '../src/config';
import { clientNetwork } from '../src/tokens/ip-allowlist';
import { bcryptHasher, type SecretHasher } from '../src/tokens/secret-hasher';
import { checksum, generateToken, randomBase62 } from '../src/tokens/token-format';
import { ADMIN_KEY, admin, appsClosedAfterEach, createUser, expectError, mintToken, testConfig, type TestContext } from './helpers/app';

/**
 * Rate limits ("Concurrency limits", rate-limit part): each user's requests a minute on /v1, wrong keys
 * per client address (refused before any lookup or bcrypt), and the admin API per address.
 *
 * The windows are rate-limiter-flexible's fixed one-minute windows in real time, not the fake clock, so
 * no test waits for one to end: each app has its own counters, and a test only checks that the
 * announced reset lies within the minute.
 */

const app = appsClosedAfterEach();

const me = (ctx: TestContext, key: string, headers: Record<string, string> = {}) =>
  request(ctx.app).get('/v1/me').set('X-API-Key', key).set(headers);
const adminGet = (ctx: TestContext, headers: Record<string, string> = admin) => request(ctx.app).get('/admin/users').set(headers);
const from = (ip: string) => ({ 'X-Forwarded-For': ip });

/** Same selector, another secret, a valid checksum: it reaches the lookup and bcrypt, and fails there. */
function wrongSecret(token: string): string {
  const body = `${token.slice(0, token.length - 38)}${randomBase62(32)}`;
  return body + checksum(body);
}
/** Well formed, but no such selector: it reaches the lookup and fails there. */
const unknownKey = () => generateToken('kw', 'live').token;
/** Fails the checksum: refused without any lookup. */
const badChecksum = (token: string) => token.slice(0, -1) + (token.endsWith('A') ? 'B' : 'A');

/** The database is gone; what still answers did not need it. Timers stop, and a last-use flush may fail. */
async function closeDatabase(ctx: TestContext): Promise<void> {
  await ctx.storage.close();
  ctx.close = async () => {
    ctx.app.bots.stop();
    await ctx.app.lastUse.stop().catch(() => undefined);
  };
}

const bcryptChecks = (ctx: TestContext) => ctx.app.verifier.stats.bcryptChecks;

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

/** A 429 for a used-up budget: Retry-After, details and RateLimit-Reset all name the same moment. */
function expectOverLimit(res: request.Response, limit: number): void {
  const error = expectError(res, 429, 'RATE_LIMITED');
  const retryAfter = expectWithinWindow(res.headers['retry-after']);
  expect(error.details).toEqual({ limit, retry_after: retryAfter });
  expect(quota(res)).toEqual({ limit, remaining: 0, reset: retryAfter });
}

/** A 429 for an address that sent too many wrong keys. */
function expectAddressBlocked(res: request.Response): void {
  const error = expectError(res, 429, 'RATE_LIMITED');
  const retryAfter = expectWithinWindow(res.headers['retry-after']);
  expect(error.details).toMatchObject({ retry_after: retryAfter });
}

async function userWithToken(ctx: TestContext, user: Record<string, unknown> = {}, token?: Record<string, unknown>) {
  const created = await createUser(ctx, user);
  return { user: created, minted: await mintToken(ctx, created.id, token) };
}

describe('configuration', () => {
  test('defaults: 600 requests a minute per user, 20 wrong keys per address, 1200 admin requests per address', () => {
    const config = testConfig();
    expect({ user: config.rateLimitPerMinute, failures: config.authFailuresPerMinute, admin: config.adminRateLimitPerMinute }).toEqual({
      user: 600,
      failures: 20,
      admin: 1200,
    });
  });

  test('RATE_LIMIT_PER_MINUTE may be 0; the per-address limits may not, and every bad value is reported at once', () => {
    expect(testConfig({ RATE_LIMIT_PER_MINUTE: '0' }).rateLimitPerMinute).toBe(0);
    let caught: unknown;
    try {
      testConfig({ RATE_LIMIT_PER_MINUTE: '-1', AUTH_FAILURES_PER_MINUTE: '0', ADMIN_RATE_LIMIT_PER_MINUTE: 'lots' });
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(ConfigError);
    const problems = (caught as ConfigError).problems.join('\n');
    for (const name of ['RATE_LIMIT_PER_MINUTE', 'AUTH_FAILURES_PER_MINUTE', 'ADMIN_RATE_LIMIT_PER_MINUTE']) expect(problems).toContain(name);
  });
});

describe('rate_limit_per_minute on users (admin API)', () => {
  test('a new user gets RATE_LIMIT_PER_MINUTE unless the request names a limit; 0 is accepted', async () => {
    const ctx = await app({ RATE_LIMIT_PER_MINUTE: '7' });
    expect((await createUser(ctx)) as unknown).toMatchObject({ rate_limit_per_minute: 7 });
    expect((await createUser(ctx, { rate_limit_per_minute: 0 })) as unknown).toMatchObject({ rate_limit_per_minute: 0 });
    expect((await createUser(ctx, { rate_limit_per_minute: 1_000_000 })) as unknown).toMatchObject({ rate_limit_per_minute: 1_000_000 });
  });

  test('PATCH changes it and GET shows it', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    const res = await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ rate_limit_per_minute: 42 });
    expect(res.status).toBe(200);
    expect(res.body.rate_limit_per_minute).toBe(42);
    expect((await request(ctx.app).get(`/admin/users/${user.id}`).set(admin)).body.rate_limit_per_minute).toBe(42);
  });

  // There is no "unlimited": null, negatives and the like are refused rather than read as "no limit".
  test.each([
    ['a negative number', -1, 'must be >= 0'],
    ['a fraction', 1.5, 'must be integer'],
    ['a string', '10', 'must be integer'],
    ['null', null, 'must be integer'],
    ['more than a million', 1_000_001, 'must be <= 1000000'],
  ])('refuses %s as the limit with 400 on POST and PATCH, and changes nothing', async (_what, value, message) => {
    const ctx = await app();
    const post = expectError(
      await request(ctx.app).post('/admin/users').set(admin).send({ email: 'a@example.com', rate_limit_per_minute: value }),
      400,
      'VALIDATION_ERROR',
    );
    expect(post.details).toEqual([{ field: 'rate_limit_per_minute', in: 'body', message }]);
    const user = await createUser(ctx, { rate_limit_per_minute: 5 });
    const patch = expectError(
      await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ rate_limit_per_minute: value }),
      400,
      'VALIDATION_ERROR',
    );
    expect(patch.details).toEqual([{ field: 'rate_limit_per_minute', in: 'body', message }]);
    expect((await request(ctx.app).get(`/admin/users/${user.id}`).set(admin)).body.rate_limit_per_minute).toBe(5);
  });
});

describe('per-user rate limit on /v1', () => {
  test('counts down in RateLimit-Remaining, then refuses with 429 RATE_LIMITED, Retry-After and details {limit, retry_after}', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { rate_limit_per_minute: 3 });
    const seen = [];
    for (let i = 0; i < 3; i++) {
      const res = await me(ctx, minted.token);
      expect(res.status).toBe(200);
      seen.push(quota(res));
    }
    expect(seen.map((q) => [q.limit, q.remaining])).toEqual([[3, 2], [3, 1], [3, 0]]);
    const refused = await me(ctx, minted.token);
    expectOverLimit(refused, 3);
    expect(refused.body.error.message).toMatch(/3 requests a minute/);
    // Fixed window: the reset never moves later while the window lasts.
    expect(Number(refused.headers['retry-after'])).toBeLessThanOrEqual(seen[0]!.reset);
    // And it stays refused for the rest of the window.
    expectOverLimit(await me(ctx, minted.token), 3);
  });

  test('uses RATE_LIMIT_PER_MINUTE (600 by default) for a user created without a limit', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx);
    expect(quota(await me(ctx, minted.token))).toMatchObject({ limit: 600, remaining: 599 });

    const small = await app({ RATE_LIMIT_PER_MINUTE: '2' });
    const other = await userWithToken(small);
    expect((await me(small, other.minted.token)).status).toBe(200);
    expect((await me(small, other.minted.token)).status).toBe(200);
    expectOverLimit(await me(small, other.minted.token), 2);
  });

  test('a limit of 0 refuses every request, the first one included', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { rate_limit_per_minute: 0 });
    expectOverLimit(await me(ctx, minted.token), 0);
    expectOverLimit(await request(ctx.app).get('/v1/bots').set('Authorization', `Bearer ${minted.token}`), 0);
  });

  test('every authenticated /v1 route draws on the same budget', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { rate_limit_per_minute: 3 }, { scopes: ['bots:read', 'bots:write', 'tokens:read'] });
    expect(quota(await me(ctx, minted.token)).remaining).toBe(2);
    expect(quota(await request(ctx.app).get('/v1/bots').set('X-API-Key', minted.token).expect(200)).remaining).toBe(1);
    expect(quota(await request(ctx.app).get('/v1/tokens').set('X-API-Key', minted.token).expect(200)).remaining).toBe(0);
    expectOverLimit(await request(ctx.app).post('/v1/bots').set('X-API-Key', minted.token).send({}), 3);
  });

  test('error responses after authentication are counted and carry the RateLimit fields', async () => {
    const ctx = await app();
    const { minted } = await userWithToken(ctx, { rate_limit_per_minute: 5, max_concurrent_bots: 0 }, { scopes: ['bots:read', 'bots:write'] });
    const key = { 'X-API-Key': minted.token };

    const scope = await request(ctx.app).get('/v1/tokens').set(key);
    expect(expectError(scope, 403, 'INSUFFICIENT_SCOPE').details).toEqual({ required: ['tokens:read'] });
    expect(quota(scope)).toMatchObject({ limit: 5, remaining: 4 });

    const missing = await request(ctx.app).get('/v1/bots/999').set(key);
    expectError(missing, 404, 'NOT_FOUND');
    expect(quota(missing)).toMatchObject({ remaining: 3 });

    const invalid = await request(ctx.app).get('/v1/bots?limit=0').set(key);
    expectError(invalid, 400, 'VALIDATION_ERROR');
    expect(quota(invalid)).toMatchObject({ remaining: 2 });

    // Both 429s on one route: the concurrency limit, then the rate limit, each with its own code.
    const full = await request(ctx.app).post('/v1/bots').set(key).send({});
    expect(expectError(full, 429, 'CONCURRENCY_LIMIT_EXCEEDED').details).toEqual({ limit: 0, active: 0 });
    expect(quota(full)).toMatchObject({ remaining: 1 });

    expect(quota(await me(ctx, minted.token).expect(200)).remaining).toBe(0);
    expectOverLimit(await request(ctx.app).post('/v1/bots').set(key).send({}), 5);
  });

  test('all of a user\'s keys share one budget; other users are unaffected', async () => {
    const ctx = await app();
    const { user, minted: first } = await userWithToken(ctx, { rate_limit_per_minute: 3 });
    const second = await mintToken(ctx, user.id);
    const stranger = await userWithToken(ctx, { rate_limit_per_minute: 3 });

    expect((await me(ctx, first.token)).status).toBe(200);
    expect((await me(ctx, second.token)).status).toBe(200);
    expect((await me(ctx, first.token)).status).toBe(200);
    expectOverLimit(await me(ctx, second.token), 3);
    expectOverLimit(await me(ctx, first.token), 3);

    const res = await me(ctx, stranger.minted.token);
    expect(res.status).toBe(200);
    expect(quota(res)).toMatchObject({ limit: 3, remaining: 2 });
  });

  test('requests refused before authentication are not charged to the user', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx, { rate_limit_per_minute: 2 });
    const revoked = await mintToken(ctx, user.id);
    await request(ctx.app).delete(`/admin/tokens/${revoked.id}`).set(admin).expect(204);
    const expiring = await mintToken(ctx, user.id, { expires_in: 60 });
    const elsewhere = await mintToken(ctx, user.id, { allowed_ips: ['10.0.0.0/8'] });

    const refusals = [
      [await request(ctx.app).get('/v1/me'), 401, 'AUTHENTICATION_REQUIRED'],
      [await me(ctx, badChecksum(minted.token)), 401, 'INVALID_API_KEY'],
      [await me(ctx, wrongSecret(minted.token)), 401, 'INVALID_API_KEY'],
      [await me(ctx, revoked.token), 401, 'API_KEY_REVOKED'],
      [await me(ctx, elsewhere.token), 403, 'FORBIDDEN_IP'],
    ] as const;
    ctx.clock.advance(60);
    const expired = await me(ctx, expiring.token);
    await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: true }).expect(200);
    const disabled = await me(ctx, minted.token);
    await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: false }).expect(200);

    for (const [res, status, code] of refusals) {
      expectError(res, status, code);
      expect(res.headers['ratelimit-remaining']).toBeUndefined();
    }
    expectError(expired, 401, 'API_KEY_EXPIRED');
    expectError(disabled, 403, 'USER_DISABLED');

    expect(quota(await me(ctx, minted.token).expect(200)).remaining).toBe(1);
    expect(quota(await me(ctx, minted.token).expect(200)).remaining).toBe(0);
    expectOverLimit(await me(ctx, minted.token), 2);
  });

  test('raising the limit with PATCH lets the next request through in the same window', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx, { rate_limit_per_minute: 2 });
    await me(ctx, minted.token).expect(200);
    await me(ctx, minted.token).expect(200);
    expectOverLimit(await me(ctx, minted.token), 2);

    await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ rate_limit_per_minute: 10 }).expect(200);
    const res = await me(ctx, minted.token);
    expect(res.status).toBe(200);
    expect(quota(res).limit).toBe(10);
  });

  test('raising the limit by one after the budget is spent (without a refusal) allows exactly one more', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx, { rate_limit_per_minute: 2 });
    await me(ctx, minted.token).expect(200);
    await me(ctx, minted.token).expect(200);
    await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ rate_limit_per_minute: 3 }).expect(200);
    expect(quota(await me(ctx, minted.token).expect(200))).toMatchObject({ limit: 3, remaining: 0 });
    expectOverLimit(await me(ctx, minted.token), 3);
  });

  test('lowering the limit to 0 blocks the very next request', async () => {
    const ctx = await app();
    const { user, minted } = await userWithToken(ctx, { rate_limit_per_minute: 100 });
    await me(ctx, minted.token).expect(200);
    await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ rate_limit_per_minute: 0 }).expect(200);
    expectOverLimit(await me(ctx, minted.token), 0);
  });
});

describe('wrong keys per client address', () => {
  test('with the default of 20: twenty wrong keys are 401, the next unknown key from that address is 429', async () => {
    const ctx = await app();
    for (let i = 0; i < 20; i++) expectError(await me(ctx, unknownKey()), 401, 'INVALID_API_KEY');
    expectAddressBlocked(await me(ctx, unknownKey()));
  });

  test.each([
    ['a bad checksum', (token: string) => badChecksum(token)],
    ['garbage', () => 'not-a-key'],
    ['an unknown selector', () => unknownKey()],
    ['a wrong secret', (token: string) => wrongSecret(token)],
  ])('%s counts as a wrong key', async (_what, wrong) => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3' });
    const { minted } = await userWithToken(ctx);
    for (let i = 0; i < 3; i++) expectError(await me(ctx, wrong(minted.token)), 401, 'INVALID_API_KEY');
    const res = await me(ctx, unknownKey());
    expectAddressBlocked(res);
    expect(res.body.error.message).toMatch(/wrong keys/);
    expect(res.headers['ratelimit-limit']).toBeUndefined();
  });

  test('the same wrong key sent again counts again (it costs no bcrypt, but it is still a guess)', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3' });
    const { minted } = await userWithToken(ctx);
    const wrong = wrongSecret(minted.token);
    for (let i = 0; i < 3; i++) expectError(await me(ctx, wrong), 401, 'INVALID_API_KEY');
    expect(bcryptChecks(ctx)).toBe(1);
    expectAddressBlocked(await me(ctx, wrong));
  });

  test('a blocked address gets 429 for any key this process has not verified, a good one included, without bcrypt', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3' });
    const { minted } = await userWithToken(ctx);
    for (let i = 0; i < 3; i++) expectError(await me(ctx, unknownKey()), 401, 'INVALID_API_KEY');
    const before = bcryptChecks(ctx);

    expectAddressBlocked(await me(ctx, wrongSecret(minted.token)));
    expectAddressBlocked(await me(ctx, badChecksum(minted.token)));
    // A good key the process has never verified is indistinguishable from a guess without bcrypt.
    expectAddressBlocked(await me(ctx, minted.token));
    expectAddressBlocked(await request(ctx.app).get('/v1/bots').set('Authorization', `Bearer ${minted.token}`));
    expect(bcryptChecks(ctx)).toBe(before);
  });

  test('a blocked address is refused without touching the database (429, not 503)', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3', TRUST_PROXY: 'loopback' });
    const { minted } = await userWithToken(ctx);
    const attacker = from('203.0.113.7');
    await me(ctx, minted.token, attacker).expect(200);
    for (let i = 0; i < 3; i++) expectError(await me(ctx, unknownKey(), attacker), 401, 'INVALID_API_KEY');
    const before = bcryptChecks(ctx);

    await closeDatabase(ctx);
    expectAddressBlocked(await me(ctx, unknownKey(), attacker));
    expectAddressBlocked(await me(ctx, wrongSecret(minted.token), attacker));
    expect(bcryptChecks(ctx)).toBe(before);
    // The database really is gone: the same unknown key from an address in good standing needs it...
    expectError(await me(ctx, unknownKey(), from('198.51.100.1')), 503, 'UNAVAILABLE');
    // ...and so does a verified key from the blocked address, which is let through to the lookup.
    expectError(await me(ctx, minted.token, attacker), 503, 'UNAVAILABLE');
  });

  test('a key this process already verified still works from a blocked address, subject only to its user\'s limit', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3' });
    const { minted } = await userWithToken(ctx, { rate_limit_per_minute: 3 });
    expect(quota(await me(ctx, minted.token).expect(200)).remaining).toBe(2);
    for (let i = 0; i < 3; i++) expectError(await me(ctx, wrongSecret(minted.token)), 401, 'INVALID_API_KEY');
    expectAddressBlocked(await me(ctx, unknownKey()));
    const before = bcryptChecks(ctx);

    expect(quota(await me(ctx, minted.token).expect(200)).remaining).toBe(1);
    expect(quota(await request(ctx.app).get('/v1/bots').set('Authorization', `Bearer ${minted.token}`).expect(200)).remaining).toBe(0);
    expectOverLimit(await me(ctx, minted.token), 3);
    expect(bcryptChecks(ctx)).toBe(before);
  });

  test('a verified key that has since been revoked gets 401 API_KEY_REVOKED from a blocked address, not a pass', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3' });
    const { minted } = await userWithToken(ctx);
    await me(ctx, minted.token).expect(200);
    for (let i = 0; i < 3; i++) expectError(await me(ctx, unknownKey()), 401, 'INVALID_API_KEY');
    await request(ctx.app).delete(`/admin/tokens/${minted.id}`).set(admin).expect(204);
    expectError(await me(ctx, minted.token), 401, 'API_KEY_REVOKED');
  });

  test('revoked and expired keys (right secret), USER_DISABLED, FORBIDDEN_IP and a missing key are not wrong keys', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3' });
    const { user, minted } = await userWithToken(ctx);
    await me(ctx, minted.token).expect(200);
    const revoked = await mintToken(ctx, user.id);
    await request(ctx.app).delete(`/admin/tokens/${revoked.id}`).set(admin).expect(204);
    const expiring = await mintToken(ctx, user.id, { expires_in: 60 });
    const elsewhere = await mintToken(ctx, user.id, { allowed_ips: ['10.0.0.0/8'] });
    ctx.clock.advance(60);
    const other = await userWithToken(ctx);
    await request(ctx.app).patch(`/admin/users/${other.user.id}`).set(admin).send({ disabled: true }).expect(200);

    for (let i = 0; i < 4; i++) {
      expectError(await me(ctx, revoked.token), 401, 'API_KEY_REVOKED');
      expectError(await me(ctx, expiring.token), 401, 'API_KEY_EXPIRED');
      expectError(await me(ctx, elsewhere.token), 403, 'FORBIDDEN_IP');
      expectError(await me(ctx, other.minted.token), 403, 'USER_DISABLED');
      expectError(await request(ctx.app).get('/v1/me'), 401, 'AUTHENTICATION_REQUIRED');
    }
    // Nothing so far counted: three real wrong keys are needed before the address is blocked.
    for (let i = 0; i < 3; i++) expectError(await me(ctx, unknownKey()), 401, 'INVALID_API_KEY');
    expectAddressBlocked(await me(ctx, unknownKey()));
    // The key verified at the start still works; the revoked one is still judged on its state.
    await me(ctx, minted.token).expect(200);
    expectError(await me(ctx, revoked.token), 401, 'API_KEY_REVOKED');
  });

  test('with TRUST_PROXY off, a forged X-Forwarded-For does not escape the block', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3' });
    for (const ip of ['10.0.0.1', '10.0.0.2', '10.0.0.3']) expectError(await me(ctx, unknownKey(), from(ip)), 401, 'INVALID_API_KEY');
    expectAddressBlocked(await me(ctx, unknownKey(), from('10.9.9.9')));
    expectAddressBlocked(await me(ctx, unknownKey()));
  });

  test('with TRUST_PROXY=loopback, each forwarded client address is counted on its own', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3', TRUST_PROXY: 'loopback' });
    for (let i = 0; i < 3; i++) expectError(await me(ctx, unknownKey(), from('10.0.0.1')), 401, 'INVALID_API_KEY');
    expectAddressBlocked(await me(ctx, unknownKey(), from('10.0.0.1')));
    // The proxy appends the real client: whatever the client put in front does not change who it is.
    expectAddressBlocked(await me(ctx, unknownKey(), from('10.0.0.2, 10.0.0.1')));
    expectError(await me(ctx, unknownKey(), from('10.0.0.2')), 401, 'INVALID_API_KEY');
    // The proxy itself (no X-Forwarded-For) is another address.
    expectError(await me(ctx, unknownKey()), 401, 'INVALID_API_KEY');
  });

  test('IPv6 clients are counted per /64, and an IPv4-mapped address is its IPv4 address', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3', TRUST_PROXY: 'loopback' });
    for (const ip of ['2001:db8:1:2::1', '2001:db8:1:2::2', '2001:db8:1:2:aaaa:bbbb:cccc:dddd']) {
      expectError(await me(ctx, unknownKey(), from(ip)), 401, 'INVALID_API_KEY');
    }
    expectAddressBlocked(await me(ctx, unknownKey(), from('2001:db8:1:2::99')));
    expectError(await me(ctx, unknownKey(), from('2001:db8:1:3::1')), 401, 'INVALID_API_KEY');

    for (let i = 0; i < 3; i++) expectError(await me(ctx, unknownKey(), from('192.0.2.5')), 401, 'INVALID_API_KEY');
    expectAddressBlocked(await me(ctx, unknownKey(), from('::ffff:192.0.2.5')));
    expectError(await me(ctx, unknownKey(), from('192.0.2.6')), 401, 'INVALID_API_KEY');
  });

  test('a burst of concurrent wrong secrets from one address gets no more bcrypt checks than the limit allows', async () => {
    // Every check waits at this gate, so all of a burst is in flight together, as with many connections.
    const gate = new GatedHasher();
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3' }, gate);
    const { minted } = await userWithToken(ctx);
    const answered: request.Response[] = [];
    const burst = Array.from({ length: 12 }, () => me(ctx, wrongSecret(minted.token)).then((res) => (answered.push(res), res)));
    await until(() => gate.waiting + answered.length === 12);
    gate.open();
    const results = await Promise.all(burst);

    // Only AUTH_FAILURES_PER_MINUTE guesses may be judged by bcrypt; the rest are refused as from a
    // blocked address. Otherwise one address gets as many bcrypt checks as it can open connections.
    expect(bcryptChecks(ctx)).toBeLessThanOrEqual(3);
    expect(results.filter((r) => r.status === 429)).toHaveLength(12 - results.filter((r) => r.status === 401).length);
    expect(results.filter((r) => r.status === 401).length).toBeLessThanOrEqual(3);
  });
});

describe('the per-token limit on wrong secrets (separate from the per-address limit)', () => {
  test('ten wrong secrets for one selector: the eleventh is 429 without bcrypt, the address itself is not blocked', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '100' });
    const { user, minted } = await userWithToken(ctx);
    const other = await mintToken(ctx, user.id);
    await me(ctx, minted.token).expect(200);
    for (let i = 0; i < 10; i++) expectError(await me(ctx, wrongSecret(minted.token)), 401, 'INVALID_API_KEY');
    const before = bcryptChecks(ctx);
    const res = await me(ctx, wrongSecret(minted.token));
    const error = expectError(res, 429, 'RATE_LIMITED');
    expect(error.details).toEqual({ retry_after: expectWithinWindow(res.headers['retry-after']) });
    expect(error.message).toMatch(/this API key/);
    expect(bcryptChecks(ctx)).toBe(before);

    // Another selector from the same address is still judged on its merits.
    expectError(await me(ctx, wrongSecret(other.token)), 401, 'INVALID_API_KEY');
    expect(bcryptChecks(ctx)).toBe(before + 1);
    await me(ctx, other.token).expect(200);
    await me(ctx, minted.token).expect(200);
  });

  test('the per-address block applies even to a selector under its own per-token limit', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3', TRUST_PROXY: 'loopback' });
    const { minted } = await userWithToken(ctx);
    for (let i = 0; i < 3; i++) expectError(await me(ctx, wrongSecret(minted.token), from('10.0.0.1')), 401, 'INVALID_API_KEY');
    expectAddressBlocked(await me(ctx, wrongSecret(minted.token), from('10.0.0.1')));
    // From elsewhere the selector has had only three failures of its ten.
    expectError(await me(ctx, wrongSecret(minted.token), from('10.0.0.2')), 401, 'INVALID_API_KEY');
  });

  test('a burst of concurrent wrong secrets for one selector gets no more than ten bcrypt checks', async () => {
    const gate = new GatedHasher();
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '1000' }, gate);
    const { minted } = await userWithToken(ctx);
    const answered: request.Response[] = [];
    const burst = Array.from({ length: 16 }, () => me(ctx, wrongSecret(minted.token)).then((res) => (answered.push(res), res)));
    await until(() => gate.waiting + answered.length === 16);
    gate.open();
    const results = await Promise.all(burst);
    expect(bcryptChecks(ctx)).toBeLessThanOrEqual(10);
    expect(results.filter((r) => r.status === 429).length).toBeGreaterThanOrEqual(6);
  });
});

describe('admin API rate limit per address', () => {
  test('counts every request in the RateLimit fields and refuses past the limit with 429, the right key included', async () => {
    const ctx = await app({ ADMIN_RATE_LIMIT_PER_MINUTE: '3' });
    const seen = [];
    for (let i = 0; i < 3; i++) seen.push(quota(await adminGet(ctx).expect(200)));
    expect(seen.map((q) => [q.limit, q.remaining])).toEqual([[3, 2], [3, 1], [3, 0]]);
    const res = await adminGet(ctx);
    expectOverLimit(res, 3);
    expect(res.body.error.message).toMatch(/admin API/);
    expectOverLimit(await request(ctx.app).post('/admin/users').set(admin).send({ email: 'late@example.com' }), 3);
    expect(await ctx.storage.db.selectFrom('users').select('id').execute()).toEqual([]);
  });

  test('refused admin requests are counted too and carry the RateLimit fields', async () => {
    const ctx = await app({ ADMIN_RATE_LIMIT_PER_MINUTE: '4' });
    const responses: Array<[request.Response, number, string]> = [
      [await request(ctx.app).get('/admin/users'), 401, 'AUTHENTICATION_REQUIRED'],
      [await adminGet(ctx, { 'X-Admin-API-Key': 'x'.repeat(40) }), 401, 'INVALID_ADMIN_KEY'],
      [await request(ctx.app).get('/admin/users/999').set(admin), 404, 'NOT_FOUND'],
      [await request(ctx.app).post('/admin/users').set(admin).send({ email: 'nope' }), 400, 'VALIDATION_ERROR'],
    ];
    responses.forEach(([res, status, code], i) => {
      expectError(res, status, code);
      expect(quota(res)).toMatchObject({ limit: 4, remaining: 3 - i });
    });
    expectOverLimit(await adminGet(ctx), 4);
  });

  test('the admin limit does not touch /v1 or health', async () => {
    const ctx = await app({ ADMIN_RATE_LIMIT_PER_MINUTE: '3' });
    const { minted } = await userWithToken(ctx);
    await adminGet(ctx).expect(200);
    expectOverLimit(await adminGet(ctx), 3);
    const res = await me(ctx, minted.token).expect(200);
    expect(quota(res)).toMatchObject({ limit: 600, remaining: 599 });
    await request(ctx.app).get('/healthz').expect(200);
  });

  test('with TRUST_PROXY off a forged X-Forwarded-For shares the peer\'s budget; with loopback each client has its own', async () => {
    const off = await app({ ADMIN_RATE_LIMIT_PER_MINUTE: '2' });
    await adminGet(off, { ...admin, ...from('10.0.0.1') }).expect(200);
    await adminGet(off, { ...admin, ...from('10.0.0.2') }).expect(200);
    expectOverLimit(await adminGet(off, { ...admin, ...from('10.0.0.3') }), 2);

    const proxied = await app({ ADMIN_RATE_LIMIT_PER_MINUTE: '2', TRUST_PROXY: 'loopback' });
    await adminGet(proxied, { ...admin, ...from('10.0.0.1') }).expect(200);
    await adminGet(proxied, { ...admin, ...from('10.0.0.1') }).expect(200);
    expectOverLimit(await adminGet(proxied, { ...admin, ...from('10.0.0.1') }), 2);
    expect(quota(await adminGet(proxied, { ...admin, ...from('10.0.0.2') }).expect(200)).remaining).toBe(1);
    // IPv6 per /64 here too.
    await adminGet(proxied, { ...admin, ...from('2001:db8::1') }).expect(200);
    await adminGet(proxied, { ...admin, ...from('2001:db8::2') }).expect(200);
    expectOverLimit(await adminGet(proxied, { ...admin, ...from('2001:db8:0:0:ffff::3') }), 2);
  });

  test('wrong admin keys count as wrong keys: past the limit a wrong key is 429, the right key still works', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3' });
    // A missing key is not a wrong key.
    for (let i = 0; i < 5; i++) expectError(await request(ctx.app).get('/admin/users'), 401, 'AUTHENTICATION_REQUIRED');
    for (const key of ['wrong', ADMIN_KEY.slice(0, -1), ADMIN_KEY.toUpperCase()]) {
      expectError(await adminGet(ctx, { 'X-Admin-API-Key': key }), 401, 'INVALID_ADMIN_KEY');
    }
    const res = await adminGet(ctx, { 'X-Admin-API-Key': 'wrong again' });
    expectAddressBlocked(res);
    expect(quota(res)).toMatchObject({ limit: 1200 });
    await adminGet(ctx).expect(200);
    // One address, one count: the /v1 side is blocked as well.
    expectAddressBlocked(await me(ctx, unknownKey()));
  });

  test('wrong user keys block wrong admin keys from the same address', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3' });
    for (let i = 0; i < 3; i++) expectError(await me(ctx, unknownKey()), 401, 'INVALID_API_KEY');
    expectAddressBlocked(await adminGet(ctx, { 'X-Admin-API-Key': 'guess' }));
    await adminGet(ctx).expect(200);
  });
});

describe('clientNetwork: the address a limit counts', () => {
  test.each([
    ['IPv4 as it is', '203.0.113.9', '203.0.113.9'],
    ['IPv4-mapped IPv6 as its IPv4 address', '::ffff:1.2.3.4', '1.2.3.4'],
    ['IPv4-mapped IPv6 in capitals', '::FFFF:1.2.3.4', '1.2.3.4'],
    ['IPv6 by its /64', '2001:db8:1:2:3:4:5:6', '2001:db8:1:2::/64'],
    ['IPv6 in short form by its /64', '2001:db8:1:2::9', '2001:db8:1:2::/64'],
    ['IPv6 written in long form, capitals', '2001:0DB8:0001:0002:0000:0000:0000:0009', '2001:db8:1:2::/64'],
    ['loopback IPv6', '::1', '::/64'],
  ])('%s', (_what, ip, network) => {
    expect(clientNetwork(ip)).toBe(network);
  });

  test('two addresses in one /64 are one client; neighbouring /64s are two', () => {
    expect(clientNetwork('2001:db8:1:2:3:4:5:6')).toBe(clientNetwork('2001:db8:1:2::9'));
    expect(clientNetwork('2001:db8:1:2::1')).not.toBe(clientNetwork('2001:db8:1:3::1'));
    expect(clientNetwork('1.2.3.4')).not.toBe(clientNetwork('1.2.3.5'));
    expect(clientNetwork('::ffff:1.2.3.4')).not.toBe(clientNetwork('::ffff:1.2.3.5'));
  });

  test('something that is not an address is counted as itself, never folded into another client', () => {
    expect(clientNetwork('')).toBe('');
    expect(clientNetwork('unknown')).toBe('unknown');
    expect(clientNetwork('10.0.0.0/8')).toBe('10.0.0.0/8');
  });
});

/** Real bcrypt behind a gate: checks start when asked and finish only once the test opens it. */
class GatedHasher implements SecretHasher {
  private readonly real = bcryptHasher(4, 4);
  private release!: () => void;
  private readonly gate = new Promise<void>((resolve) => (this.release = resolve));
  waiting = 0;
  hash(secret: string) {
    return this.real.hash(secret);
  }
  async verify(secret: string, hash: string) {
    this.waiting++;
    await this.gate;
    return this.real.verify(secret, hash);
  }
  open(): void {
    this.release();
  }
}

async function until(condition: () => boolean, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
}
