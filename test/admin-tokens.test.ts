import bcrypt from 'bcrypt';
import request from 'supertest';
import { admin, createTestApp, createUser, expectError, mintToken, type TestContext } from './helpers/app';

let ctx: TestContext;
beforeEach(async () => {
  ctx = await createTestApp();
});
afterEach(async () => {
  await ctx.close();
});

const TOKEN = /^kw_live_([0-9A-Za-z]{12})_([0-9A-Za-z]{32})[0-9A-Za-z]{6}$/;
const tokenRow = (id: number) => ctx.storage.db.selectFrom('tokens').selectAll().where('id', '=', id).executeTakeFirstOrThrow();

describe('POST /admin/users/{id}/tokens', () => {
  test('mints a token with no body at all: default scopes, no expiry, shown once', async () => {
    const user = await createUser(ctx);
    const res = await request(ctx.app).post(`/admin/users/${user.id}/tokens`).set(admin);
    expect(res.status).toBe(201);
    expect(res.headers.location).toBe(`/admin/tokens/${res.body.id}`);
    expect(res.headers['cache-control']).toBe('no-store');
    expect(Object.keys(res.body).sort()).toEqual(
      [
        'allowed_ips', 'created_at', 'environment', 'expires_at', 'id', 'last_used_at', 'last_used_ip', 'masked', 'metadata', 'name', 'rate_limit_per_minute',
        'revoked_at', 'rotated_from', 'rotated_to', 'scopes', 'status', 'token', 'user_id',
      ].sort(),
    );
    expect(res.body).toMatchObject({
      user_id: user.id,
      name: null,
      scopes: ['bots:read', 'bots:write'],
      environment: 'live',
      status: 'active',
      allowed_ips: null,
      created_at: '2026-01-01T00:00:00.000Z',
      expires_at: null,
      revoked_at: null,
      last_used_at: null,
      rotated_from: null,
    });
    const [, selector, secret] = TOKEN.exec(res.body.token)!;
    expect(res.body.masked).toBe(`kw_live_${selector}_…${res.body.token.slice(-4)}`);

    const row = await tokenRow(res.body.id);
    expect(row).toMatchObject({ user_id: user.id, selector, last4: res.body.token.slice(-4), scopes: 'bots:read bots:write', revoked_at: null });
    expect(row.secret_hash).toMatch(/^\$2b\$04\$/);
    expect(await bcrypt.compare(secret!, row.secret_hash)).toBe(true);
    expect(JSON.stringify(row)).not.toContain(secret);
  });

  test('mints with a name, folded scopes and a lifetime', async () => {
    const user = await createUser(ctx);
    const res = await request(ctx.app)
      .post(`/admin/users/${user.id}/tokens`)
      .set(admin)
      .send({ name: 'ci', scopes: ['tokens:read', 'bots:read', 'tokens:read'], expires_in: 3600 });
    expect(res.status).toBe(201);
    expect(res.body).toMatchObject({ name: 'ci', scopes: ['bots:read', 'tokens:read'], expires_at: '2026-01-01T01:00:00.000Z' });
    expect(await tokenRow(res.body.id)).toMatchObject({ name: 'ci', scopes: 'bots:read tokens:read', expires_at: '2026-01-01T01:00:00.000Z' });
  });

  test('accepts an empty JSON object as no options', async () => {
    const user = await createUser(ctx);
    const res = await request(ctx.app).post(`/admin/users/${user.id}/tokens`).set(admin).send({});
    expect(res.status).toBe(201);
    expect(res.body.scopes).toEqual(['bots:read', 'bots:write']);
  });

  test.each([
    ['an unknown scope', { scopes: ['bots:read', 'admin:all'] }, 'scopes', 'unknown scope "admin:all"; valid scopes are bots:read, bots:write, tokens:read, tokens:write'],
    ['an empty scope list', { scopes: [] }, 'scopes', 'must NOT have fewer than 1 items'],
    ['scopes that are not strings', { scopes: [1] }, 'scopes.0', 'must be string'],
    ['a zero lifetime', { expires_in: 0 }, 'expires_in', 'must be >= 1'],
    ['a negative lifetime', { expires_in: -60 }, 'expires_in', 'must be >= 1'],
    ['a lifetime over ten years', { expires_in: 315360001 }, 'expires_in', 'must be <= 315360000'],
    ['a lifetime as a string', { expires_in: '3600' }, 'expires_in', 'must be integer'],
    ['an unknown field', { ttl: 5 }, 'ttl', 'is not a known field'],
    ['a name that is too long', { name: 'n'.repeat(101) }, 'name', 'must NOT have more than 100 characters'],
  ])('refuses %s with 400 and stores nothing', async (_what, body, field, message) => {
    const user = await createUser(ctx);
    const error = expectError(await request(ctx.app).post(`/admin/users/${user.id}/tokens`).set(admin).send(body), 400, 'VALIDATION_ERROR');
    expect(error.details).toContainEqual({ field, in: 'body', message });
    expect(await ctx.storage.db.selectFrom('tokens').select('id').execute()).toEqual([]);
  });

  test('answers 404 for an unknown user', async () => {
    expectError(await request(ctx.app).post('/admin/users/99/tokens').set(admin), 404, 'NOT_FOUND');
  });
});

