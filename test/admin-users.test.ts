import request from 'supertest';
import { admin, createTestApp, createUser, expectError, mintToken, type TestContext } from './helpers/app';

let ctx: TestContext;
beforeEach(async () => {
  ctx = await createTestApp();
});
afterEach(async () => {
  await ctx.close();
});

const userRow = (id: number) => ctx.storage.db.selectFrom('users').selectAll().where('id', '=', id).executeTakeFirst();

describe('POST /admin/users', () => {
  test('creates a user with the seed body and answers 201 with the user and its Location', async () => {
    const res = await request(ctx.app)
      .post('/admin/users')
      .set(admin)
      .send({ email: 'user@example.com', name: 'User', max_concurrent_bots: 5 });
    expect(res.status).toBe(201);
    expect(res.headers.location).toBe('/admin/users/1');
    expect(res.body).toEqual({
      id: 1,
      email: 'user@example.com',
      name: 'User',
      max_concurrent_bots: 5,
      active_bots: 0,
      rate_limit_per_minute: 600,
      credits: 0,
      external_id: null,
      sso_subject: null,
      data: null,
      disabled: false,
      disabled_at: null,
      created_at: '2026-01-01T00:00:00.000Z',
      updated_at: '2026-01-01T00:00:00.000Z',
    });
    expect(await userRow(1)).toMatchObject({ email: 'user@example.com', email_lower: 'user@example.com', max_concurrent_bots: 5, rate_limit_per_minute: 600 });
  });

  test('defaults max_concurrent_bots to 3 and keeps a data object', async () => {
    const res = await request(ctx.app).post('/admin/users').set(admin).send({ email: 'a@example.com', data: { plan: 'pro', seats: [1, 2] } });
    expect(res.status).toBe(201);
    expect(res.body).toMatchObject({ max_concurrent_bots: 3, name: null, data: { plan: 'pro', seats: [1, 2] } });
    expect(JSON.parse((await userRow(res.body.id))!.data!)).toEqual({ plan: 'pro', seats: [1, 2] });
  });

  test('accepts max_concurrent_bots 0, meaning no bots', async () => {
    const res = await request(ctx.app).post('/admin/users').set(admin).send({ email: 'zero@example.com', max_concurrent_bots: 0 });
    expect(res.status).toBe(201);
    expect(res.body.max_concurrent_bots).toBe(0);
  });

  test('refuses an email that exists in another case with 409 CONFLICT naming the existing id', async () => {
    const first = await createUser(ctx, { email: 'Dup@Example.com' });
    const res = await request(ctx.app).post('/admin/users').set(admin).send({ email: 'dup@example.COM' });
    const error = expectError(res, 409, 'CONFLICT');
    expect(error.details).toEqual({ existing_id: first.id });
    expect(await ctx.storage.db.selectFrom('users').select('id').execute()).toHaveLength(1);
  });

  test('lets exactly one of several concurrent creates with the same email win; the others get 409', async () => {
    const results = await Promise.all(
      ['race@example.com', 'RACE@example.com', 'Race@Example.com', 'race@EXAMPLE.com'].map((email) =>
        request(ctx.app).post('/admin/users').set(admin).send({ email }),
      ),
    );
    const created = results.filter((r) => r.status === 201);
    expect(created).toHaveLength(1);
    for (const r of results.filter((x) => x.status !== 201)) {
      expect(expectError(r, 409, 'CONFLICT').details).toEqual({ existing_id: created[0]!.body.id });
    }
    expect(await ctx.storage.db.selectFrom('users').select('id').execute()).toHaveLength(1);
  });

  test.each([
    ['a missing email', { name: 'x' }, 'email', 'is required'],
    ['an invalid email', { email: 'not-an-email' }, 'email', 'must match format "email"'],
    ['an email over 254 characters', { email: `${'a'.repeat(250)}@example.com` }, 'email', 'must NOT have more than 254 characters'],
    ['a negative limit', { email: 'a@example.com', max_concurrent_bots: -1 }, 'max_concurrent_bots', 'must be >= 0'],
    ['a fractional limit', { email: 'a@example.com', max_concurrent_bots: 1.5 }, 'max_concurrent_bots', 'must be integer'],
    ['a limit given as a string', { email: 'a@example.com', max_concurrent_bots: '5' }, 'max_concurrent_bots', 'must be integer'],
    ['a huge limit', { email: 'a@example.com', max_concurrent_bots: 1e12 }, 'max_concurrent_bots', 'must be <= 100000'],
    ['an empty name', { email: 'a@example.com', name: '' }, 'name', 'must NOT have fewer than 1 characters'],
    ['data that is not an object', { email: 'a@example.com', data: [1] }, 'data', 'must be object,null'],
    ['an unknown field', { email: 'a@example.com', role: 'admin' }, 'role', 'is not a known field'],
  ])('refuses %s with 400 VALIDATION_ERROR naming the field', async (_what, body, field, message) => {
    const res = await request(ctx.app).post('/admin/users').set(admin).send(body);
    const error = expectError(res, 400, 'VALIDATION_ERROR');
    expect(error.details).toContainEqual({ field, in: 'body', message });
    expect(await ctx.storage.db.selectFrom('users').select('id').execute()).toHaveLength(0);
  });

  test('lists every invalid field at once', async () => {
    const res = await request(ctx.app).post('/admin/users').set(admin).send({ email: 'x', max_concurrent_bots: -2, extra: true });
    const error = expectError(res, 400, 'VALIDATION_ERROR');
    expect((error.details as Array<{ field: string }>).map((d) => d.field).sort()).toEqual(['email', 'extra', 'max_concurrent_bots']);
  });

  test('refuses data larger than 16 KiB as JSON', async () => {
    const res = await request(ctx.app).post('/admin/users').set(admin).send({ email: 'a@example.com', data: { blob: 'x'.repeat(17_000) } });
    const error = expectError(res, 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([{ field: 'data', in: 'body', message: 'must be at most 16384 bytes as JSON' }]);
    expect(await ctx.storage.db.selectFrom('users').select('id').execute()).toHaveLength(0);
  });

  test('refuses data nested deeper than 32 levels with 400, never a 500', async () => {
    const deep = (n: number) => `{"email":"deep@example.com","data":{"a":${'['.repeat(n)}${']'.repeat(n)}}}`;
    for (const depth of [40, 30_000]) {
      const res = await request(ctx.app).post('/admin/users').set(admin).set('Content-Type', 'application/json').send(deep(depth));
      expect(expectError(res, 400, 'VALIDATION_ERROR').details).toEqual([{ field: 'data', in: 'body', message: 'must not nest deeper than 32 levels' }]);
    }
    expect((await request(ctx.app).post('/admin/users').set(admin).set('Content-Type', 'application/json').send(deep(30))).status).toBe(201);
  });

  test('stores a __proto__ key in data as plain data', async () => {
    const res = await request(ctx.app)
      .post('/admin/users')
      .set(admin)
      .set('Content-Type', 'application/json')
      .send('{"email":"proto@example.com","data":{"__proto__":{"polluted":true}}}');
    expect(res.status).toBe(201);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
    expect((await userRow(res.body.id))!.data).toBe('{"__proto__":{"polluted":true}}');
  });
});

describe('GET /admin/users', () => {
  test('pages through users oldest first with an opaque cursor', async () => {
    for (let i = 1; i <= 5; i++) await createUser(ctx, { email: `u${i}@example.com` });
    const first = await request(ctx.app).get('/admin/users?limit=2').set(admin);
    expect(first.status).toBe(200);
    expect(first.body.data.map((u: { email: string }) => u.email)).toEqual(['u1@example.com', 'u2@example.com']);
    expect(first.body.meta).toEqual({ limit: 2, next_cursor: expect.any(String) });
    const second = await request(ctx.app).get(`/admin/users?limit=2&cursor=${first.body.meta.next_cursor}`).set(admin);
    expect(second.body.data.map((u: { email: string }) => u.email)).toEqual(['u3@example.com', 'u4@example.com']);
    const third = await request(ctx.app).get(`/admin/users?limit=2&cursor=${second.body.meta.next_cursor}`).set(admin);
    expect(third.body).toEqual({ data: [expect.objectContaining({ email: 'u5@example.com' })], meta: { limit: 2, next_cursor: null } });
  });

  test('uses a default page size of 50', async () => {
    const res = await request(ctx.app).get('/admin/users').set(admin);
    expect(res.body).toEqual({ data: [], meta: { limit: 50, next_cursor: null } });
  });

  test('filters by part of the email, case-insensitively, treating % and _ literally', async () => {
    await createUser(ctx, { email: 'Alice@Corp.example' });
    await createUser(ctx, { email: 'bob@corp.example' });
    await createUser(ctx, { email: 'a_b@other.example' });
    const corp = await request(ctx.app).get('/admin/users?email=CORP.EXAMPLE').set(admin);
    expect(corp.body.data.map((u: { email: string }) => u.email)).toEqual(['Alice@Corp.example', 'bob@corp.example']);
    const underscore = await request(ctx.app).get('/admin/users?email=a_b').set(admin);
    expect(underscore.body.data.map((u: { email: string }) => u.email)).toEqual(['a_b@other.example']);
    const percent = await request(ctx.app).get('/admin/users?email=%25').set(admin);
    expect(percent.body.data).toEqual([]);
  });

  test.each([
    ['limit=0', 'limit', 'must be >= 1'],
    ['limit=101', 'limit', 'must be <= 100'],
    ['limit=ten', 'limit', 'must be integer'],
    ['limit=1&limit=2', 'limit', 'must be integer'],
    ['cursor=bm9wZQ', 'cursor', 'is not a cursor this server issued'],
    // id:2147483648, past any id the database numbers (a 500 on PostgreSQL before the bound)
    ['cursor=aWQ6MjE0NzQ4MzY0OA', 'cursor', 'is not a cursor this server issued'],
    ['sort=email', 'sort', 'is not a known field'],
  ])('refuses ?%s with 400 naming the query parameter', async (query, field, message) => {
    const res = await request(ctx.app).get(`/admin/users?${query}`).set(admin);
    const error = expectError(res, 400, 'VALIDATION_ERROR');
    expect(error.details).toContainEqual({ field, in: 'query', message });
  });
});

describe('GET /admin/users/{id} and /admin/users/email/{email}', () => {
  test('returns the user by id and by email in any case', async () => {
    const user = await createUser(ctx, { email: 'Find.Me@Example.com' });
    const byId = await request(ctx.app).get(`/admin/users/${user.id}`).set(admin);
    expect(byId.status).toBe(200);
    expect(byId.body.email).toBe('Find.Me@Example.com');
    const byEmail = await request(ctx.app).get('/admin/users/email/find.me@example.COM').set(admin);
    expect(byEmail.status).toBe(200);
    expect(byEmail.body.id).toBe(user.id);
  });

  test('answers 404 NOT_FOUND for an unknown id or email', async () => {
    expectError(await request(ctx.app).get('/admin/users/999').set(admin), 404, 'NOT_FOUND');
    expectError(await request(ctx.app).get('/admin/users/email/nobody@example.com').set(admin), 404, 'NOT_FOUND');
  });

  test.each(['abc', '0', '-1', '1.5', '99999999999999999999'])('refuses the id %s with 400 naming the path parameter', async (id) => {
    const error = expectError(await request(ctx.app).get(`/admin/users/${id}`).set(admin), 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([expect.objectContaining({ field: 'id', in: 'path' })]);
  });

  test('refuses a path parameter that is not valid percent-encoding with 400', async () => {
    expectError(await request(ctx.app).get('/admin/users/email/%E0%A4%A').set(admin), 400, 'VALIDATION_ERROR');
  });
});

describe('PATCH /admin/users/{id}', () => {
  test('changes name, limit and data and moves updated_at', async () => {
    const user = await createUser(ctx, { email: 'p@example.com', name: 'Old' });
    ctx.clock.advance(60);
    const res = await request(ctx.app)
      .patch(`/admin/users/${user.id}`)
      .set(admin)
      .send({ name: 'New', max_concurrent_bots: 7, data: { team: 'x' } });
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ name: 'New', max_concurrent_bots: 7, data: { team: 'x' }, updated_at: '2026-01-01T00:01:00.000Z' });
    expect(await userRow(user.id)).toMatchObject({ name: 'New', max_concurrent_bots: 7, data: '{"team":"x"}' });
  });

  test('clears name and data with null', async () => {
    const user = await createUser(ctx, { email: 'n@example.com', name: 'N', data: { a: 1 } });
    const res = await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ name: null, data: null });
    expect(res.body).toMatchObject({ name: null, data: null });
  });

  test('disables and re-enables a user, keeping the first disabled time', async () => {
    const user = await createUser(ctx);
    const off = await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: true });
    expect(off.body).toMatchObject({ disabled: true, disabled_at: '2026-01-01T00:00:00.000Z' });
    ctx.clock.advance(10);
    const again = await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: true });
    expect(again.body.disabled_at).toBe('2026-01-01T00:00:00.000Z');
    const on = await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: false });
    expect(on.body).toMatchObject({ disabled: false, disabled_at: null });
    expect((await userRow(user.id))!.disabled_at).toBeNull();
  });

  test('refuses an empty patch, an email change and bad values with 400, changing nothing', async () => {
    const user = await createUser(ctx, { email: 'keep@example.com', max_concurrent_bots: 2 });
    expectError(await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({}), 400, 'VALIDATION_ERROR');
    const email = expectError(await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ email: 'x@example.com' }), 400, 'VALIDATION_ERROR');
    expect(email.details).toEqual([{ field: 'email', in: 'body', message: 'is not a known field' }]);
    expectError(await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: 'yes' }), 400, 'VALIDATION_ERROR');
    expectError(await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ max_concurrent_bots: null }), 400, 'VALIDATION_ERROR');
    expect(await userRow(user.id)).toMatchObject({ email: 'keep@example.com', max_concurrent_bots: 2 });
  });

  test('answers 404 for an unknown user', async () => {
    expectError(await request(ctx.app).patch('/admin/users/42').set(admin).send({ name: 'x' }), 404, 'NOT_FOUND');
  });
});

