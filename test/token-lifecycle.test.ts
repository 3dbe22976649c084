import request from 'supertest';
import { admin, allowWrites, createTestApp, createUser, expectError, mintToken, refuseWrites, type TestContext } from './helpers/app';

// Token lifecycle (issue "Token lifecycle"): expiry, live/test keys, rotation, PATCH, the admin-wide
// listing and MAX_TOKENS_PER_USER. Time only moves through the fake clock, never by sleeping.

let ctx: TestContext;
beforeEach(async () => {
  ctx = await createTestApp();
});
afterEach(async () => {
  await ctx.close();
});

/** The fake clock's start; every expected time below is written relative to it. */
const T0 = Date.parse('2026-01-01T00:00:00.000Z');
const at = (seconds: number): string => new Date(T0 + seconds * 1000).toISOString();
/** Milliseconds matter at the expiry boundary, and the clock only takes seconds. */
const advanceMs = (ms: number): void => ctx.clock.advance(ms / 1000);
/** Moves the clock to T0 + seconds, and proves it got there exactly (the boundary tests rely on it). */
function moveTo(seconds: number): void {
  advanceMs(T0 + seconds * 1000 - ctx.clock.now().getTime());
  expect(ctx.clock.now().toISOString()).toBe(at(seconds));
}

/** A fresh app whose configuration differs from the default (the variables are read at start). */
async function restartWith(env: Record<string, string>): Promise<void> {
  await ctx.close();
  ctx = await createTestApp({ env });
}

const MANAGER_SCOPES = ['bots:read', 'bots:write', 'tokens:read', 'tokens:write'];
const TOKEN = (env: 'live' | 'test') => new RegExp(`^kw_${env}_([0-9A-Za-z]{12})_[0-9A-Za-z]{32}[0-9A-Za-z]{6}$`);

const tokenRow = (id: number) => ctx.storage.db.selectFrom('tokens').selectAll().where('id', '=', id).executeTakeFirstOrThrow();
const allRows = () => ctx.storage.db.selectFrom('tokens').selectAll().orderBy('id').execute();
const me = (token: string) => request(ctx.app).get('/v1/me').set('X-API-Key', token);
const getToken = (id: number) => request(ctx.app).get(`/admin/tokens/${id}`).set(admin);
const rotate = (id: number, body?: Record<string, unknown>) => {
  const req = request(ctx.app).post(`/admin/tokens/${id}/rotate`).set(admin);
  return body === undefined ? req : req.send(body);
};
const patch = (id: number, body: unknown) => request(ctx.app).patch(`/admin/tokens/${id}`).set(admin).send(body as object);
const revoke = (id: number) => request(ctx.app).delete(`/admin/tokens/${id}`).set(admin).expect(204);
const mintRaw = (userId: number, body: unknown) => request(ctx.app).post(`/admin/users/${userId}/tokens`).set(admin).send(body as object);
const listAll = (query = '') => request(ctx.app).get(`/admin/tokens${query}`).set(admin);

async function expectWorks(token: string): Promise<request.Response> {
  const res = await me(token);
  expect({ status: res.status, body: res.body?.error }).toEqual({ status: 200, body: undefined });
  return res;
}

/** 401 API_KEY_EXPIRED carries a Bearer challenge naming the token as invalid (RFC 6750). */
async function expectExpired(token: string): Promise<void> {
  const res = await me(token);
  expectError(res, 401, 'API_KEY_EXPIRED');
  expect(res.headers['www-authenticate']).toBe('Bearer realm="keyward", error="invalid_token"');
}

describe('expiry at mint', () => {
  test('expires_in counts from now; the token works until the last millisecond and is expired at exactly expires_at', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { expires_in: 60 });
    expect(minted.expires_at).toBe(at(60));
    expect((await tokenRow(minted.id)).expires_at).toBe(at(60));

    moveTo(59.999);
    await expectWorks(minted.token);
    expect((await getToken(minted.id)).body.status).toBe('active');

    moveTo(60);
    await expectExpired(minted.token);
    expect((await getToken(minted.id)).body.status).toBe('expired');

    moveTo(3600);
    await expectExpired(minted.token);
  });

  test('expires_at is stored as UTC with milliseconds whatever offset it was given in, so text comparison stays correct', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { expires_at: '2026-01-01T02:30:00+02:00' });
    expect(minted.expires_at).toBe(at(30 * 60));
    expect((await tokenRow(minted.id)).expires_at).toBe(at(30 * 60));

    moveTo(30 * 60 - 0.001);
    await expectWorks(minted.token);
    moveTo(30 * 60);
    await expectExpired(minted.token);
  });

  test('an expires_at one millisecond in the future is accepted', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { expires_at: '2026-01-01T00:00:00.001Z' });
    expect(minted.expires_at).toBe('2026-01-01T00:00:00.001Z');
    await expectWorks(minted.token);
    advanceMs(1);
    await expectExpired(minted.token);
  });

  test('without a MAX_TOKEN_LIFETIME, a token minted with no expiry never expires', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    expect(minted.expires_at).toBeNull();
    ctx.clock.advance(20 * 365 * 86_400);
    await expectWorks(minted.token);
  });

  test.each([
    ['both expires_in and expires_at', { expires_in: 60, expires_at: '2026-01-02T00:00:00Z' }, 'expires_at', 'give expires_in or expires_at, not both'],
    ['an expires_at in the past', { expires_at: '2025-12-31T23:59:59.999Z' }, 'expires_at', 'must be in the future'],
    ['an expires_at equal to now', { expires_at: '2026-01-01T00:00:00.000Z' }, 'expires_at', 'must be in the future'],
    ['an expires_at equal to now, written with an offset', { expires_at: '2026-01-01T01:00:00+01:00' }, 'expires_at', 'must be in the future'],
    ['an expires_at that is not a date-time', { expires_at: 'tomorrow' }, 'expires_at', 'must match format "date-time"'],
    ['an expires_at with no time zone', { expires_at: '2026-01-02T00:00:00' }, 'expires_at', 'must match format "date-time"'],
    ['a zero expires_in', { expires_in: 0 }, 'expires_in', 'must be >= 1'],
    ['a negative expires_in', { expires_in: -1 }, 'expires_in', 'must be >= 1'],
    ['a fractional expires_in', { expires_in: 1.5 }, 'expires_in', 'must be integer'],
    ['an expires_in given as a string', { expires_in: '60' }, 'expires_in', 'must be integer'],
    ['a null expires_in', { expires_in: null }, 'expires_in', 'must be integer'],
  ])('refuses %s with 400 VALIDATION_ERROR and stores nothing', async (_what, body, field, message) => {
    const user = await createUser(ctx);
    const error = expectError(await mintRaw(user.id, body), 400, 'VALIDATION_ERROR');
    expect(error.details).toContainEqual({ field, in: 'body', message });
    expect(await allRows()).toEqual([]);
  });

  // ajv's date-time format accepts a leap second, which Date.parse cannot read (NaN). Anything the
  // schema lets through must be answered, never turned into a 500.
  test('an expires_at on a leap second is a client error, not a 500', async () => {
    const user = await createUser(ctx);
    const res = await mintRaw(user.id, { expires_at: '2026-06-30T23:59:60Z' });
    const error = expectError(res, 400, 'VALIDATION_ERROR');
    expect(error.details).toContainEqual({ field: 'expires_at', in: 'body', message: expect.any(String) });
    expect(await allRows()).toEqual([]);
  });
});

