import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import request from 'supertest';
import { ADMIN_SCOPES } from '../src/admin-keys/admin-scopes';
import { listOperations, loadSpec, type OperationSpec } from '../src/openapi/spec';
import { admin, appsClosedAfterEach, createTestApp, createUser, expectError, mintToken, type TestContext } from './helpers/app';

/**
 * Named admin keys (issue 18): minted under /admin/admin-keys, shown once, verified like user tokens,
 * holding only their scopes; every /admin operation needs the admin scope openapi.yaml names for it.
 */

const KEY_SHAPE = /^kw_admin_[0-9A-Za-z]{12}_[0-9A-Za-z]{38}$/;
const asKey = (key: string) => ({ 'X-Admin-API-Key': key });

async function createKey(ctx: TestContext, body: Record<string, unknown>, as: Record<string, string> = admin): Promise<{ id: number; key: string; body: Record<string, unknown> }> {
  const res = await request(ctx.app).post('/admin/admin-keys').set(as).send(body);
  expect(res.status).toBe(201);
  return { id: res.body.id as number, key: res.body.key as string, body: res.body as Record<string, unknown> };
}

describe('minting, listing and revoking admin keys', () => {
  let ctx: TestContext;
  beforeEach(async () => {
    ctx = await createTestApp();
  });
  afterEach(() => ctx.close());

  test('the root key mints a key, shown once; the database holds only its bcrypt hash; listings mask it', async () => {
    const res = await request(ctx.app).post('/admin/admin-keys').set(admin).send({ name: 'provisioning', scopes: ['users:write', 'tokens:write', 'users:write'] });
    expect(res.status).toBe(201);
    expect(res.headers.location).toBe(`/admin/admin-keys/${res.body.id}`);
    expect(res.headers['cache-control']).toBe('no-store');
    expect(res.body).toEqual({
      id: 1,
      name: 'provisioning',
      scopes: ['tokens:write', 'users:write'],
      key: expect.stringMatching(KEY_SHAPE),
      masked: expect.stringMatching(/^kw_admin_[0-9A-Za-z]{12}_…[0-9A-Za-z]{4}$/),
      status: 'active',
      allowed_ips: null,
      created_at: '2026-01-01T00:00:00.000Z',
      created_by: expect.stringMatching(/^admin:[0-9a-f]{16}$/),
      expires_at: null,
      revoked_at: null,
      last_used_at: null,
      last_used_ip: null,
    });
    const key = res.body.key as string;
    expect(res.body.masked).toBe(`${key.slice(0, 22)}…${key.slice(-4)}`);

    const row = await ctx.storage.db.selectFrom('admin_keys').selectAll().executeTakeFirstOrThrow();
    expect(row.secret_hash).toMatch(/^\$2[aby]\$04\$/);
    expect(JSON.stringify(row)).not.toContain(key.slice(22, 54));

    const listed = await request(ctx.app).get('/admin/admin-keys').set(admin);
    expect(listed.status).toBe(200);
    const { key: _shownOnce, ...metadata } = res.body;
    expect(listed.body).toEqual({ data: [metadata], meta: { limit: 50, next_cursor: null } });
    expect(JSON.stringify(listed.body)).not.toContain(key);
    expect((await request(ctx.app).get(`/admin/admin-keys/${res.body.id}`).set(admin)).body).toEqual(metadata);
    expectError(await request(ctx.app).get('/admin/admin-keys/2').set(admin), 404, 'NOT_FOUND');
  });

  test('a key works on what its scopes allow and nothing else (403 INSUFFICIENT_SCOPE naming the scope)', async () => {
    const { key } = await createKey(ctx, { name: 'provisioning', scopes: ['users:write', 'tokens:write'] });
    const created = await request(ctx.app).post('/admin/users').set(asKey(key)).send({ email: 'new@example.com' });
    expect(created.status).toBe(201);
    const minted = await request(ctx.app).post(`/admin/users/${created.body.id}/tokens`).set(asKey(key)).send({});
    expect(minted.status).toBe(201);
    const refused = expectError(await request(ctx.app).get('/admin/users').set(asKey(key)), 403, 'INSUFFICIENT_SCOPE');
    expect(refused).toMatchObject({ message: 'This admin key lacks the scope users:read.', details: { required: ['users:read'] } });
    expectError(await request(ctx.app).get('/admin/audit').set(asKey(key)), 403, 'INSUFFICIENT_SCOPE');
    expectError(await request(ctx.app).post('/admin/admin-keys').set(asKey(key)).send({ name: 'more', scopes: ['users:write'] }), 403, 'INSUFFICIENT_SCOPE');
  });

  test('every answer names the scopes of the credential (X-Keyward-Admin-Scopes), refusals included', async () => {
    const { key } = await createKey(ctx, { name: 'reader', scopes: ['users:read', 'audit:read'] });
    const ok = await request(ctx.app).get('/admin/users').set(asKey(key));
    expect([ok.status, ok.headers['x-keyward-admin-scopes']]).toEqual([200, 'audit:read users:read']);
    const refused = await request(ctx.app).delete('/admin/users/1').set(asKey(key));
    expect([refused.status, refused.headers['x-keyward-admin-scopes']]).toEqual([403, 'audit:read users:read']);
    // The input is checked after the scope, and still under the credential's name.
    const invalid = await request(ctx.app).get('/admin/users/0').set(asKey(key));
    expect([invalid.status, invalid.headers['x-keyward-admin-scopes']]).toEqual([400, 'audit:read users:read']);
    const root = await request(ctx.app).get('/admin/users').set(admin);
    expect(root.headers['x-keyward-admin-scopes']).toBe(ADMIN_SCOPES.join(' '));
    // No credential, a wrong one: nothing to name.
    expect((await request(ctx.app).get('/admin/users')).headers['x-keyward-admin-scopes']).toBeUndefined();
    // A different last character (a key ending in x stays itself with another x).
    const wrong = `${key.slice(0, -1)}${key.endsWith('x') ? 'y' : 'x'}`;
    expect((await request(ctx.app).get('/admin/users').set(asKey(wrong))).headers['x-keyward-admin-scopes']).toBeUndefined();
    // Never on the user API.
    const user = await createUser(ctx);
    const token = await mintToken(ctx, user.id);
    expect((await request(ctx.app).get('/v1/me').set('X-API-Key', token.token)).headers['x-keyward-admin-scopes']).toBeUndefined();
  });

  test('revoked: 401 ADMIN_KEY_REVOKED on the very next request; revoking again is a no-op 204; the name is free again', async () => {
    const { id, key } = await createKey(ctx, { name: 'job', scopes: ['users:read'] });
    expect((await request(ctx.app).get('/admin/users').set(asKey(key))).status).toBe(200);
    expect((await request(ctx.app).delete(`/admin/admin-keys/${id}`).set(admin)).status).toBe(204);
    expectError(await request(ctx.app).get('/admin/users').set(asKey(key)), 401, 'ADMIN_KEY_REVOKED');
    expect((await request(ctx.app).delete(`/admin/admin-keys/${id}`).set(admin)).status).toBe(204);
    expect((await request(ctx.app).get(`/admin/admin-keys/${id}`).set(admin)).body).toMatchObject({ status: 'revoked', revoked_at: '2026-01-01T00:00:00.000Z' });
    expect((await createKey(ctx, { name: 'job', scopes: ['users:read'] })).id).toBe(id + 1);
    expectError(await request(ctx.app).delete('/admin/admin-keys/99').set(admin), 404, 'NOT_FOUND');
  });

  test('expired: 401 ADMIN_KEY_EXPIRED once its time is past; an expired key gives up its name', async () => {
    const { id, key } = await createKey(ctx, { name: 'short', scopes: ['users:read'], expires_in: 60 });
    expect((await request(ctx.app).get('/admin/users').set(asKey(key))).status).toBe(200);
    ctx.clock.advance(61);
    expectError(await request(ctx.app).get('/admin/users').set(asKey(key)), 401, 'ADMIN_KEY_EXPIRED');
    expect((await request(ctx.app).get(`/admin/admin-keys/${id}`).set(admin)).body.status).toBe('expired');
    await createKey(ctx, { name: 'short', scopes: ['users:read'] });
    // The expired key is recorded as revoked when it expired, which is when it stopped working.
    expect((await request(ctx.app).get(`/admin/admin-keys/${id}`).set(admin)).body).toMatchObject({ status: 'revoked', revoked_at: '2026-01-01T00:01:00.000Z' });
  });

  test('a key minted by a key: a subset of its scopes, never outliving it, and by default ending when it ends', async () => {
    const { key: parent } = await createKey(ctx, { name: 'delegate', scopes: ['admin-keys:write', 'users:read', 'audit:read'], expires_in: 3600 });
    const child = await createKey(ctx, { name: 'monitoring', scopes: ['audit:read'] }, asKey(parent));
    expect(child.body).toMatchObject({ scopes: ['audit:read'], expires_at: '2026-01-01T01:00:00.000Z', created_by: 'admin_key:1' });
    const wider = expectError(await request(ctx.app).post('/admin/admin-keys').set(asKey(parent)).send({ name: 'wider', scopes: ['audit:read', 'users:write'] }), 403, 'INSUFFICIENT_SCOPE');
    expect(wider.details).toEqual({ required: ['users:write'] });
    const longer = expectError(await request(ctx.app).post('/admin/admin-keys').set(asKey(parent)).send({ name: 'longer', scopes: ['audit:read'], expires_in: 7200 }), 400, 'VALIDATION_ERROR');
    expect(longer.details).toEqual([{ field: 'expires_in', in: 'body', message: 'cannot outlive the admin key that mints it (it expires at 2026-01-01T01:00:00.000Z)' }]);
    expect((await request(ctx.app).get('/admin/audit').set(asKey(child.key))).status).toBe(200);
  });

  test('bad input is a 400 or 409 in the envelope, and writes nothing', async () => {
    const bad = async (body: unknown) => request(ctx.app).post('/admin/admin-keys').set(admin).send(body as object);
    for (const body of [
      {},
      { name: 'x' },
      { scopes: ['users:read'] },
      { name: 'x', scopes: [] },
      { name: 'x', scopes: ['users:delete'] },
      { name: 'x', scopes: ['bots:read'], extra: 1 },
      { name: '', scopes: ['users:read'] },
      { name: '   ', scopes: ['users:read'] },
      { name: 'n'.repeat(101), scopes: ['users:read'] },
      { name: 'line\nbreak', scopes: ['users:read'] },
      { name: 'x', scopes: ['users:read'], expires_in: 60, expires_at: '2027-01-01T00:00:00Z' },
      { name: 'x', scopes: ['users:read'], expires_at: '2025-01-01T00:00:00Z' },
      { name: 'x', scopes: ['users:read'], expires_at: '2027-06-30T23:59:60Z' },
      { name: 'x', scopes: ['users:read'], allowed_ips: ['not-an-address'] },
    ]) {
      expectError(await bad(body), 400, 'VALIDATION_ERROR');
    }
    await createKey(ctx, { name: 'taken', scopes: ['users:read'] });
    const taken = expectError(await bad({ name: 'taken', scopes: ['bots:read'] }), 409, 'CONFLICT');
    expect(taken.details).toEqual({ name: 'taken' });
    expect(await ctx.storage.db.selectFrom('admin_keys').select('name').execute()).toEqual([{ name: 'taken' }]);
  });

  test('at most MAX_ADMIN_KEYS active keys (409); a revoked one makes room', async () => {
    const capped = await createTestApp({ env: { MAX_ADMIN_KEYS: '2' } });
    try {
      const first = await createKey(capped, { name: 'a', scopes: ['users:read'] });
      await createKey(capped, { name: 'b', scopes: ['users:read'] });
      const full = expectError(await request(capped.app).post('/admin/admin-keys').set(admin).send({ name: 'c', scopes: ['users:read'] }), 409, 'CONFLICT');
      expect(full.details).toEqual({ limit: 2, active: 2 });
      await request(capped.app).delete(`/admin/admin-keys/${first.id}`).set(admin).expect(204);
      await createKey(capped, { name: 'c', scopes: ['users:read'] });
    } finally {
      await capped.close();
    }
  });

  test('a key with an allowlist is refused elsewhere (403 FORBIDDEN_IP)', async () => {
    const { key } = await createKey(ctx, { name: 'office', scopes: ['users:read'], allowed_ips: ['10.0.0.0/8'] });
    expect(expectError(await request(ctx.app).get('/admin/users').set(asKey(key)), 403, 'FORBIDDEN_IP').details).toEqual({ ip: '127.0.0.1' });
    const { key: here } = await createKey(ctx, { name: 'here', scopes: ['users:read'], allowed_ips: ['127.0.0.1', '::1'] });
    expect((await request(ctx.app).get('/admin/users').set(asKey(here))).status).toBe(200);
  });

  test('its last use is shown (written in batches like a token\'s)', async () => {
    const { id, key } = await createKey(ctx, { name: 'job', scopes: ['users:read'] });
    ctx.clock.advance(5);
    await request(ctx.app).get('/admin/users').set(asKey(key)).expect(200);
    expect((await request(ctx.app).get(`/admin/admin-keys/${id}`).set(admin)).body).toMatchObject({ last_used_at: '2026-01-01T00:00:05.000Z', last_used_ip: '127.0.0.1' });
    await ctx.app.adminLastUse.flush();
    expect(await ctx.storage.db.selectFrom('admin_keys').select(['last_used_at', 'last_used_ip']).where('id', '=', id).executeTakeFirstOrThrow()).toEqual({
      last_used_at: '2026-01-01T00:00:05.000Z',
      last_used_ip: '127.0.0.1',
    });
  });

  test('the audit log names the key that made each change, by id and name; ?actor= finds them', async () => {
    const { id, key } = await createKey(ctx, { name: 'provisioning', scopes: ['users:write', 'audit:read'] });
    await request(ctx.app).post('/admin/users').set(asKey(key)).send({ email: 'by-key@example.com' }).expect(201);
    const byKey = await request(ctx.app).get(`/admin/audit?actor=admin_key:${id}`).set(asKey(key));
    expect(byKey.status).toBe(200);
    expect(byKey.body.data).toEqual([
      expect.objectContaining({
        action: 'user.created',
        actor: { type: 'admin_key', id: `admin_key:${id}`, user_id: null, token_id: null, email: null, name: 'provisioning' },
      }),
    ]);
    const created = (await request(ctx.app).get('/admin/audit?action=admin_key.created').set(admin)).body.data;
    expect(created).toEqual([
      expect.objectContaining({ target: { type: 'admin_key', id: String(id), user_id: null }, details: { name: 'provisioning', scopes: ['audit:read', 'users:write'], expires_at: null, allowed_ips: null } }),
    ]);
    expect(JSON.stringify(created)).not.toContain(key);
    expect((await request(ctx.app).get('/admin/audit?actor=admin_key').set(admin)).body.data).toHaveLength(1);
  });
});

