import request from 'supertest';
import { admin, createTestApp, createUser, expectError, mintToken, type TestContext } from './helpers/app';

let ctx: TestContext;
beforeEach(async () => {
  ctx = await createTestApp();
});
afterEach(async () => {
  await ctx.close();
});

const MANAGER_SCOPES = ['bots:read', 'bots:write', 'tokens:read', 'tokens:write'];
const tokenRow = (id: number) => ctx.storage.db.selectFrom('tokens').selectAll().where('id', '=', id).executeTakeFirstOrThrow();
const as = (token: string) => ({ 'X-API-Key': token });

/** A user with a key that may manage the user's keys. */
async function manager(body: Record<string, unknown> = {}) {
  const user = await createUser(ctx);
  const key = await mintToken(ctx, user.id, { scopes: MANAGER_SCOPES, ...body });
  return { user, key };
}

describe('GET /v1/tokens and GET /v1/tokens/{id}', () => {
  test("list the caller's own tokens, masked, and never another user's", async () => {
    const { user, key } = await manager();
    const other = await mintToken(ctx, user.id, { name: 'other-key' });
    const stranger = await createUser(ctx);
    await mintToken(ctx, stranger.id, { name: 'not yours' });

    const res = await request(ctx.app).get('/v1/tokens').set(as(key.token));
    expect(res.status).toBe(200);
    expect(res.body.data.map((t: { id: number }) => t.id)).toEqual([key.id, other.id]);
    expect(res.body.meta).toEqual({ limit: 50, next_cursor: null });
    expect(JSON.stringify(res.body)).not.toContain(key.token);
    expect(res.body.data[1]).toMatchObject({ id: other.id, user_id: user.id, name: 'other-key', masked: other.masked, status: 'active' });
  });

  test("reads one of the caller's tokens; another user's is 404, exactly like one that does not exist", async () => {
    const { key } = await manager();
    const stranger = await createUser(ctx);
    const theirs = await mintToken(ctx, stranger.id);

    const own = await request(ctx.app).get(`/v1/tokens/${key.id}`).set(as(key.token));
    expect(own.status).toBe(200);
    expect(own.body).toMatchObject({ id: key.id, masked: key.masked });
    expect(own.body).not.toHaveProperty('token');

    const foreign = expectError(await request(ctx.app).get(`/v1/tokens/${theirs.id}`).set(as(key.token)), 404, 'NOT_FOUND');
    const missing = expectError(await request(ctx.app).get('/v1/tokens/999999').set(as(key.token)), 404, 'NOT_FOUND');
    expect(foreign.message).toBe(missing.message);
  });

  test('Bearer authorization works the same as X-API-Key', async () => {
    const { key } = await manager();
    const res = await request(ctx.app).get('/v1/tokens').set('Authorization', `Bearer ${key.token}`);
    expect(res.status).toBe(200);
    expect(res.body.data).toHaveLength(1);
  });
});