describe('MAX_TOKEN_LIFETIME', () => {
  test.each([['1h'], ['3600'], ['60m']])('MAX_TOKEN_LIFETIME=%s gives a token minted without expiry now + 1 hour', async (value) => {
    await restartWith({ MAX_TOKEN_LIFETIME: value });
    const user = await createUser(ctx);
    ctx.clock.advance(90);
    const minted = await mintToken(ctx, user.id);
    expect(minted.expires_at).toBe(at(90 + 3600));
    expect((await tokenRow(minted.id)).expires_at).toBe(at(90 + 3600));

    moveTo(90 + 3600 - 0.001);
    await expectWorks(minted.token);
    moveTo(90 + 3600);
    await expectExpired(minted.token);
  });

  test('a requested lifetime up to the cap is kept as asked', async () => {
    await restartWith({ MAX_TOKEN_LIFETIME: '1h' });
    const user = await createUser(ctx);
    expect((await mintToken(ctx, user.id, { expires_in: 3600 })).expires_at).toBe(at(3600));
    expect((await mintToken(ctx, user.id, { expires_in: 60 })).expires_at).toBe(at(60));
    expect((await mintToken(ctx, user.id, { expires_at: at(3600) })).expires_at).toBe(at(3600));
  });

  test.each([
    ['expires_in one second over the cap', { expires_in: 3601 }, 'expires_in'],
    ['expires_in of ten years', { expires_in: 315_360_000 }, 'expires_in'],
    ['expires_at one millisecond past the cap', { expires_at: '2026-01-01T01:00:00.001Z' }, 'expires_at'],
  ])('refuses %s with 400 naming MAX_TOKEN_LIFETIME', async (_what, body, field) => {
    await restartWith({ MAX_TOKEN_LIFETIME: '1h' });
    const user = await createUser(ctx);
    const error = expectError(await mintRaw(user.id, body), 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([{ field, in: 'body', message: expect.stringContaining('MAX_TOKEN_LIFETIME') }]);
    expect(await allRows()).toEqual([]);
  });
});

describe('expired and revoked tokens', () => {
  test('status moves from active to expired with the clock, in GET, in the user listing and in GET /admin/tokens', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { expires_in: 60 });
    const statuses = async () => [
      (await getToken(minted.id)).body.status,
      (await request(ctx.app).get(`/admin/users/${user.id}/tokens`).set(admin)).body.data[0].status,
      (await listAll()).body.data[0].status,
    ];
    expect(await statuses()).toEqual(['active', 'active', 'active']);
    moveTo(60);
    expect(await statuses()).toEqual(['expired', 'expired', 'expired']);
    // Expiry is computed, never written: the row keeps its expires_at and no revocation.
    expect(await tokenRow(minted.id)).toMatchObject({ expires_at: at(60), revoked_at: null });
  });

  test('revoked wins over expired, whichever happened first', async () => {
    const user = await createUser(ctx);
    const revokedThenExpired = await mintToken(ctx, user.id, { expires_in: 60 });
    const expiredThenRevoked = await mintToken(ctx, user.id, { expires_in: 30 });
    ctx.clock.advance(10);
    await revoke(revokedThenExpired.id);
    moveTo(45);
    await revoke(expiredThenRevoked.id);
    moveTo(120);

    for (const t of [revokedThenExpired, expiredThenRevoked]) {
      expect((await getToken(t.id)).body).toMatchObject({ status: 'revoked' });
      const res = await me(t.token);
      expectError(res, 401, 'API_KEY_REVOKED');
    }
    expect((await getToken(revokedThenExpired.id)).body.revoked_at).toBe(at(10));
    expect((await getToken(expiredThenRevoked.id)).body.revoked_at).toBe(at(45));
  });
});

describe('live and test keys', () => {
  test('the default is live: in the token, masked, the DB, listings and GET /v1/me', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    const [, selector] = TOKEN('live').exec(minted.token)!;
    expect(minted).toMatchObject({ environment: 'live', masked: `kw_live_${selector}_…${minted.token.slice(-4)}` });
    expect((await tokenRow(minted.id)).environment).toBe('live');
    expect((await listAll()).body.data[0]).toMatchObject({ environment: 'live', masked: minted.masked });
    expect((await expectWorks(minted.token)).body.token).toMatchObject({ environment: 'live', masked: minted.masked });
  });

  test('a test key says so in the token, masked, the DB, every listing and GET /v1/me', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { environment: 'test' });
    const [, selector] = TOKEN('test').exec(minted.token)!;
    expect(minted).toMatchObject({ environment: 'test', masked: `kw_test_${selector}_…${minted.token.slice(-4)}` });
    expect((await tokenRow(minted.id)).environment).toBe('test');
    expect((await getToken(minted.id)).body).toMatchObject({ environment: 'test', masked: minted.masked });
    expect((await request(ctx.app).get(`/admin/users/${user.id}/tokens`).set(admin)).body.data[0]).toMatchObject({ environment: 'test', masked: minted.masked });
    expect((await listAll()).body.data[0]).toMatchObject({ environment: 'test', masked: minted.masked });
    expect((await expectWorks(minted.token)).body.token).toEqual({
      id: minted.id, name: null, scopes: ['bots:read', 'bots:write'], environment: 'test', masked: minted.masked, expires_at: null, allowed_ips: null, metadata: null, rate_limit_per_minute: null,
    });
  });

  test('an explicit live is the same as the default', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { environment: 'live' });
    expect(minted.token).toMatch(TOKEN('live'));
  });

  test.each([['prod'], ['LIVE'], ['Test'], [''], [null], [1]])('refuses environment %p with 400 and stores nothing', async (environment) => {
    const user = await createUser(ctx);
    const error = expectError(await mintRaw(user.id, { environment }), 400, 'VALIDATION_ERROR');
    expect((error.details as Array<{ field: string; in: string }>).map((d) => [d.field, d.in])).toContainEqual(['environment', 'body']);
    expect(await allRows()).toEqual([]);
  });
});