describe('listing and reading tokens', () => {
  test('lists a user\'s tokens masked, with no secret or hash, revoked ones included', async () => {
    const user = await createUser(ctx);
    const other = await createUser(ctx);
    const a = await mintToken(ctx, user.id, { name: 'a' });
    const b = await mintToken(ctx, user.id, { name: 'b' });
    await mintToken(ctx, other.id);
    await request(ctx.app).delete(`/admin/tokens/${a.id}`).set(admin).expect(204);

    const res = await request(ctx.app).get(`/admin/users/${user.id}/tokens`).set(admin);
    expect(res.status).toBe(200);
    expect(res.body.meta).toEqual({ limit: 50, next_cursor: null });
    expect(res.body.data).toEqual([
      { id: a.id, user_id: user.id, name: 'a', scopes: ['bots:read', 'bots:write'], environment: 'live', masked: a.masked, created_at: '2026-01-01T00:00:00.000Z', expires_at: null, revoked_at: '2026-01-01T00:00:00.000Z', status: 'revoked', allowed_ips: null, metadata: null, rate_limit_per_minute: null, last_used_at: null, last_used_ip: null, rotated_from: null, rotated_to: null },
      { id: b.id, user_id: user.id, name: 'b', scopes: ['bots:read', 'bots:write'], environment: 'live', masked: b.masked, created_at: '2026-01-01T00:00:00.000Z', expires_at: null, revoked_at: null, status: 'active', allowed_ips: null, metadata: null, rate_limit_per_minute: null, last_used_at: null, last_used_ip: null, rotated_from: null, rotated_to: null },
    ]);
    const text = JSON.stringify(res.body);
    for (const t of [a, b]) expect(text).not.toContain(TOKEN.exec(t.token)![2]);
    expect(text).not.toContain('$2b$');
  });

  test('pages through tokens', async () => {
    const user = await createUser(ctx);
    for (let i = 0; i < 3; i++) await mintToken(ctx, user.id);
    const first = await request(ctx.app).get(`/admin/users/${user.id}/tokens?limit=2`).set(admin);
    expect(first.body.data).toHaveLength(2);
    const second = await request(ctx.app).get(`/admin/users/${user.id}/tokens?limit=2&cursor=${first.body.meta.next_cursor}`).set(admin);
    expect(second.body.data).toHaveLength(1);
    expect(second.body.meta.next_cursor).toBeNull();
  });

  test('answers 404 when listing the tokens of an unknown user', async () => {
    expectError(await request(ctx.app).get('/admin/users/5/tokens').set(admin), 404, 'NOT_FOUND');
  });

  test('GET /admin/tokens/{id} shows metadata only', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    const res = await request(ctx.app).get(`/admin/tokens/${minted.id}`).set(admin);
    expect(res.status).toBe(200);
    expect(res.body).toEqual({
      id: minted.id, user_id: user.id, name: null, scopes: ['bots:read', 'bots:write'], environment: 'live',
      masked: minted.masked, created_at: '2026-01-01T00:00:00.000Z', expires_at: null, revoked_at: null,
      status: 'active', allowed_ips: null, metadata: null, rate_limit_per_minute: null, last_used_at: null, last_used_ip: null, rotated_from: null, rotated_to: null,
    });
    expectError(await request(ctx.app).get('/admin/tokens/404').set(admin), 404, 'NOT_FOUND');
  });
});

describe('DELETE /admin/tokens/{id}', () => {
  test('records revoked_at instead of deleting, and the very next request gets 401 API_KEY_REVOKED', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    expect((await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token)).status).toBe(200);

    ctx.clock.advance(30);
    const res = await request(ctx.app).delete(`/admin/tokens/${minted.id}`).set(admin);
    expect(res.status).toBe(204);
    expect((await tokenRow(minted.id)).revoked_at).toBe('2026-01-01T00:00:30.000Z');
    expectError(await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token), 401, 'API_KEY_REVOKED');
  });

  test('is idempotent and keeps the first revocation time', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    await request(ctx.app).delete(`/admin/tokens/${minted.id}`).set(admin).expect(204);
    ctx.clock.advance(60);
    await request(ctx.app).delete(`/admin/tokens/${minted.id}`).set(admin).expect(204);
    expect((await tokenRow(minted.id)).revoked_at).toBe('2026-01-01T00:00:00.000Z');
  });

  test('answers 404 for an unknown token', async () => {
    expectError(await request(ctx.app).delete('/admin/tokens/77').set(admin), 404, 'NOT_FOUND');
  });
});