describe('the two kinds of key stay apart', () => {
  let ctx: TestContext;
  beforeAll(async () => {
    ctx = await createTestApp();
  });
  afterAll(() => ctx.close());

  test('an admin key is refused on /v1 and /auth/verify; a user token is refused as an admin key', async () => {
    const { key } = await createKey(ctx, { name: 'everything', scopes: [...ADMIN_SCOPES] });
    expectError(await request(ctx.app).get('/v1/me').set('X-API-Key', key), 401, 'INVALID_API_KEY');
    expectError(await request(ctx.app).get('/auth/verify').set('Authorization', `Bearer ${key}`), 401, 'INVALID_API_KEY');
    const user = await createUser(ctx);
    const token = await mintToken(ctx, user.id);
    expectError(await request(ctx.app).get('/admin/users').set(asKey(token.token)), 401, 'INVALID_ADMIN_KEY');
    expectError(await request(ctx.app).get('/admin/users').set('X-API-Key', key), 401, 'AUTHENTICATION_REQUIRED');
  });
});

describe('wrong admin keys count against the address', () => {
  const app = appsClosedAfterEach();

  test('after AUTH_FAILURES_PER_MINUTE wrong keys of either kind: 429, but a key this process has verified still works', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3' });
    const { key } = await createKey(ctx, { name: 'known', scopes: ['users:read'] });
    await request(ctx.app).get('/admin/users').set(asKey(key)).expect(200);
    const wrongSecret = `${key.slice(0, 22)}${'A'.repeat(32)}`;
    const { checksum } = await import('../src/tokens/token-format');
    const wrong = [wrongSecret + checksum(wrongSecret), 'not-the-root-key-0123456789abcdefghij', `${key.slice(0, -1)}x`];
    for (const sent of wrong) expectError(await request(ctx.app).get('/admin/users').set(asKey(sent)), 401, 'INVALID_ADMIN_KEY');
    expectError(await request(ctx.app).get('/admin/users').set(asKey(wrong[0]!)), 429, 'RATE_LIMITED');
    expect((await request(ctx.app).get('/admin/users').set(asKey(key))).status).toBe(200);
    expect((await request(ctx.app).get('/admin/users').set(admin)).status).toBe(200);
  });
});