describe('POST /admin/tokens/{id}/rotate', () => {
  test('mints a successor with the same name, scopes, environment and allowlist, shown once, linked both ways', async () => {
    const user = await createUser(ctx);
    const old = await mintToken(ctx, user.id, {
      name: 'deploy', scopes: ['tokens:read', 'bots:read'], environment: 'test', allowed_ips: ['127.0.0.1', '10.1.2.3/8'],
    });
    ctx.clock.advance(300);

    const res = await rotate(old.id);
    expect(res.status).toBe(201);
    expect(res.headers.location).toBe(`/admin/tokens/${res.body.id}`);
    expect(res.headers['cache-control']).toBe('no-store');
    expect(res.body.id).not.toBe(old.id);
    const [, selector] = TOKEN('test').exec(res.body.token)!;
    expect(res.body).toEqual({
      id: res.body.id, token: res.body.token, user_id: user.id, name: 'deploy', scopes: ['bots:read', 'tokens:read'], environment: 'test',
      masked: `kw_test_${selector}_…${res.body.token.slice(-4)}`, status: 'active', allowed_ips: ['127.0.0.1', '10.0.0.0/8'], metadata: null, rate_limit_per_minute: null,
      created_at: at(300), expires_at: null, revoked_at: null, last_used_at: null, last_used_ip: null, rotated_from: old.id, rotated_to: null,
    });
    expect(res.body.token).not.toBe(old.token);

    expect(await tokenRow(res.body.id)).toMatchObject({
      user_id: user.id, name: 'deploy', scopes: 'bots:read tokens:read', environment: 'test', allowed_ips: '["127.0.0.1","10.0.0.0/8"]',
      created_at: at(300), expires_at: null, revoked_at: null, rotated_from: old.id, rotated_to: null, selector,
    });
    // The default grace period is a day; the old token is not revoked, it just ends then.
    expect(await tokenRow(old.id)).toMatchObject({ rotated_to: res.body.id, rotated_from: null, expires_at: at(300 + 86_400), revoked_at: null });
    expect((await getToken(old.id)).body).toMatchObject({ status: 'active', rotated_to: res.body.id, rotated_from: null, expires_at: at(300 + 86_400) });
    expect((await getToken(res.body.id)).body).toMatchObject({ status: 'active', rotated_from: old.id, rotated_to: null });
    expect(await allRows()).toHaveLength(2);

    await expectWorks(old.token);
    await expectWorks(res.body.token);
  });

  test('the default grace period (86400 s): the old token works until its last millisecond, then 401 API_KEY_EXPIRED', async () => {
    const user = await createUser(ctx);
    const old = await mintToken(ctx, user.id);
    const res = await rotate(old.id, {});
    expect(res.status).toBe(201);
    moveTo(86_400 - 0.001);
    await expectWorks(old.token);
    moveTo(86_400);
    await expectExpired(old.token);
    expect((await getToken(old.id)).body).toMatchObject({ status: 'expired', rotated_to: res.body.id });
    await expectWorks(res.body.token);
  });

  test('grace_period_seconds: 0 ends the old token at once', async () => {
    const user = await createUser(ctx);
    const old = await mintToken(ctx, user.id);
    await expectWorks(old.token); // so a remembered verification cannot keep it alive
    ctx.clock.advance(42);

    const res = await rotate(old.id, { grace_period_seconds: 0 });
    expect(res.status).toBe(201);
    await expectExpired(old.token);
    await expectWorks(res.body.token);
    expect(await tokenRow(old.id)).toMatchObject({ expires_at: at(42), rotated_to: res.body.id, revoked_at: null });
    expect((await getToken(old.id)).body).toMatchObject({ status: 'expired', expires_at: at(42), rotated_to: res.body.id });
  });

  test('a grace period of 600 s: works just before the end, expired at and after it', async () => {
    const user = await createUser(ctx);
    const old = await mintToken(ctx, user.id);
    ctx.clock.advance(100);
    const res = await rotate(old.id, { grace_period_seconds: 600 });
    expect(res.status).toBe(201);
    expect((await tokenRow(old.id)).expires_at).toBe(at(700));

    moveTo(700 - 0.001);
    await expectWorks(old.token);
    moveTo(700);
    await expectExpired(old.token);
    moveTo(10_000);
    await expectExpired(old.token);
    await expectWorks(res.body.token);
  });

  test('the maximum grace period, 604800 s, is accepted', async () => {
    const user = await createUser(ctx);
    const old = await mintToken(ctx, user.id);
    expect((await rotate(old.id, { grace_period_seconds: 604_800 })).status).toBe(201);
    expect((await tokenRow(old.id)).expires_at).toBe(at(604_800));
  });

  test('the successor keeps the lifetime, counted from the rotation: 1 day rotated 2 hours in ends 1 day after the rotation', async () => {
    const user = await createUser(ctx);
    const old = await mintToken(ctx, user.id, { expires_in: 86_400 });
    ctx.clock.advance(2 * 3600);

    const res = await rotate(old.id);
    expect(res.status).toBe(201);
    expect(res.body.expires_at).toBe(at(2 * 3600 + 86_400));
    expect((await tokenRow(res.body.id)).expires_at).toBe(at(2 * 3600 + 86_400));
    // min(own expiry, now + grace): a day's grace from 02:00 would outlive the token's own end at 24:00.
    expect((await tokenRow(old.id)).expires_at).toBe(at(86_400));

    moveTo(86_400 - 0.001);
    await expectWorks(old.token);
    moveTo(86_400);
    await expectExpired(old.token);
    await expectWorks(res.body.token);
    moveTo(2 * 3600 + 86_400);
    await expectExpired(res.body.token);
  });

  test('an old token whose own expiry comes before the end of a short grace period still ends at its own time', async () => {
    const user = await createUser(ctx);
    const old = await mintToken(ctx, user.id, { expires_in: 3600 });
    ctx.clock.advance(3000);
    const res = await rotate(old.id, { grace_period_seconds: 3600 });
    expect(res.status).toBe(201);
    expect((await tokenRow(old.id)).expires_at).toBe(at(3600));
    expect(res.body.expires_at).toBe(at(3000 + 3600));
    moveTo(3600 - 0.001);
    await expectWorks(old.token);
    moveTo(3600);
    await expectExpired(old.token);
  });

  test('when the grace period ends first, the old token ends then, not at its own expiry', async () => {
    const user = await createUser(ctx);
    const old = await mintToken(ctx, user.id, { expires_in: 86_400 });
    const res = await rotate(old.id, { grace_period_seconds: 60 });
    expect(res.status).toBe(201);
    expect((await tokenRow(old.id)).expires_at).toBe(at(60));
  });

  test('under MAX_TOKEN_LIFETIME the successor gets the old lifetime from now (the cap, for a token minted without expiry)', async () => {
    await restartWith({ MAX_TOKEN_LIFETIME: '1h' });
    const user = await createUser(ctx);
    const capped = await mintToken(ctx, user.id);
    const short = await mintToken(ctx, user.id, { expires_in: 600 });
    ctx.clock.advance(300);
    const fromCapped = await rotate(capped.id);
    const fromShort = await rotate(short.id);
    expect(fromCapped.body.expires_at).toBe(at(300 + 3600));
    expect(fromShort.body.expires_at).toBe(at(300 + 600));
  });

  test('the successor can itself be rotated, and the chain stays linked', async () => {
    const user = await createUser(ctx);
    const a = await mintToken(ctx, user.id);
    const b = (await rotate(a.id, { grace_period_seconds: 0 })).body;
    const c = await rotate(b.id, { grace_period_seconds: 60 });
    expect(c.status).toBe(201);
    expect(await tokenRow(b.id)).toMatchObject({ rotated_from: a.id, rotated_to: c.body.id });
    expect(c.body).toMatchObject({ rotated_from: b.id, rotated_to: null });
  });

  test.each([
    ['a negative grace period', { grace_period_seconds: -1 }, 'grace_period_seconds', 'must be >= 0'],
    ['a grace period over 7 days', { grace_period_seconds: 604_801 }, 'grace_period_seconds', 'must be <= 604800'],
    ['a fractional grace period', { grace_period_seconds: 1.5 }, 'grace_period_seconds', 'must be integer'],
    ['a grace period given as a string', { grace_period_seconds: '60' }, 'grace_period_seconds', 'must be integer'],
    ['a null grace period', { grace_period_seconds: null }, 'grace_period_seconds', 'must be integer'],
    ['an unknown field', { grace: 60 }, 'grace', 'is not a known field'],
    ['a field of the mint body', { expires_in: 60 }, 'expires_in', 'is not a known field'],
  ])('refuses %s with 400 and changes nothing', async (_what, body, field, message) => {
    const user = await createUser(ctx);
    const old = await mintToken(ctx, user.id);
    const before = await allRows();
    const error = expectError(await rotate(old.id, body), 400, 'VALIDATION_ERROR');
    expect(error.details).toContainEqual({ field, in: 'body', message });
    expect(await allRows()).toEqual(before);
    await expectWorks(old.token);
  });

  test('a revoked token cannot be rotated: 409 CONFLICT, nothing minted', async () => {
    const user = await createUser(ctx);
    const old = await mintToken(ctx, user.id);
    await revoke(old.id);
    expectError(await rotate(old.id), 409, 'CONFLICT');
    expect(await allRows()).toHaveLength(1);
    expect((await tokenRow(old.id)).rotated_to).toBeNull();
  });

  test('an expired token cannot be rotated, from exactly its expiry: 409 CONFLICT', async () => {
    const user = await createUser(ctx);
    const old = await mintToken(ctx, user.id, { expires_in: 60 });
    moveTo(60);
    expectError(await rotate(old.id), 409, 'CONFLICT');
    expect(await allRows()).toHaveLength(1);
    expect(await tokenRow(old.id)).toMatchObject({ rotated_to: null, expires_at: at(60) });
  });

  test('a token already rotated (still in its grace period) cannot be rotated again: 409 naming its successor', async () => {
    const user = await createUser(ctx);
    const old = await mintToken(ctx, user.id);
    const first = await rotate(old.id);
    ctx.clock.advance(60);
    const error = expectError(await rotate(old.id), 409, 'CONFLICT');
    expect(error.details).toEqual({ rotated_to: first.body.id });
    expect(await allRows()).toHaveLength(2);
    // The refused second rotation must not have moved the first one's grace period either.
    expect(await tokenRow(old.id)).toMatchObject({ rotated_to: first.body.id, expires_at: at(86_400) });
  });

  test('a rotated token whose grace period is over is expired: 409', async () => {
    const user = await createUser(ctx);
    const old = await mintToken(ctx, user.id);
    await rotate(old.id, { grace_period_seconds: 0 });
    expectError(await rotate(old.id), 409, 'CONFLICT');
    expect(await allRows()).toHaveLength(2);
  });

  test('an unknown token is 404', async () => {
    expectError(await rotate(12345), 404, 'NOT_FOUND');
    expect(await allRows()).toEqual([]);
  });
});

