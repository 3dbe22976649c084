import request from 'supertest';
import { admin, createTestApp, createUser, expectError, mintToken, type TestContext } from './helpers/app';

/**
 * A rate limit per key (issue 21), besides the user's: a request must pass both, the RateLimit
 * headers describe the tighter, and a key minting a key never hands out more than its own.
 */

let ctx: TestContext;
beforeEach(async () => {
  ctx = await createTestApp();
});
afterEach(() => ctx.close());

const me = (token: string) => request(ctx.app).get('/v1/me').set('X-API-Key', token);
const headers = (res: request.Response) => [res.headers['ratelimit-limit'], res.headers['ratelimit-remaining']];

describe('a key with a limit of its own', () => {
  test('passes while under both limits, then gets 429 naming the key\'s limit; the user\'s other keys go on', async () => {
    const user = await createUser(ctx, { rate_limit_per_minute: 10 });
    const limited = await mintToken(ctx, user.id, { rate_limit_per_minute: 3 });
    expect(limited).toMatchObject({ rate_limit_per_minute: 3 });
    const other = await mintToken(ctx, user.id);
    const answers = [];
    for (let i = 0; i < 4; i++) answers.push(await me(limited.token));
    expect(answers.map((r) => r.status)).toEqual([200, 200, 200, 429]);
    expect(answers[0]!.body.token.rate_limit_per_minute).toBe(3);
    // The key's limit is the tighter: the headers describe it.
    expect(answers.map(headers)).toEqual([['3', '2'], ['3', '1'], ['3', '0'], ['3', '0']]);
    const refused = expectError(answers[3]!, 429, 'RATE_LIMITED');
    expect(refused.message).toMatch(/^This API key may make 3 requests a minute/);
    expect(refused.details).toMatchObject({ limit: 3 });
    expect(Number(answers[3]!.headers['retry-after'])).toBeGreaterThan(0);
    // The other key has only the user's limit, of which 4 are used.
    const fine = await me(other.token);
    expect([fine.status, ...headers(fine)]).toEqual([200, '10', '5']);
  });

  test('when the user\'s limit is the tighter, the headers describe it, and it refuses first', async () => {
    const user = await createUser(ctx, { rate_limit_per_minute: 2 });
    const key = await mintToken(ctx, user.id, { rate_limit_per_minute: 100 });
    const answers = [await me(key.token), await me(key.token), await me(key.token)];
    expect(answers.map((r) => [r.status, ...headers(r)])).toEqual([[200, '2', '1'], [200, '2', '0'], [429, '2', '0']]);
    expect(answers[2]!.body.error.message).toMatch(/^This user may make 2 requests a minute/);
  });

  test('forward auth counts it the same way', async () => {
    const user = await createUser(ctx);
    const key = await mintToken(ctx, user.id, { rate_limit_per_minute: 1 });
    expect((await request(ctx.app).get('/auth/verify').set('X-API-Key', key.token)).status).toBe(200);
    expectError(await request(ctx.app).get('/auth/verify').set('X-API-Key', key.token), 429, 'RATE_LIMITED');
  });

  test('the admin sets it by PATCH (effective at once) and clears it with null; rotation copies it', async () => {
    const user = await createUser(ctx);
    const key = await mintToken(ctx, user.id);
    expect(key).toMatchObject({ rate_limit_per_minute: null });
    expect((await me(key.token)).headers['ratelimit-limit']).toBe('600');
    const patched = await request(ctx.app).patch(`/admin/tokens/${key.id}`).set(admin).send({ rate_limit_per_minute: 5 });
    expect([patched.status, patched.body.rate_limit_per_minute]).toEqual([200, 5]);
    expect(headers(await me(key.token))).toEqual(['5', '4']);
    const rotated = await request(ctx.app).post(`/admin/tokens/${key.id}/rotate`).set(admin).send({});
    expect(rotated.body.rate_limit_per_minute).toBe(5);
    const cleared = await request(ctx.app).patch(`/admin/tokens/${key.id}`).set(admin).send({ rate_limit_per_minute: null });
    expect(cleared.body.rate_limit_per_minute).toBeNull();
    expect((await me(key.token)).headers['ratelimit-limit']).toBe('600');
    const audit = await request(ctx.app).get(`/admin/audit?action=token.updated&target=token:${key.id}`).set(admin);
    expect(audit.body.data.map((e: { details: unknown }) => e.details)).toEqual([
      { rate_limit_per_minute: { old: 5, new: null } },
      { rate_limit_per_minute: { old: null, new: 5 } },
    ]);
  });

  test.each([
    ['negative', -1],
    ['fractional', 2.5],
    ['over 1,000,000', 1_000_001],
    ['a string', '10'],
  ])('%s is 400 VALIDATION_ERROR at mint and by PATCH', async (_what, value) => {
    const user = await createUser(ctx);
    const error = expectError(await request(ctx.app).post(`/admin/users/${user.id}/tokens`).set(admin).send({ rate_limit_per_minute: value }), 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([expect.objectContaining({ field: 'rate_limit_per_minute', in: 'body' })]);
    const key = await mintToken(ctx, user.id);
    expectError(await request(ctx.app).patch(`/admin/tokens/${key.id}`).set(admin).send({ rate_limit_per_minute: value }), 400, 'VALIDATION_ERROR');
    expect(await ctx.storage.db.selectFrom('tokens').select('rate_limit_per_minute').execute()).toEqual([{ rate_limit_per_minute: null }]);
  });
});

describe('a key minting keys (/v1/tokens)', () => {
  const manager = { scopes: ['bots:read', 'tokens:read', 'tokens:write'] };
  const mintMine = (token: string, body: Record<string, unknown>) => request(ctx.app).post('/v1/tokens').set('X-API-Key', token).send({ scopes: ['bots:read'], ...body });

  test('with a limit: at most its own, inherited when not given, never none', async () => {
    const user = await createUser(ctx);
    const key = await mintToken(ctx, user.id, { ...manager, rate_limit_per_minute: 50 });
    expect((await mintMine(key.token, { rate_limit_per_minute: 20 })).body.rate_limit_per_minute).toBe(20);
    expect((await mintMine(key.token, { rate_limit_per_minute: 50 })).body.rate_limit_per_minute).toBe(50);
    expect((await mintMine(key.token, {})).body.rate_limit_per_minute).toBe(50);
    const over = expectError(await mintMine(key.token, { rate_limit_per_minute: 51 }), 400, 'VALIDATION_ERROR');
    expect(over.details).toEqual([{ field: 'rate_limit_per_minute', in: 'body', message: "must be at most 50, this API key's own limit" }]);
    expectError(await mintMine(key.token, { rate_limit_per_minute: null }), 400, 'VALIDATION_ERROR');
  });

  test('without a limit of its own: any, or none', async () => {
    const user = await createUser(ctx);
    const key = await mintToken(ctx, user.id, manager);
    expect((await mintMine(key.token, {})).body.rate_limit_per_minute).toBeNull();
    expect((await mintMine(key.token, { rate_limit_per_minute: 7 })).body.rate_limit_per_minute).toBe(7);
  });

  test('a limited key cannot rotate a key allowed more (it would get that key\'s secret)', async () => {
    const user = await createUser(ctx);
    const key = await mintToken(ctx, user.id, { ...manager, rate_limit_per_minute: 10 });
    const unlimited = await mintToken(ctx, user.id, { scopes: ['bots:read'] });
    const refused = expectError(await request(ctx.app).post(`/v1/tokens/${unlimited.id}/rotate`).set('X-API-Key', key.token).send({}), 403, 'INSUFFICIENT_SCOPE');
    expect(refused.message).toMatch(/more requests a minute than this API key \(10\)/);
    const within = await mintToken(ctx, user.id, { scopes: ['bots:read'], rate_limit_per_minute: 10 });
    expect((await request(ctx.app).post(`/v1/tokens/${within.id}/rotate`).set('X-API-Key', key.token).send({})).status).toBe(201);
  });
});