describe('POST /v1/tokens', () => {
  test('mints a key for the caller\'s own user, shown once, that works', async () => {
    const { user, key } = await manager();
    const res = await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ name: 'ci', scopes: ['bots:read'] });
    expect(res.status).toBe(201);
    expect(res.headers.location).toBe(`/v1/tokens/${res.body.id}`);
    expect(res.body).toMatchObject({ user_id: user.id, name: 'ci', scopes: ['bots:read'], environment: 'live', status: 'active', expires_at: null });
    expect(res.body.token).toMatch(/^kw_live_/);

    const me = await request(ctx.app).get('/v1/me').set(as(res.body.token));
    expect(me.status).toBe(200);
    expect(me.body.token).toMatchObject({ id: res.body.id, scopes: ['bots:read'] });
    expect((await request(ctx.app).get(`/v1/tokens/${res.body.id}`).set(as(key.token))).body).not.toHaveProperty('token');
  });

  test('refuses scopes the caller does not hold with 403 INSUFFICIENT_SCOPE naming them, and mints nothing', async () => {
    const user = await createUser(ctx);
    const key = await mintToken(ctx, user.id, { scopes: ['tokens:write', 'bots:read'] });
    const error = expectError(
      await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['bots:read', 'bots:write', 'tokens:read'] }),
      403,
      'INSUFFICIENT_SCOPE',
    );
    expect(error.details).toEqual({ required: ['bots:write', 'tokens:read'] });
    // The default scopes (bots:read, bots:write) are not all held either: no silent widening.
    expect((await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({})).body.error.details).toEqual({ required: ['bots:write'] });
    const count = await ctx.storage.db.selectFrom('tokens').select((eb) => eb.fn.countAll<number>().as('n')).executeTakeFirstOrThrow();
    expect(Number(count.n)).toBe(1);
  });

  test('a subset of its own scopes is fine, including all of them', async () => {
    const { key } = await manager();
    const res = await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: MANAGER_SCOPES });
    expect(res.status).toBe(201);
    expect(res.body.scopes).toEqual(MANAGER_SCOPES);
  });

  test('cannot outlive the calling key: without an expiry it takes the caller\'s, a later one is 400', async () => {
    const { key } = await manager({ expires_in: 3600 });
    const inherited = await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['bots:read'] });
    expect(inherited.status).toBe(201);
    expect(inherited.body.expires_at).toBe(key.expires_at);

    const shorter = await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['bots:read'], expires_in: 600 });
    expect(shorter.status).toBe(201);
    expect(shorter.body.expires_at).toBe('2026-01-01T00:10:00.000Z');

    for (const body of [{ expires_in: 3601 }, { expires_at: '2026-01-01T01:00:00.001Z' }]) {
      const error = expectError(await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['bots:read'], ...body }), 400, 'VALIDATION_ERROR');
      expect(error.details).toEqual([{ field: Object.keys(body)[0], in: 'body', message: expect.stringContaining('cannot outlive') }]);
    }
  });

  test('cannot widen the calling key\'s allowlist: it inherits it, may narrow it, and anything wider is 400', async () => {
    const { key } = await manager({ allowed_ips: ['127.0.0.0/8', '2001:db8::/32'] });
    const inherited = await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['bots:read'] });
    expect(inherited.status).toBe(201);
    expect(inherited.body.allowed_ips).toEqual(['127.0.0.0/8', '2001:db8::/32']);

    const narrower = await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['bots:read'], allowed_ips: ['127.0.0.1', '2001:db8:1::/48'] });
    expect(narrower.status).toBe(201);
    expect(JSON.parse((await tokenRow(narrower.body.id)).allowed_ips!)).toEqual(['127.0.0.1', '2001:db8:1::/48']);

    for (const allowed_ips of [['10.0.0.1'], ['127.0.0.0/7'], ['127.0.0.1', '::1'], null]) {
      const error = expectError(await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['bots:read'], allowed_ips }), 400, 'VALIDATION_ERROR');
      expect(error.details).toEqual([{ field: 'allowed_ips', in: 'body', message: expect.any(String) }]);
    }
  });

  test('a key without an allowlist may give the new key any allowlist', async () => {
    const { key } = await manager();
    const res = await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['bots:read'], allowed_ips: ['10.0.0.0/8'] });
    expect(res.status).toBe(201);
    expect(res.body.allowed_ips).toEqual(['10.0.0.0/8']);
  });

  test('a test key mints test keys by default and can never mint a live key', async () => {
    const { key } = await manager({ environment: 'test' });
    const res = await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['bots:read'] });
    expect(res.status).toBe(201);
    expect(res.body.environment).toBe('test');
    expect(res.body.token).toMatch(/^kw_test_/);

    const error = expectError(
      await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['bots:read'], environment: 'live' }),
      400,
      'VALIDATION_ERROR',
    );
    expect(error.details).toEqual([{ field: 'environment', in: 'body', message: 'a test key can only mint and rotate test keys' }]);
  });

  test('a live key may mint a test key', async () => {
    const { key } = await manager();
    const res = await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['bots:read'], environment: 'test' });
    expect(res.status).toBe(201);
    expect(res.body.token).toMatch(/^kw_test_/);
  });

  test('validates the body like the admin mint: unknown fields and scopes are 400', async () => {
    const { key } = await manager();
    expectError(await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ user_id: 2 }), 400, 'VALIDATION_ERROR');
    const error = expectError(await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['root'] }), 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([{ field: 'scopes', in: 'body', message: expect.stringContaining('valid scopes are bots:read') }]);
  });
});