describe('PATCH /admin/tokens/{id}', () => {
  test('changes name, scopes, allowlist and expiry at once, in the response and the row', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { name: 'old' });
    ctx.clock.advance(10);
    const res = await patch(minted.id, {
      name: 'new', scopes: ['tokens:read', 'bots:read', 'tokens:read'], allowed_ips: ['10.1.2.3/8', '127.0.0.1'], expires_at: '2026-01-01T03:00:00+02:00',
    });
    expect(res.status).toBe(200);
    expect(res.body).toEqual({
      id: minted.id, user_id: user.id, name: 'new', scopes: ['bots:read', 'tokens:read'], environment: 'live', masked: minted.masked,
      status: 'active', allowed_ips: ['10.0.0.0/8', '127.0.0.1'], metadata: null, rate_limit_per_minute: null, created_at: at(0), expires_at: at(3600), revoked_at: null,
      last_used_at: null, last_used_ip: null, rotated_from: null, rotated_to: null,
    });
    expect(await tokenRow(minted.id)).toMatchObject({
      name: 'new', scopes: 'bots:read tokens:read', allowed_ips: '["10.0.0.0/8","127.0.0.1"]', expires_at: at(3600), created_at: at(0),
    });
    // PATCH changes metadata only: the secret and the token's identity stay.
    await expectWorks(minted.token);
  });

  test('name: null clears the name, and a PATCH leaves fields it does not name alone', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { name: 'ci', scopes: ['bots:read'], allowed_ips: ['127.0.0.1'], expires_in: 600 });
    const res = await patch(minted.id, { name: null });
    expect(res.status).toBe(200);
    expect(await tokenRow(minted.id)).toMatchObject({ name: null, scopes: 'bots:read', allowed_ips: '["127.0.0.1"]', expires_at: at(600) });
  });

  test('dropping a scope takes effect on the very next request: 403 INSUFFICIENT_SCOPE', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { scopes: ['bots:read', 'tokens:read'] });
    expect((await request(ctx.app).get('/v1/tokens').set('X-API-Key', minted.token)).status).toBe(200);

    expect((await patch(minted.id, { scopes: ['bots:read'] })).status).toBe(200);
    const error = expectError(await request(ctx.app).get('/v1/tokens').set('X-API-Key', minted.token), 403, 'INSUFFICIENT_SCOPE');
    expect(error.details).toEqual({ required: ['tokens:read'] });
    expect((await expectWorks(minted.token)).body.token.scopes).toEqual(['bots:read']);

    expect((await patch(minted.id, { scopes: ['bots:read', 'tokens:read'] })).status).toBe(200);
    expect((await request(ctx.app).get('/v1/tokens').set('X-API-Key', minted.token)).status).toBe(200);
  });

  test('an allowlist that excludes the caller takes effect on the very next request: 403 FORBIDDEN_IP; null lifts it', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    await expectWorks(minted.token);

    expect((await patch(minted.id, { allowed_ips: ['10.0.0.0/8', '2001:db8::/32'] })).status).toBe(200);
    const error = expectError(await me(minted.token), 403, 'FORBIDDEN_IP');
    expect(error.details).toEqual({ ip: expect.stringMatching(/127\.0\.0\.1$/) });

    expect((await patch(minted.id, { allowed_ips: ['127.0.0.1'] })).status).toBe(200);
    expect((await expectWorks(minted.token)).body.token.allowed_ips).toEqual(['127.0.0.1']);

    expect((await patch(minted.id, { allowed_ips: null })).status).toBe(200);
    expect((await tokenRow(minted.id)).allowed_ips).toBeNull();
    expect((await expectWorks(minted.token)).body.token.allowed_ips).toBeNull();
  });

  test('a new expires_at takes effect on the next request, to the millisecond', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    await expectWorks(minted.token);
    ctx.clock.advance(100);
    const res = await patch(minted.id, { expires_at: at(700) });
    expect(res.body).toMatchObject({ status: 'active', expires_at: at(700) });
    moveTo(700 - 0.001);
    await expectWorks(minted.token);
    moveTo(700);
    await expectExpired(minted.token);
  });

  test('expires_at: null removes the expiry when there is no MAX_TOKEN_LIFETIME', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { expires_in: 60 });
    const res = await patch(minted.id, { expires_at: null });
    expect(res.status).toBe(200);
    expect(res.body.expires_at).toBeNull();
    expect((await tokenRow(minted.id)).expires_at).toBeNull();
    ctx.clock.advance(10 * 365 * 86_400);
    await expectWorks(minted.token);
  });

  test.each([
    ['an empty body', {}, 'body', 'must NOT have fewer than 1 properties'],
    ['an unknown field', { ttl: 60 }, 'ttl', 'is not a known field'],
    ['a field only mint takes', { environment: 'test' }, 'environment', 'is not a known field'],
    ['an expires_at in the past', { expires_at: '2025-12-31T23:59:59.999Z' }, 'expires_at', 'must be in the future'],
    ['an expires_at equal to now', { expires_at: '2026-01-01T00:00:00.000Z' }, 'expires_at', 'must be in the future'],
    ['an expires_at that is not a date-time', { expires_at: 'soon' }, 'expires_at', 'must match format "date-time"'],
    ['an empty scope list', { scopes: [] }, 'scopes', 'must NOT have fewer than 1 items'],
    ['an unknown scope', { scopes: ['root'] }, 'scopes', 'unknown scope "root"; valid scopes are bots:read, bots:write, tokens:read, tokens:write'],
    ['an allowlist entry that is not an address', { allowed_ips: ['example.com'] }, 'allowed_ips', '"example.com" is not an IPv4/IPv6 address or CIDR range'],
    ['a good name with a past expires_at', { name: 'renamed', expires_at: '2025-01-01T00:00:00Z' }, 'expires_at', 'must be in the future'],
  ])('refuses %s with 400 and changes nothing', async (_what, body, field, message) => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { name: 'keep', expires_in: 600 });
    const before = await tokenRow(minted.id);
    const error = expectError(await patch(minted.id, body), 400, 'VALIDATION_ERROR');
    expect(error.details).toContainEqual({ field, in: 'body', message });
    expect(await tokenRow(minted.id)).toEqual(before);
  });

  test('a PATCH with no body at all is 400', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    const error = expectError(await request(ctx.app).patch(`/admin/tokens/${minted.id}`).set(admin), 400, 'VALIDATION_ERROR');
    expect(error.details).toContainEqual({ field: 'body', in: 'body', message: 'a JSON body is required' });
  });

  test('an expires_at on a leap second is a client error, not a 500', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    const before = await tokenRow(minted.id);
    expectError(await patch(minted.id, { expires_at: '2026-06-30T23:59:60Z' }), 400, 'VALIDATION_ERROR');
    expect(await tokenRow(minted.id)).toEqual(before);
  });

  describe('under MAX_TOKEN_LIFETIME=1h', () => {
    beforeEach(async () => {
      await restartWith({ MAX_TOKEN_LIFETIME: '1h' });
    });

    test('expires_at: null is refused, naming MAX_TOKEN_LIFETIME', async () => {
      const user = await createUser(ctx);
      const minted = await mintToken(ctx, user.id);
      const error = expectError(await patch(minted.id, { expires_at: null }), 400, 'VALIDATION_ERROR');
      expect(error.details).toEqual([{ field: 'expires_at', in: 'body', message: expect.stringContaining('MAX_TOKEN_LIFETIME') }]);
      expect((await tokenRow(minted.id)).expires_at).toBe(at(3600));
    });

    test('the cap counts from the token\'s creation, not from the PATCH', async () => {
      const user = await createUser(ctx);
      const minted = await mintToken(ctx, user.id, { expires_in: 2400 });
      ctx.clock.advance(1800);

      // now + 1h is within MAX_TOKEN_LIFETIME of now, but not of the token's creation.
      const error = expectError(await patch(minted.id, { expires_at: at(1800 + 3600) }), 400, 'VALIDATION_ERROR');
      expect(error.details).toEqual([{ field: 'expires_at', in: 'body', message: expect.stringContaining('MAX_TOKEN_LIFETIME') }]);
      expectError(await patch(minted.id, { expires_at: '2026-01-01T01:00:00.001Z' }), 400, 'VALIDATION_ERROR');
      expect((await tokenRow(minted.id)).expires_at).toBe(at(2400));

      const res = await patch(minted.id, { expires_at: at(3600) });
      expect(res.status).toBe(200);
      expect((await tokenRow(minted.id)).expires_at).toBe(at(3600));
    });

    test('a token that is expired in the meantime cannot be extended: 409', async () => {
      const user = await createUser(ctx);
      const minted = await mintToken(ctx, user.id, { expires_in: 600 });
      moveTo(600);
      expectError(await patch(minted.id, { expires_at: at(3600) }), 409, 'CONFLICT');
      expect((await tokenRow(minted.id)).expires_at).toBe(at(600));
      await expectExpired(minted.token);
    });
  });

  test('a revoked token cannot be changed: 409, row unchanged', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { name: 'gone' });
    await revoke(minted.id);
    const before = await tokenRow(minted.id);
    expectError(await patch(minted.id, { name: 'back' }), 409, 'CONFLICT');
    expectError(await patch(minted.id, { expires_at: at(600) }), 409, 'CONFLICT');
    expect(await tokenRow(minted.id)).toEqual(before);
  });

  test('an expired token cannot be changed or revived, from exactly its expiry: 409', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { expires_in: 60 });
    moveTo(60);
    const before = await tokenRow(minted.id);
    expectError(await patch(minted.id, { expires_at: at(3600) }), 409, 'CONFLICT');
    expectError(await patch(minted.id, { expires_at: null }), 409, 'CONFLICT');
    expectError(await patch(minted.id, { name: 'x' }), 409, 'CONFLICT');
    expect(await tokenRow(minted.id)).toEqual(before);
    await expectExpired(minted.token);
  });

  test('an unknown token is 404', async () => {
    expectError(await patch(999, { name: 'x' }), 404, 'NOT_FOUND');
  });

  // Rotation promises the old token stops at the end of its grace period. If PATCH could move or
  // remove that end, a rotated-out (possibly leaked) token would live on beside its successor.
  test('a rotated-out token in its grace period cannot have its end moved later or removed', async () => {
    const user = await createUser(ctx);
    const old = await mintToken(ctx, user.id);
    const successor = await rotate(old.id, { grace_period_seconds: 600 });
    expect(successor.status).toBe(201);

    for (const expires_at of [at(7 * 86_400), null]) {
      const error = expectError(await patch(old.id, { expires_at }), 409, 'CONFLICT');
      expect(error.details).toEqual({ rotated_to: successor.body.id });
    }
    expect(await tokenRow(old.id)).toMatchObject({ expires_at: at(600), rotated_to: successor.body.id });
    moveTo(600);
    await expectExpired(old.token);
  });
});