describe('DELETE /admin/users/{id}', () => {
  test('deletes the user, revokes every token in the same step, and frees the email', async () => {
    const user = await createUser(ctx, { email: 'gone@example.com' });
    const one = await mintToken(ctx, user.id);
    const two = await mintToken(ctx, user.id);
    expect((await request(ctx.app).get('/v1/me').set('X-API-Key', one.token)).status).toBe(200);

    const res = await request(ctx.app).delete(`/admin/users/${user.id}`).set(admin);
    expect(res.status).toBe(204);
    expect(res.text).toBe('');

    const tokens = await ctx.storage.db.selectFrom('tokens').select(['id', 'revoked_at']).orderBy('id').execute();
    expect(tokens).toEqual([
      { id: one.id, revoked_at: '2026-01-01T00:00:00.000Z' },
      { id: two.id, revoked_at: '2026-01-01T00:00:00.000Z' },
    ]);
    expectError(await request(ctx.app).get('/v1/me').set('X-API-Key', one.token), 401, 'API_KEY_REVOKED');
    expectError(await request(ctx.app).get('/v1/me').set('X-API-Key', two.token), 401, 'API_KEY_REVOKED');
    expectError(await request(ctx.app).get(`/admin/users/${user.id}`).set(admin), 404, 'NOT_FOUND');
    expect((await request(ctx.app).get('/admin/users').set(admin)).body.data).toEqual([]);
    expectError(await request(ctx.app).delete(`/admin/users/${user.id}`).set(admin), 404, 'NOT_FOUND');
    expectError(await request(ctx.app).post(`/admin/users/${user.id}/tokens`).set(admin), 404, 'NOT_FOUND');

    const again = await request(ctx.app).post('/admin/users').set(admin).send({ email: 'gone@example.com' });
    expect(again.status).toBe(201);
    expect(again.body.id).not.toBe(user.id);
  });

  test('answers 404 for an unknown user', async () => {
    expectError(await request(ctx.app).delete('/admin/users/7').set(admin), 404, 'NOT_FOUND');
  });
});

