import request from 'supertest';
import { checksum, generateToken, randomBase62 } from '../src/tokens/token-format';
import { ADMIN_KEY, admin, CountingHasher, createTestApp, createUser, expectError, mintToken, type TestContext } from './helpers/app';


let ctx: TestContext;
let hasher: CountingHasher;
beforeEach(async () => {
  hasher = new CountingHasher();
  ctx = await createTestApp({ hasher });
});
afterEach(async () => {
  await ctx.close();
});

/** The same selector with another secret and a correct checksum: only the secret is wrong. */
function withOtherSecret(token: string, n: number): string {
  const selector = token.split('_')[2]!;
  const body = `kw_live_${selector}_${randomBase62(31)}${'0123456789'[n % 10]}`;
  return body + checksum(body);
}

async function setup(body?: Record<string, unknown>) {
  const user = await createUser(ctx, { email: 'me@example.com', name: 'Me', max_concurrent_bots: 4 });
  const minted = await mintToken(ctx, user.id, body);
  return { user, minted };
}

describe('GET /v1/me', () => {
  test('answers with the user and the calling token for X-API-Key', async () => {
    const { user, minted } = await setup({ name: 'laptop' });
    const res = await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token);
    expect(res.status).toBe(200);
    expect(res.body).toEqual({
      user: { id: user.id, email: 'me@example.com', name: 'Me', external_id: null, max_concurrent_bots: 4 },
      token: { id: minted.id, name: 'laptop', scopes: ['bots:read', 'bots:write'], environment: 'live', masked: minted.masked, expires_at: null, allowed_ips: null, metadata: null, rate_limit_per_minute: null },
    });
  });

  test('accepts Authorization: Bearer, in any case of the scheme', async () => {
    const { minted } = await setup();
    expect((await request(ctx.app).get('/v1/me').set('Authorization', `Bearer ${minted.token}`)).status).toBe(200);
    expect((await request(ctx.app).get('/v1/me').set('Authorization', `bearer ${minted.token}`)).status).toBe(200);
  });

  test('accepts both headers when they carry the same key, refuses them when they differ', async () => {
    const { user, minted } = await setup();
    const other = await mintToken(ctx, user.id);
    expect((await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token).set('Authorization', `Bearer ${minted.token}`)).status).toBe(200);
    const error = expectError(
      await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token).set('Authorization', `Bearer ${other.token}`),
      401,
      'INVALID_API_KEY',
    );
    expect(error.message).toMatch(/different keys/);
  });
});