describe('every /admin operation needs its admin scope', () => {
  let ctx: TestContext;
  const adminOperations = listOperations(loadSpec()).filter((op) => op.auth === 'admin');
  const keys = new Map<string, { holding: string; lacking: string }>();

  beforeAll(async () => {
    ctx = await createTestApp();
    for (const scope of ADMIN_SCOPES) {
      const holding = await createKey(ctx, { name: `only ${scope}`, scopes: [scope] });
      const lacking = await createKey(ctx, { name: `all but ${scope}`, scopes: ADMIN_SCOPES.filter((s) => s !== scope) });
      keys.set(scope, { holding: holding.key, lacking: lacking.key });
    }
  });
  afterAll(() => ctx.close());

  const call = (op: OperationSpec, key: string) => {
    const path = op.path.replace(/\{email\}/g, 'nobody@example.com').replace(/\{[^}]+\}/g, '999999');
    const req = request(ctx.app)[op.method](path).set(asKey(key));
    return op.requestBody ? req.send({}) : req;
  };

  test('the document names a known admin scope for each of them', () => {
    expect(adminOperations.length).toBeGreaterThanOrEqual(25);
    for (const op of adminOperations) expect(ADMIN_SCOPES).toContain(op.requiredScope);
  });

  test("the README's admin table names the same scope for every operation, and has every operation", () => {
    const readme = readFileSync(join(__dirname, '..', 'README.md'), 'utf8');
    const section = readme.slice(readme.indexOf('### Admin API'), readme.indexOf('### Admin keys'));
    const rows = [...section.matchAll(/^\| `(GET|POST|PATCH|DELETE) ([^`?]+)[^`]*` \| `([a-z:-]+)` \|/gm)].map((m) => `${m[1]} ${m[2]} ${m[3]}`);
    expect(rows.sort()).toEqual(adminOperations.map((op) => `${op.method.toUpperCase()} ${op.path} ${op.requiredScope}`).sort());
  });

  test.each(adminOperations.map((op) => [op.operationId, op] as const))('%s: refused without its scope, let through with it alone', async (_id, op) => {
    const scope = op.requiredScope!;
    const refused = expectError(await call(op, keys.get(scope)!.lacking), 403, 'INSUFFICIENT_SCOPE');
    expect(refused.details).toEqual({ required: [scope] });
    const allowed = await call(op, keys.get(scope)!.holding);
    expect([401, 403]).not.toContain(allowed.status);
  });
});