describe('external_id: the platform\'s own account id on a user', () => {
  const create = (body: Record<string, unknown>) => request(ctx.app).post('/admin/users').set(admin).send(body);

  test('is set at creation, shown everywhere, found by ?external_id=, changed and cleared by PATCH, and audited', async () => {
    const res = await create({ email: 'acme@example.com', external_id: 'acct_8f3a-21' });
    expect(res.status).toBe(201);
    expect(res.body.external_id).toBe('acct_8f3a-21');
    expect(await userRow(res.body.id)).toMatchObject({ external_id: 'acct_8f3a-21' });
    await create({ email: 'other@example.com' });
    const found = await request(ctx.app).get('/admin/users?external_id=acct_8f3a-21').set(admin);
    expect(found.body.data.map((u: { email: string }) => u.email)).toEqual(['acme@example.com']);
    expect((await request(ctx.app).get('/admin/users?external_id=acct_8f3a-2').set(admin)).body.data).toEqual([]);
    expect((await request(ctx.app).get(`/admin/users/${res.body.id}`).set(admin)).body.external_id).toBe('acct_8f3a-21');

    const changed = await request(ctx.app).patch(`/admin/users/${res.body.id}`).set(admin).send({ external_id: 'acct 99' });
    expect([changed.status, changed.body.external_id]).toEqual([200, 'acct 99']);
    const audit = await request(ctx.app).get(`/admin/audit?action=user.updated&target=user:${res.body.id}`).set(admin);
    expect(audit.body.data[0].details).toEqual({ external_id: { old: 'acct_8f3a-21', new: 'acct 99' } });
    const cleared = await request(ctx.app).patch(`/admin/users/${res.body.id}`).set(admin).send({ external_id: null });
    expect(cleared.body.external_id).toBeNull();
    expect(await userRow(res.body.id)).toMatchObject({ external_id: null });
  });

  test('a key sees it on /v1/me, and /auth/verify hands it to the gateway (JSON and X-Keyward-External-Id)', async () => {
    const user = await createUser(ctx, { external_id: 'cus_42' });
    const token = await mintToken(ctx, user.id);
    const me = await request(ctx.app).get('/v1/me').set('X-API-Key', token.token);
    expect(me.body.user.external_id).toBe('cus_42');
    const verified = await request(ctx.app).get('/auth/verify').set('X-API-Key', token.token);
    expect([verified.status, verified.headers['x-keyward-external-id'], verified.body.external_id]).toEqual([200, 'cus_42', 'cus_42']);
    // None set: an empty header (so the gateway replaces whatever the client sent), null in JSON.
    const plain = await createUser(ctx);
    const plainToken = await mintToken(ctx, plain.id);
    const none = await request(ctx.app).get('/auth/verify').set('X-API-Key', plainToken.token);
    expect([none.headers['x-keyward-external-id'], none.body.external_id]).toEqual(['', null]);
  });

  test('is unique among users: a duplicate at creation or by PATCH is 409 CONFLICT naming the holder; deleting or clearing frees it', async () => {
    const holder = await create({ email: 'a@example.com', external_id: 'dup-1' });
    const again = expectError(await create({ email: 'b@example.com', external_id: 'dup-1' }), 409, 'CONFLICT');
    expect(again.details).toEqual({ existing_id: holder.body.id });
    expect(await ctx.storage.db.selectFrom('users').select('email').where('email', '=', 'b@example.com').executeTakeFirst()).toBeUndefined();
    const other = await create({ email: 'c@example.com' });
    const patched = expectError(await request(ctx.app).patch(`/admin/users/${other.body.id}`).set(admin).send({ external_id: 'dup-1', name: 'changed' }), 409, 'CONFLICT');
    expect(patched.details).toEqual({ existing_id: holder.body.id });
    expect(await userRow(other.body.id)).toMatchObject({ external_id: null, name: null });
    // Setting a user's own id again is no conflict.
    expect((await request(ctx.app).patch(`/admin/users/${holder.body.id}`).set(admin).send({ external_id: 'dup-1' })).status).toBe(200);
    expect((await request(ctx.app).delete(`/admin/users/${holder.body.id}`).set(admin)).status).toBe(204);
    expect((await request(ctx.app).patch(`/admin/users/${other.body.id}`).set(admin).send({ external_id: 'dup-1' })).status).toBe(200);
  });

  test('two admins giving the same id to two users at once: one wins, the other gets 409', async () => {
    const [a, b] = [await createUser(ctx), await createUser(ctx)];
    const results = await Promise.all([a, b].map((u) => request(ctx.app).patch(`/admin/users/${u.id}`).set(admin).send({ external_id: 'raced' })));
    expect(results.map((r) => r.status).sort()).toEqual([200, 409]);
    expect(await ctx.storage.db.selectFrom('users').select('id').where('external_id', '=', 'raced').execute()).toHaveLength(1);
  });

  test.each([
    ['too long', 'x'.repeat(257)],
    ['empty', ''],
    ['a control character', 'acct\u0007'],
    ['a line break', 'acct\n1'],
    ['a leading space', ' acct'],
    ['a trailing space', 'acct '],
    ['non-ASCII', 'kundennummer-\u00fc'],
    ['a number', 42],
    ['an object', { id: 1 }],
  ])('%s is 400 VALIDATION_ERROR naming external_id, at creation, by PATCH and as a filter', async (_what, value) => {
    const error = expectError(await create({ email: 'v@example.com', external_id: value }), 400, 'VALIDATION_ERROR');
    expect(new Set((error.details as Array<{ field: string; in: string }>).map((d) => `${d.in}:${d.field}`))).toEqual(new Set(['body:external_id']));
    const user = await createUser(ctx);
    expectError(await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ external_id: value }), 400, 'VALIDATION_ERROR');
    if (typeof value === 'string' && value !== '') {
      expectError(await request(ctx.app).get(`/admin/users?external_id=${encodeURIComponent(value)}`).set(admin), 400, 'VALIDATION_ERROR');
    }
    expect(await ctx.storage.db.selectFrom('users').select('id').where('external_id', 'is not', null).execute()).toEqual([]);
  });

  test('256 printable characters are accepted', async () => {
    const id = `A${' ~'.repeat(127)}Z`;
    expect(id).toHaveLength(256);
    expect((await create({ email: 'long@example.com', external_id: id })).body.external_id).toBe(id);
  });
});