describe('refusing requests without a usable key', () => {
  test('asks for a key with 401 AUTHENTICATION_REQUIRED and a Bearer challenge', async () => {
    const res = await request(ctx.app).get('/v1/me');
    const error = expectError(res, 401, 'AUTHENTICATION_REQUIRED');
    expect(error.message).toMatch(/X-API-Key/);
    expect(res.headers['www-authenticate']).toBe('Bearer realm="keyward"');
  });

  test('never accepts a key from the query string', async () => {
    const { minted } = await setup();
    for (const name of ['api_key', 'token', 'key', 'access_token']) {
      const error = expectError(await request(ctx.app).get(`/v1/me?${name}=${minted.token}`), 401, 'AUTHENTICATION_REQUIRED');
      expect(error.message).toMatch(/query string/);
    }
  });

  test('refuses the admin key on /v1 and says which header is needed', async () => {
    const error = expectError(await request(ctx.app).get('/v1/me').set('X-Admin-API-Key', ADMIN_KEY), 401, 'AUTHENTICATION_REQUIRED');
    expect(error.message).toMatch(/admin key does not work on \/v1/);
    expectError(await request(ctx.app).get('/v1/me').set('X-API-Key', ADMIN_KEY), 401, 'INVALID_API_KEY');
  });

  test('refuses other authorization schemes', async () => {
    const error = expectError(await request(ctx.app).get('/v1/me').set('Authorization', 'Basic dXNlcjpwYXNz'), 401, 'AUTHENTICATION_REQUIRED');
    expect(error.message).toMatch(/Bearer/);
  });

  test.each([
    ['garbage', 'hello'],
    ['a truncated token', null],
    ['a token with one character changed', null],
    ['another prefix', null],
    ['a long string', 'kw_live_'.padEnd(8_000, 'a')],
  ])('refuses %s with 401 INVALID_API_KEY before any bcrypt work', async (what, fixed) => {
    const { minted } = await setup();
    const variants: Record<string, string> = {
      'a truncated token': minted.token.slice(0, -1),
      'a token with one character changed': minted.token.slice(0, 20) + (minted.token[20] === 'a' ? 'b' : 'a') + minted.token.slice(21),
      'another prefix': minted.token.replace(/^kw_/, 'zz_'),
    };
    const res = await request(ctx.app).get('/v1/me').set('X-API-Key', fixed ?? variants[what]!);
    expectError(res, 401, 'INVALID_API_KEY');
    expect(res.headers['www-authenticate']).toMatch(/^Bearer realm="keyward", error="invalid_token"$/);
    expect(hasher.verifyCalls).toBe(0);
  });

  test('refuses a well-formed token with an unknown selector after the same one bcrypt check a wrong secret costs', async () => {
    await setup();
    const unknown = generateToken('kw', 'live').token;
    const res = await request(ctx.app).get('/v1/me').set('X-API-Key', unknown);
    expectError(res, 401, 'INVALID_API_KEY');
    expect(res.body.error.message).toBe('The API key is not valid.');
    // Against a decoy hash, so the answer takes as long as for a real selector; the same key again
    // is refused from memory, as a repeated wrong secret is.
    expect(hasher.verifyCalls).toBe(1);
    expectError(await request(ctx.app).get('/v1/me').set('X-API-Key', unknown), 401, 'INVALID_API_KEY');
    expect(hasher.verifyCalls).toBe(1);
  });

  test('an unknown selector is answered exactly like a real one with wrong secrets, 429 after ten included', async () => {
    // Twenty-two wrong keys from one address: above the per-address limit this is not about.
    const roomy = await createTestApp({ hasher, env: { AUTH_FAILURES_PER_MINUTE: '100' } });
    const user = await createUser(roomy);
    const minted = await mintToken(roomy, user.id);
    const answers = async (token: string) => {
      const out: string[] = [];
      for (let i = 0; i < 11; i++) {
        const res = await request(roomy.app).get('/v1/me').set('X-API-Key', withOtherSecret(token, i));
        out.push(`${res.status} ${res.body.error?.code} ${res.body.error?.message} ${res.headers['www-authenticate'] ?? ''}`);
      }
      return out;
    };
    const real = await answers(minted.token);
    const unknown = await answers(generateToken('kw', 'live').token);
    await roomy.close();
    expect(unknown).toEqual(real);
    expect(real.at(-1)).toMatch(/^429 RATE_LIMITED/);
  });

  test('refuses a known selector with a wrong secret, and does not re-run bcrypt for the same wrong token', async () => {
    const { minted } = await setup();
    const wrong = withOtherSecret(minted.token, 1);
    expectError(await request(ctx.app).get('/v1/me').set('X-API-Key', wrong), 401, 'INVALID_API_KEY');
    expectError(await request(ctx.app).get('/v1/me').set('X-API-Key', wrong), 401, 'INVALID_API_KEY');
    expect(hasher.verifyCalls).toBe(1);
    expect((await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token)).status).toBe(200);
  });

  test('after ten wrong secrets for one token, refuses further guesses with 429 and Retry-After without bcrypt', async () => {
    const { minted } = await setup();
    expect((await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token)).status).toBe(200);
    for (let i = 0; i < 10; i++) {
      expectError(await request(ctx.app).get('/v1/me').set('X-API-Key', withOtherSecret(minted.token, i)), 401, 'INVALID_API_KEY');
    }
    const calls = hasher.verifyCalls;
    const res = await request(ctx.app).get('/v1/me').set('X-API-Key', withOtherSecret(minted.token, 10));
    expectError(res, 429, 'RATE_LIMITED');
    expect(Number(res.headers['retry-after'])).toBeGreaterThanOrEqual(1);
    expect(Number(res.headers['retry-after'])).toBeLessThanOrEqual(60);
    expect(hasher.verifyCalls).toBe(calls);
    // The rightful holder, already verified, is not locked out.
    expect((await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token)).status).toBe(200);
  });
});