describe('GET /admin/tokens', () => {
  type Listed = { id: number; user_id: number; status: string; environment: string };
  const ids = (res: request.Response) => (res.body.data as Listed[]).map((t) => t.id);

  /** Every id of a listing, page by page, each page's cursor sent with the same filters. */
  const walk = async (filters: string, limit: number) => {
    const seen: number[] = [];
    let cursor: string | null = null;
    for (let pages = 0; pages < 50; pages++) {
      const res: request.Response = await listAll(`?limit=${limit}${filters}${cursor ? `&cursor=${cursor}` : ''}`);
      expect(res.status).toBe(200);
      expect(res.body.meta.limit).toBe(limit);
      expect(res.body.data.length).toBeLessThanOrEqual(limit);
      seen.push(...ids(res));
      cursor = res.body.meta.next_cursor;
      if (cursor === null) return seen;
      expect(res.body.data).toHaveLength(limit);
    }
    throw new Error('pagination did not end');
  };

  test('lists every user\'s tokens, oldest first, masked, with the list envelope', async () => {
    const u1 = await createUser(ctx);
    const u2 = await createUser(ctx);
    const a = await mintToken(ctx, u1.id);
    const b = await mintToken(ctx, u2.id, { environment: 'test' });
    const c = await mintToken(ctx, u1.id);
    const res = await listAll();
    expect(res.status).toBe(200);
    expect(Object.keys(res.body).sort()).toEqual(['data', 'meta']);
    expect(res.body.meta).toEqual({ limit: 50, next_cursor: null });
    expect(ids(res)).toEqual([a.id, b.id, c.id]);
    expect(res.body.data[1]).toEqual((await getToken(b.id)).body);
    const text = JSON.stringify(res.body);
    for (const t of [a, b, c]) expect(text).not.toContain(t.token);
    expect(text).not.toContain('$2b$');
  });

  test('filters by user_id, environment and status, alone and together, following the clock', async () => {
    const u1 = await createUser(ctx);
    const u2 = await createUser(ctx);
    const forever = await mintToken(ctx, u1.id);
    const minute = await mintToken(ctx, u1.id, { expires_in: 60 });
    const revoked = await mintToken(ctx, u2.id, { environment: 'test' });
    const revokedAndExpiring = await mintToken(ctx, u2.id, { expires_in: 60 });
    const testTwoMinutes = await mintToken(ctx, u1.id, { environment: 'test', expires_in: 120 });
    await revoke(revoked.id);
    await revoke(revokedAndExpiring.id);

    const check = async (expected: Record<string, number[]>) => {
      for (const [query, want] of Object.entries(expected)) {
        const res = await listAll(query);
        expect({ query, status: res.status, ids: ids(res) }).toEqual({ query, status: 200, ids: want });
      }
    };

    await check({
      '?status=active': [forever.id, minute.id, testTwoMinutes.id],
      '?status=expired': [],
      '?status=revoked': [revoked.id, revokedAndExpiring.id],
      [`?user_id=${u1.id}`]: [forever.id, minute.id, testTwoMinutes.id],
      [`?user_id=${u2.id}`]: [revoked.id, revokedAndExpiring.id],
      '?environment=test': [revoked.id, testTwoMinutes.id],
      '?environment=live': [forever.id, minute.id, revokedAndExpiring.id],
    });

    moveTo(60 - 0.001);
    await check({ '?status=active': [forever.id, minute.id, testTwoMinutes.id], '?status=expired': [] });

    // At exactly expires_at a token is expired; a revoked one stays revoked.
    moveTo(60);
    await check({
      '?status=active': [forever.id, testTwoMinutes.id],
      '?status=expired': [minute.id],
      '?status=revoked': [revoked.id, revokedAndExpiring.id],
      [`?user_id=${u1.id}&status=expired`]: [minute.id],
      [`?user_id=${u2.id}&status=expired`]: [],
    });

    moveTo(120);
    await check({
      '?status=active': [forever.id],
      '?status=expired': [minute.id, testTwoMinutes.id],
      '?environment=test&status=expired': [testTwoMinutes.id],
      '?environment=test&status=revoked': [revoked.id],
      [`?user_id=${u1.id}&environment=test&status=expired`]: [testTwoMinutes.id],
      [`?user_id=${u2.id}&environment=live&status=active`]: [],
    });
  });

  test('the status filter agrees with the status each listed token shows', async () => {
    const user = await createUser(ctx);
    for (const body of [{}, { expires_in: 30 }, { expires_in: 90 }, { environment: 'test' }]) await mintToken(ctx, user.id, body);
    const rotated = await mintToken(ctx, user.id);
    await rotate(rotated.id, { grace_period_seconds: 45 });
    await revoke(1);
    moveTo(60);

    const all = (await listAll()).body.data as Listed[];
    for (const status of ['active', 'expired', 'revoked']) {
      const filtered = (await listAll(`?status=${status}`)).body.data as Listed[];
      expect(filtered).toEqual(all.filter((t) => t.status === status));
    }
    // Every status turns up, so the comparison above is not vacuous.
    expect(new Set(all.map((t) => t.status))).toEqual(new Set(['active', 'expired', 'revoked']));
  });

  test('a user_id that names no user is 404', async () => {
    await createUser(ctx);
    expectError(await listAll('?user_id=999'), 404, 'NOT_FOUND');
  });

  test.each([
    ['?status=bogus', 'status', 'must be equal to one of the allowed values'],
    ['?status=ACTIVE', 'status', 'must be equal to one of the allowed values'],
    ['?status=', 'status', 'must be equal to one of the allowed values'],
    ['?environment=prod', 'environment', 'must be equal to one of the allowed values'],
    ['?user_id=abc', 'user_id', 'must be integer'],
    ['?user_id=1.5', 'user_id', 'must be integer'],
    ['?user_id=0', 'user_id', 'must be >= 1'],
    ['?limit=0', 'limit', 'must be >= 1'],
    ['?limit=101', 'limit', 'must be <= 100'],
    ['?cursor=bm90LWEtY3Vyc29y', 'cursor', 'is not a cursor this server issued'],
    ['?state=active', 'state', 'is not a known field'],
    ['?never_used=maybe', 'never_used', 'must be boolean'],
    ['?never_used=1', 'never_used', 'must be boolean'],
    ['?expires_before=not-a-date', 'expires_before', 'must match format "date-time"'],
    ['?expires_before=2026-13-40T00:00:00Z', 'expires_before', 'must match format "date-time"'],
    ['?expires_before=2026-01-08', 'expires_before', 'must match format "date-time"'],
    // RFC 3339 allows a leap second, Date cannot hold one: the same rule as the audit log's since/until.
    ['?expires_before=2026-06-30T23:59:60Z', 'expires_before', 'is not a time keyward can represent'],
  ])('%s is 400 VALIDATION_ERROR in the query', async (query, field, message) => {
    await createUser(ctx);
    const error = expectError(await listAll(query), 400, 'VALIDATION_ERROR');
    expect(error.details).toContainEqual({ field, in: 'query', message });
  });

  test('a repeated filter is refused, not half-applied', async () => {
    const error = expectError(await listAll('?status=active&status=revoked'), 400, 'VALIDATION_ERROR');
    expect((error.details as Array<{ field: string; in: string }>).every((d) => d.in === 'query' && d.field === 'status')).toBe(true);
  });

  test('pagination walks every page once, with and without filters', async () => {
    const users = [await createUser(ctx), await createUser(ctx), await createUser(ctx)];
    const minted: Array<{ id: number; env: string; user: number }> = [];
    for (let i = 0; i < 11; i++) {
      const env = i % 3 === 0 ? 'test' : 'live';
      const user = users[i % 3]!.id;
      minted.push({ id: (await mintToken(ctx, user, { environment: env })).id, env, user });
    }

    for (const limit of [1, 2, 3, 11, 100]) {
      const seen = await walk('', limit);
      expect(seen).toEqual(minted.map((t) => t.id));
      expect(new Set(seen).size).toBe(seen.length);
    }
    expect(await walk('&environment=test', 2)).toEqual(minted.filter((t) => t.env === 'test').map((t) => t.id));
    expect(await walk(`&user_id=${users[1]!.id}&status=active`, 1)).toEqual(minted.filter((t) => t.user === users[1]!.id).map((t) => t.id));
  });

  test('a full last page says so: next_cursor is null when exactly limit tokens remain', async () => {
    const user = await createUser(ctx);
    for (let i = 0; i < 4; i++) await mintToken(ctx, user.id);
    const first = await listAll('?limit=2');
    expect(first.body.meta.next_cursor).toEqual(expect.any(String));
    const second = await listAll(`?limit=2&cursor=${first.body.meta.next_cursor}`);
    expect(second.body.data).toHaveLength(2);
    expect(second.body.meta.next_cursor).toBeNull();
  });

  describe('never_used and expires_before', () => {
    type WithUse = Listed & { last_used_at: string | null; expires_at: string | null };

    async function check(expected: Record<string, number[]>): Promise<void> {
      for (const [query, want] of Object.entries(expected)) {
        const res = await listAll(query);
        expect({ query, status: res.status, ids: ids(res) }).toEqual({ query, status: 200, ids: want });
      }
    }

    test('never_used=true lists the tokens never used, false the ones used, alone and with the other filters', async () => {
      const u1 = await createUser(ctx);
      const u2 = await createUser(ctx);
      const unused = await mintToken(ctx, u1.id);
      const usedWritten = await mintToken(ctx, u1.id);
      const usedPending = await mintToken(ctx, u2.id, { environment: 'test' });
      const revokedUnused = await mintToken(ctx, u2.id);
      const revokedUsed = await mintToken(ctx, u1.id);
      const expiredUnused = await mintToken(ctx, u2.id, { expires_in: 60 });
      await expectWorks(usedWritten.token);
      await expectWorks(revokedUsed.token);
      await ctx.app.lastUse.flush();
      ctx.clock.advance(10);
      // Recorded, not yet written: the listing already shows it, so the filter must count it.
      await expectWorks(usedPending.token);
      expect(await tokenRow(usedPending.id)).toMatchObject({ last_used_at: null });
      await revoke(revokedUnused.id);
      await revoke(revokedUsed.id);
      moveTo(60);

      await check({
        '?never_used=true': [unused.id, revokedUnused.id, expiredUnused.id],
        '?never_used=false': [usedWritten.id, usedPending.id, revokedUsed.id],
        '?never_used=true&status=active': [unused.id],
        '?never_used=false&status=active': [usedWritten.id, usedPending.id],
        '?never_used=true&status=revoked': [revokedUnused.id],
        '?never_used=false&status=revoked': [revokedUsed.id],
        '?never_used=true&status=expired': [expiredUnused.id],
        '?never_used=false&status=expired': [],
        [`?never_used=true&user_id=${u2.id}`]: [revokedUnused.id, expiredUnused.id],
        [`?never_used=false&user_id=${u2.id}`]: [usedPending.id],
        '?never_used=false&environment=test': [usedPending.id],
        '?never_used=true&environment=test': [],
      });

      // The filter and the last_used_at each listed token shows agree.
      const all = (await listAll()).body.data as WithUse[];
      expect(all.find((t) => t.id === usedPending.id)!.last_used_at).toBe(at(10));
      for (const neverUsed of [true, false]) {
        const filtered = (await listAll(`?never_used=${neverUsed}`)).body.data as WithUse[];
        expect(filtered).toEqual(all.filter((t) => (t.last_used_at === null) === neverUsed));
      }
    });

    test('never_used still counts a recorded use when writing it fails', async () => {
      const user = await createUser(ctx);
      const unused = await mintToken(ctx, user.id);
      const used = await mintToken(ctx, user.id);
      await refuseWrites(ctx, 'no_last_use', { event: 'update of last_used_at', table: 'tokens' });
      await expectWorks(used.token);

      await check({ '?never_used=true': [unused.id], '?never_used=false': [used.id] });
      expect(await tokenRow(used.id)).toMatchObject({ last_used_at: null });
      expect(ctx.app.lastUse.pending(used.id)).toEqual({ at: at(0), ip: expect.any(String) });

      // Once the write goes through, the same answer comes from the row.
      await allowWrites(ctx, 'no_last_use', 'tokens');
      await ctx.app.lastUse.flush();
      expect(await tokenRow(used.id)).toMatchObject({ last_used_at: at(0) });
      await check({ '?never_used=true': [unused.id], '?never_used=false': [used.id] });
    });

    test('expires_before lists tokens expiring strictly before the time, never those without expiry; with status=active, the ones expiring soon', async () => {
      const u1 = await createUser(ctx);
      const u2 = await createUser(ctx);
      const forever = await mintToken(ctx, u1.id);
      const minute = await mintToken(ctx, u1.id, { expires_in: 60 });
      const sixDays = await mintToken(ctx, u2.id, { expires_in: 6 * 86_400 });
      const revokedInADay = await mintToken(ctx, u1.id, { expires_in: 86_400 });
      const month = await mintToken(ctx, u2.id, { expires_in: 30 * 86_400, environment: 'test' });
      await revoke(revokedInADay.id);
      moveTo(120);
      const inAWeek = at(120 + 7 * 86_400);

      await check({
        [`?expires_before=${inAWeek}`]: [minute.id, sixDays.id, revokedInADay.id],
        [`?expires_before=${inAWeek}&status=active`]: [sixDays.id],
        [`?expires_before=${inAWeek}&status=expired`]: [minute.id],
        [`?expires_before=${inAWeek}&status=revoked`]: [revokedInADay.id],
        [`?expires_before=${inAWeek}&user_id=${u1.id}`]: [minute.id, revokedInADay.id],
        [`?expires_before=${at(31 * 86_400)}&environment=test`]: [month.id],
        [`?expires_before=${at(31 * 86_400)}&status=active`]: [sixDays.id, month.id],
        [`?expires_before=${at(6 * 86_400)}&never_used=true`]: [minute.id, revokedInADay.id],
        // Strictly before: a token expiring at exactly that time is not listed.
        [`?expires_before=${at(60)}`]: [],
        '?expires_before=2026-01-01T00:01:00.001Z': [minute.id],
        // Compared as instants, not as text: an offset is that instant, and without milliseconds the
        // very time the token expires is still not before it.
        '?expires_before=2025-12-31T23:01:00.001-01:00': [minute.id],
        '?expires_before=2026-01-01T01:01:00.001%2B01:00': [minute.id],
        '?expires_before=2026-01-01T00:01:00Z': [],
        '?expires_before=2026-01-01T00:01:01Z': [minute.id],
        '?expires_before=2025-12-31T23:59:59Z': [],
      });
      expect(ids(await listAll())).toContain(forever.id);
    });

    test('pagination walks every page once with the new filters, alone and with status', async () => {
      const user = await createUser(ctx);
      const minted: Array<{ id: number; used: boolean; expires: boolean; revoked: boolean }> = [];
      for (let i = 0; i < 10; i++) {
        const expires = i % 2 === 0;
        const token = await mintToken(ctx, user.id, expires ? { expires_in: 3600 } : {});
        const used = i % 3 === 0;
        const revoked = i % 4 === 1;
        if (used) await expectWorks(token.token);
        if (revoked) await revoke(token.id);
        minted.push({ id: token.id, used, expires, revoked });
      }
      const want = (keep: (t: (typeof minted)[number]) => boolean) => minted.filter(keep).map((t) => t.id);
      const soon = at(7 * 86_400);

      for (const limit of [1, 2, 3]) {
        expect(await walk('&never_used=true', limit)).toEqual(want((t) => !t.used));
        expect(await walk('&never_used=false', limit)).toEqual(want((t) => t.used));
        expect(await walk(`&expires_before=${soon}`, limit)).toEqual(want((t) => t.expires));
        expect(await walk(`&expires_before=${soon}&status=active`, limit)).toEqual(want((t) => t.expires && !t.revoked));
        expect(await walk(`&never_used=true&expires_before=${soon}&status=active`, limit)).toEqual(want((t) => !t.used && t.expires && !t.revoked));
      }
    });
  });
});