describe('DELETE /v1/tokens/{id}', () => {
  test('revokes one of the caller\'s tokens, effective on its very next request', async () => {
    const { user, key } = await manager();
    const other = await mintToken(ctx, user.id);
    expect((await request(ctx.app).get('/v1/me').set(as(other.token))).status).toBe(200);

    const res = await request(ctx.app).delete(`/v1/tokens/${other.id}`).set(as(key.token));
    expect(res.status).toBe(204);
    expect((await tokenRow(other.id)).revoked_at).toBe('2026-01-01T00:00:00.000Z');
    expectError(await request(ctx.app).get('/v1/me').set(as(other.token)), 401, 'API_KEY_REVOKED');
  });

  test('a key can revoke itself', async () => {
    const { key } = await manager();
    expect((await request(ctx.app).delete(`/v1/tokens/${key.id}`).set(as(key.token))).status).toBe(204);
    expectError(await request(ctx.app).get('/v1/tokens').set(as(key.token)), 401, 'API_KEY_REVOKED');
  });

  test("another user's token is 404 and stays untouched", async () => {
    const { key } = await manager();
    const stranger = await createUser(ctx);
    const theirs = await mintToken(ctx, stranger.id);
    expectError(await request(ctx.app).delete(`/v1/tokens/${theirs.id}`).set(as(key.token)), 404, 'NOT_FOUND');
    expect((await tokenRow(theirs.id)).revoked_at).toBeNull();
    expect((await request(ctx.app).get('/v1/me').set(as(theirs.token))).status).toBe(200);
  });
});

describe('POST /v1/tokens/{id}/rotate', () => {
  test('rotates the calling key itself: the new key works, the old one works through the grace period only', async () => {
    const { key } = await manager({ name: 'deploy' });
    const res = await request(ctx.app).post(`/v1/tokens/${key.id}/rotate`).set(as(key.token)).send({ grace_period_seconds: 60 });
    expect(res.status).toBe(201);
    expect(res.headers.location).toBe(`/v1/tokens/${res.body.id}`);
    expect(res.body).toMatchObject({ name: 'deploy', scopes: MANAGER_SCOPES, rotated_from: key.id, status: 'active' });
    expect((await tokenRow(key.id)).rotated_to).toBe(res.body.id);

    expect((await request(ctx.app).get('/v1/me').set(as(res.body.token))).status).toBe(200);
    ctx.clock.advance(59);
    expect((await request(ctx.app).get('/v1/me').set(as(key.token))).status).toBe(200);
    ctx.clock.advance(1);
    expectError(await request(ctx.app).get('/v1/me').set(as(key.token)), 401, 'API_KEY_EXPIRED');
    expect((await request(ctx.app).get('/v1/me').set(as(res.body.token))).status).toBe(200);
  });

  test('cannot rotate a key that holds scopes the caller lacks: that would hand the caller its new secret', async () => {
    const user = await createUser(ctx);
    const narrow = await mintToken(ctx, user.id, { scopes: ['tokens:read', 'tokens:write'] });
    const powerful = await mintToken(ctx, user.id, { scopes: ['bots:read', 'bots:write'] });
    const error = expectError(await request(ctx.app).post(`/v1/tokens/${powerful.id}/rotate`).set(as(narrow.token)), 403, 'INSUFFICIENT_SCOPE');
    expect(error.details).toEqual({ required: ['bots:read', 'bots:write'] });
    expect((await tokenRow(powerful.id)).rotated_to).toBeNull();
  });

  test('cannot rotate a key usable from addresses the caller may not use', async () => {
    const user = await createUser(ctx);
    const caller = await mintToken(ctx, user.id, { scopes: MANAGER_SCOPES, allowed_ips: ['127.0.0.1'] });
    const anywhere = await mintToken(ctx, user.id, { scopes: ['bots:read'] });
    expectError(await request(ctx.app).post(`/v1/tokens/${anywhere.id}/rotate`).set(as(caller.token)), 403, 'FORBIDDEN_IP');
    expect((await tokenRow(anywhere.id)).rotated_to).toBeNull();
  });

  test('the new key never outlives the caller', async () => {
    const { user, key } = await manager({ expires_in: 3600 });
    const longLived = await mintToken(ctx, user.id, { scopes: ['bots:read'], expires_in: 86_400 });
    const res = await request(ctx.app).post(`/v1/tokens/${longLived.id}/rotate`).set(as(key.token));
    expect(res.status).toBe(201);
    expect(res.body.expires_at).toBe(key.expires_at);
  });

  test("another user's token is 404; a revoked one is 409", async () => {
    const { user, key } = await manager();
    const stranger = await createUser(ctx);
    const theirs = await mintToken(ctx, stranger.id);
    expectError(await request(ctx.app).post(`/v1/tokens/${theirs.id}/rotate`).set(as(key.token)), 404, 'NOT_FOUND');
    expect((await tokenRow(theirs.id)).rotated_to).toBeNull();

    const revoked = await mintToken(ctx, user.id);
    await request(ctx.app).delete(`/admin/tokens/${revoked.id}`).set(admin).expect(204);
    expectError(await request(ctx.app).post(`/v1/tokens/${revoked.id}/rotate`).set(as(key.token)), 409, 'CONFLICT');
  });
});