describe('verification cost and state', () => {
  test('a key respelt in the other environment (checksum recomputed) is not that key, before or after the real one is cached', async () => {
    const { minted } = await setup();
    const body = minted.token.slice(0, -6).replace(/^kw_live_/, 'kw_test_');
    const respelt = body + checksum(body);
    expectError(await request(ctx.app).get('/v1/me').set('X-API-Key', respelt), 401, 'INVALID_API_KEY');
    expect((await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token)).body.token.environment).toBe('live');
    expectError(await request(ctx.app).get('/v1/me').set('X-API-Key', respelt), 401, 'INVALID_API_KEY');
    expect(ctx.app.verifier.knows(minted.token)).toBe(true);
    expect(ctx.app.verifier.knows(respelt)).toBe(false);
  });

  test('runs bcrypt on the first request only, and revoking makes the next request fail', async () => {
    const { minted } = await setup();
    for (let i = 0; i < 5; i++) expect((await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token)).status).toBe(200);
    expect(hasher.verifyCalls).toBe(1);
    expect(ctx.app.verifier.stats).toEqual({ bcryptChecks: 1, cacheHits: 4, cacheMisses: 1 });

    await request(ctx.app).delete(`/admin/tokens/${minted.id}`).set(admin).expect(204);
    expectError(await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token), 401, 'API_KEY_REVOKED');
    expect(hasher.verifyCalls).toBe(1);
  });

  test('shares one bcrypt check between concurrent first requests with the same token', async () => {
    const { minted } = await setup();
    const results = await Promise.all(Array.from({ length: 8 }, () => request(ctx.app).get('/v1/me').set('X-API-Key', minted.token)));
    expect(results.map((r) => r.status)).toEqual(Array(8).fill(200));
    expect(hasher.verifyCalls).toBe(1);
  });

  test('refuses an expired token with 401 API_KEY_EXPIRED, to the second', async () => {
    const { minted } = await setup({ expires_in: 60 });
    ctx.clock.advance(59);
    expect((await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token)).status).toBe(200);
    ctx.clock.advance(1);
    expectError(await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token), 401, 'API_KEY_EXPIRED');
  });

  test('refuses the tokens of a disabled user with 403 USER_DISABLED until the user is enabled', async () => {
    const { user, minted } = await setup();
    await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: true }).expect(200);
    expectError(await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token), 403, 'USER_DISABLED');
    await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: false }).expect(200);
    expect((await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token)).status).toBe(200);
  });

  test('answers 503 UNAVAILABLE, never 401, when the database cannot answer', async () => {
    const { minted } = await setup();
    await ctx.storage.close();
    const res = await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token);
    expectError(res, 503, 'UNAVAILABLE');
    expect(res.headers['retry-after']).toBe('1');
    expectError(await request(ctx.app).get('/readyz'), 503, 'UNAVAILABLE');
    ctx.close = async () => undefined;
  });
});

describe('the admin API refuses anything but the admin key', () => {
  test('asks for X-Admin-API-Key with 401 AUTHENTICATION_REQUIRED', async () => {
    const error = expectError(await request(ctx.app).get('/admin/users'), 401, 'AUTHENTICATION_REQUIRED');
    expect(error.message).toMatch(/X-Admin-API-Key/);
    expectError(await request(ctx.app).get('/admin/users').set('X-Admin-API-Key', ''), 401, 'AUTHENTICATION_REQUIRED');
  });

  test('refuses a wrong admin key with 401 INVALID_ADMIN_KEY, whatever its length', async () => {
    for (const key of ['x', ADMIN_KEY.toUpperCase(), ADMIN_KEY.slice(0, -1), `${ADMIN_KEY}x`, ADMIN_KEY.repeat(20)]) {
      expectError(await request(ctx.app).get('/admin/users').set('X-Admin-API-Key', key), 401, 'INVALID_ADMIN_KEY');
    }
  });

  test('never accepts a user token on /admin, in any header', async () => {
    const { minted } = await setup();
    const asUserKey = expectError(await request(ctx.app).get('/admin/users').set('X-API-Key', minted.token), 401, 'AUTHENTICATION_REQUIRED');
    expect(asUserKey.message).toMatch(/User API keys do not work on \/admin/);
    expectError(await request(ctx.app).get('/admin/users').set('Authorization', `Bearer ${minted.token}`), 401, 'AUTHENTICATION_REQUIRED');
    expectError(await request(ctx.app).get('/admin/users').set('X-Admin-API-Key', minted.token), 401, 'INVALID_ADMIN_KEY');
  });

  test('checks the admin key before reading the body', async () => {
    const res = await request(ctx.app).post('/admin/users').set('Content-Type', 'application/json').send('{not json');
    expectError(res, 401, 'AUTHENTICATION_REQUIRED');
    expect(await ctx.storage.db.selectFrom('users').select('id').execute()).toEqual([]);
  });
});