describe('MAX_TOKENS_PER_USER', () => {
  test('defaults to 100 active tokens per user', async () => {
    const user = await createUser(ctx);
    for (let i = 0; i < 100; i++) await mintToken(ctx, user.id);
    const error = expectError(await mintRaw(user.id, {}), 409, 'CONFLICT');
    expect(error.details).toEqual({ limit: 100, active: 100 });
    expect(await allRows()).toHaveLength(100);
  });

  describe('with MAX_TOKENS_PER_USER=2', () => {
    beforeEach(async () => {
      await restartWith({ MAX_TOKENS_PER_USER: '2' });
    });

    test('a third active token is 409 CONFLICT with {limit, active}; other users are not affected', async () => {
      const user = await createUser(ctx);
      const other = await createUser(ctx);
      await mintToken(ctx, user.id);
      await mintToken(ctx, user.id, { environment: 'test' });
      const error = expectError(await mintRaw(user.id, { name: 'third' }), 409, 'CONFLICT');
      expect(error.details).toEqual({ limit: 2, active: 2 });
      expect(error.message).toContain('MAX_TOKENS_PER_USER');
      expect(await allRows()).toHaveLength(2);

      await mintToken(ctx, other.id);
      await mintToken(ctx, other.id);
      expect(await allRows()).toHaveLength(4);
    });

    test('revoked tokens do not count', async () => {
      const user = await createUser(ctx);
      const a = await mintToken(ctx, user.id);
      await mintToken(ctx, user.id);
      await revoke(a.id);
      expect((await mintRaw(user.id, {})).status).toBe(201);
      expect(expectError(await mintRaw(user.id, {}), 409, 'CONFLICT').details).toEqual({ limit: 2, active: 2 });
    });

    test('expired tokens stop counting at exactly their expiry', async () => {
      const user = await createUser(ctx);
      await mintToken(ctx, user.id, { expires_in: 60 });
      await mintToken(ctx, user.id);
      moveTo(60 - 0.001);
      expectError(await mintRaw(user.id, {}), 409, 'CONFLICT');
      moveTo(60);
      expect((await mintRaw(user.id, {})).status).toBe(201);
    });

    test('rotating at the limit works, and the rotated-out token no longer counts', async () => {
      const user = await createUser(ctx);
      const a = await mintToken(ctx, user.id);
      const b = await mintToken(ctx, user.id);
      const rotated = await rotate(a.id);
      expect(rotated.status).toBe(201);
      // a is still usable (grace period), b and a's successor are active: only the latter two count.
      await expectWorks(a.token);
      expect(expectError(await mintRaw(user.id, {}), 409, 'CONFLICT').details).toEqual({ limit: 2, active: 2 });
      expect((await rotate(b.id)).status).toBe(201);
      expect(await allRows()).toHaveLength(4);
    });

    test('a token in its grace period leaves room for a new mint', async () => {
      const user = await createUser(ctx);
      const a = await mintToken(ctx, user.id);
      await rotate(a.id);
      expect((await mintRaw(user.id, {})).status).toBe(201);
      expect(expectError(await mintRaw(user.id, {}), 409, 'CONFLICT').details).toEqual({ limit: 2, active: 2 });
    });

    test('self-service mints (POST /v1/tokens) are bounded too, the calling key included', async () => {
      const user = await createUser(ctx);
      const key = await mintToken(ctx, user.id, { scopes: MANAGER_SCOPES });
      const first = await request(ctx.app).post('/v1/tokens').set('X-API-Key', key.token).send({ scopes: ['bots:read'] });
      expect(first.status).toBe(201);

      const error = expectError(await request(ctx.app).post('/v1/tokens').set('X-API-Key', key.token).send({ scopes: ['bots:read'] }), 409, 'CONFLICT');
      expect(error.details).toEqual({ limit: 2, active: 2 });
      expect(await allRows()).toHaveLength(2);

      await revoke(first.body.id);
      expect((await request(ctx.app).post('/v1/tokens').set('X-API-Key', key.token).send({})).status).toBe(201);
    });

    test('admin mints fill the room a self-service mint would need, and the other way round', async () => {
      const user = await createUser(ctx);
      const key = await mintToken(ctx, user.id, { scopes: MANAGER_SCOPES });
      expect((await request(ctx.app).post('/v1/tokens').set('X-API-Key', key.token).send({})).status).toBe(201);
      expect(expectError(await mintRaw(user.id, {}), 409, 'CONFLICT').details).toEqual({ limit: 2, active: 2 });
    });
  });
});
