import request from 'supertest';
import { migrateToLatest, openSqlite } from '../db/database';
import { createApp } from '../src/app';
import * as spec from '../src/openapi/spec';
import { listOperations, loadSpec, type OpenApiDocument, type OperationSpec } from '../src/openapi/spec';
import { BUILT_IN_SCOPES } from '../src/tokens/scopes';
import { checksum } from '../src/tokens/token-format';
import { admin, createTestApp, createUser, expectError, mintToken, testConfig, type TestContext } from './helpers/app';

/** product.md's built-in catalog, written out so that a change to it in src/ has to be a deliberate one. */
const BUILT_IN = ['bots:read', 'bots:write', 'tokens:read', 'tokens:write'];
const EXTRA_ENV = { EXTRA_SCOPES: 'reports:read, billing:write' };
const VALID_BUILT_IN = 'valid scopes are bots:read, bots:write, tokens:read, tokens:write';

const doc = loadSpec();
const userOps = listOperations(doc).filter((op) => op.auth === 'user');
const scopedOps = userOps.filter((op) => op.requiredScope !== null);
const label = (op: OperationSpec) => `${op.method.toUpperCase()} ${op.path} (${op.operationId})`;
const scopedCases = scopedOps.map((op) => [label(op), op] as const);
/** Every built-in scope but the one `op` needs. */
const allBut = (op: OperationSpec) => BUILT_IN.filter((s) => s !== op.requiredScope);

let ctx: TestContext;
/** A fresh app (and database) for each test of the calling describe block. */
function withApp(env: Record<string, string> = {}) {
  beforeEach(async () => {
    ctx = await createTestApp({ env });
  });
  afterEach(async () => {
    await ctx.close();
  });
}

const as = (token: string) => ({ 'X-API-Key': token });
const tokenRow = (id: number) => ctx.storage.db.selectFrom('tokens').selectAll().where('id', '=', id).executeTakeFirstOrThrow();
/** What a request refused for scope must leave untouched (last use is written in batches, so it is left out). */
const tokensState = () =>
  ctx.storage.db.selectFrom('tokens').select(['id', 'user_id', 'scopes', 'revoked_at', 'expires_at', 'rotated_to']).orderBy('id').execute();

/**
 * Calls an operation the way a client would: path parameters filled with `id`, and where the operation
 * takes a body, one it accepts. A key may only mint scopes it holds, so a body with a `scopes` field
 * asks for `scopes`, which callers pass as the key's own.
 */
function call(op: OperationSpec, key: string | undefined, id: number, scopes: string[]) {
  const url = op.path.replace(/\{[^}]+\}/g, String(id));
  const req = request(ctx.app)[op.method](url);
  if (key !== undefined) req.set(as(key));
  if (!op.requestBody) return req;
  const properties = (op.requestBody.schema.properties ?? {}) as Record<string, unknown>;
  return req.send('scopes' in properties ? { scopes } : {});
}

/** A user, a key holding exactly `scopes`, and another of the user's tokens for path parameters. */
async function keyWith(scopes: string[]) {
  const user = await createUser(ctx);
  const key = await mintToken(ctx, user.id, { name: 'caller', scopes });
  const target = await mintToken(ctx, user.id, { name: 'target', scopes });
  return { user, key, target };
}

describe('the scope table in openapi.yaml', () => {
  test('covers every current user operation, so the matrix below cannot pass on an empty list', () => {
    const required = Object.fromEntries(userOps.map((op) => [op.operationId, op.requiredScope]));
    // Pinned: loosening a route (say, revoke needing only tokens:read) must be a visible change here.
    expect(required).toMatchObject({
      getMe: null,
      listMyTokens: 'tokens:read',
      getMyToken: 'tokens:read',
      mintMyToken: 'tokens:write',
      revokeMyToken: 'tokens:write',
      rotateMyToken: 'tokens:write',
    });
    expect(scopedOps.length).toBeGreaterThanOrEqual(5);
  });

  test('the matrix sees every /v1 route: user operations are exactly the /v1 ones, plus forward auth', () => {
    const all = listOperations(doc);
    const v1 = all.filter((op) => op.path.startsWith('/v1/')).map((op) => op.operationId);
    // /auth/verify authenticates user keys for gateways; the scopes it checks come from ?scope=.
    expect([...v1, 'verifyKey'].sort()).toEqual(userOps.map((op) => op.operationId).sort());
  });

  test('every declared scope is a built-in one, and the built-ins are product.md\'s', () => {
    expect([...BUILT_IN_SCOPES]).toEqual(BUILT_IN);
    for (const op of scopedOps) expect({ op: op.operationId, builtIn: BUILT_IN.includes(op.requiredScope!) }).toEqual({ op: op.operationId, builtIn: true });
  });

  test('GET /v1/me says "none" explicitly rather than leaving the declaration out', () => {
    expect((doc.paths['/v1/me'] as Record<string, Record<string, unknown>>).get!['x-required-scope']).toBe('none');
  });
});

describe.each(scopedCases)('scope matrix: %s', (_label, op) => {
  const required = op.requiredScope!;
  const others = allBut(op);
  withApp();

  test(`a key with every scope but ${required} gets 403 INSUFFICIENT_SCOPE naming it, and nothing changes`, async () => {
    const { key, target } = await keyWith(others);
    const before = await tokensState();
    const error = expectError(await call(op, key.token, target.id, others), 403, 'INSUFFICIENT_SCOPE');
    expect(error.details).toEqual({ required: [required] });
    expect(await tokensState()).toEqual(before);
  });

  test.each(others)(`a key with only %s gets 403 naming ${required}`, async (scope) => {
    const { key, target } = await keyWith([scope]);
    const error = expectError(await call(op, key.token, target.id, [scope]), 403, 'INSUFFICIENT_SCOPE');
    expect(error.details).toEqual({ required: [required] });
  });

  test(`a key with only ${required} is not refused for scope`, async () => {
    const { key, target } = await keyWith([required]);
    const res = await call(op, key.token, target.id, [required]);
    // Any answer but a refusal: the route's own checks (404, 409, 400 …) are not this test's business.
    expect(res.status === 401 || res.status === 403 ? res.body : 'not refused').toBe('not refused');
    expect(res.status).toBeLessThan(500);
  });
});

describe('scopes from EXTRA_SCOPES never stand in for a built-in one', () => {
  withApp(EXTRA_ENV);

  test.each(scopedCases)('%s refuses a key holding only extra scopes', async (_label, op) => {
    const { key, target } = await keyWith(['billing:write', 'reports:read']);
    const error = expectError(await call(op, key.token, target.id, ['reports:read']), 403, 'INSUFFICIENT_SCOPE');
    expect(error.details).toEqual({ required: [op.requiredScope] });
  });
});

describe('GET /v1/me needs no scope', () => {
  describe('built-in scopes', () => {
    withApp();

    test.each(BUILT_IN)('works with a key holding only %s', async (scope) => {
      const { key } = await keyWith([scope]);
      const res = await request(ctx.app).get('/v1/me').set(as(key.token));
      expect(res.status).toBe(200);
      expect(res.body.token).toMatchObject({ id: key.id, scopes: [scope] });
    });
  });

  describe('EXTRA_SCOPES', () => {
    withApp(EXTRA_ENV);

    test('works with a key holding only an extra scope', async () => {
      const { key } = await keyWith(['reports:read']);
      const res = await request(ctx.app).get('/v1/me').set(as(key.token));
      expect(res.status).toBe(200);
      expect(res.body.token.scopes).toEqual(['reports:read']);
    });
  });
});

describe('the key is verified before its scope (401 before 403)', () => {
  withApp();

  // Every key here also lacks the route's scope: a 403 would tell an outsider what the route needs.
  test.each(scopedCases)('%s: no key is 401 AUTHENTICATION_REQUIRED', async (_label, op) => {
    const { target } = await keyWith(allBut(op));
    const res = await call(op, undefined, target.id, allBut(op));
    expectError(res, 401, 'AUTHENTICATION_REQUIRED');
    expect(res.headers['www-authenticate']).toMatch(/^Bearer /);
  });

  test.each(scopedCases)('%s: a wrong secret is 401 INVALID_API_KEY', async (_label, op) => {
    const { key, target } = await keyWith(allBut(op));
    // Same selector, another secret, a valid checksum: only the secret check can refuse it.
    const body = key.token.slice(0, key.token.lastIndexOf('_') + 1) + 'A'.repeat(32);
    expectError(await call(op, body + checksum(body), target.id, allBut(op)), 401, 'INVALID_API_KEY');
  });

  test.each(scopedCases)('%s: a revoked key is 401 API_KEY_REVOKED', async (_label, op) => {
    const { key, target } = await keyWith(allBut(op));
    await request(ctx.app).delete(`/admin/tokens/${key.id}`).set(admin).expect(204);
    expectError(await call(op, key.token, target.id, allBut(op)), 401, 'API_KEY_REVOKED');
  });

  test.each(scopedCases)('%s: an expired key is 401 API_KEY_EXPIRED', async (_label, op) => {
    const user = await createUser(ctx);
    const key = await mintToken(ctx, user.id, { scopes: allBut(op), expires_in: 60 });
    ctx.clock.advance(61);
    expectError(await call(op, key.token, key.id, allBut(op)), 401, 'API_KEY_EXPIRED');
  });
});

describe('deny by default', () => {
  const copy = (): OpenApiDocument => structuredClone(doc);
  const operationOf = (d: OpenApiDocument, op: OperationSpec) => (d.paths[op.path] as Record<string, Record<string, unknown>>)[op.method]!;

  test.each(userOps.map((op) => [label(op), op] as const))('%s without x-required-scope stops start-up', (_label, op) => {
    const broken = copy();
    delete operationOf(broken, op)['x-required-scope'];
    expect(() => listOperations(broken)).toThrow(`openapi: user operation ${op.operationId} declares no x-required-scope`);
  });

  test.each<[string, unknown]>([
    ['an empty string', ''],
    ['a list', ['tokens:read']],
    ['null', null],
  ])('x-required-scope as %s stops start-up', (_label, value) => {
    const broken = copy();
    operationOf(broken, scopedOps[0]!)['x-required-scope'] = value;
    expect(() => listOperations(broken)).toThrow(`declares no x-required-scope`);
  });

  test('an admin operation declaring a scope stops start-up: scopes mean nothing to the admin key', () => {
    const broken = copy();
    (broken.paths['/admin/tokens'] as Record<string, Record<string, unknown>>).get!['x-required-scope'] = 'tokens:read';
    expect(() => listOperations(broken)).toThrow('openapi: listTokens is not a user operation but declares x-required-scope');
  });

  test('the real document loads, with "none" read as no scope', () => {
    expect(userOps.find((op) => op.operationId === 'getMe')?.requiredScope).toBeNull();
  });

  describe('createApp refuses a route requiring a scope that is not built in', () => {
    afterEach(() => {
      jest.restoreAllMocks();
    });

    /**
     * Starts the real app with listMyTokens requiring `requiredScope`; createApp reads the document
     * through loadSpec, so a doctored copy stands in for the file. Returns what start-up threw, if anything.
     */
    async function startRequiring(requiredScope: string, env: Record<string, string> = {}): Promise<unknown> {
      const doctored = copy();
      operationOf(doctored, userOps.find((op) => op.operationId === 'listMyTokens')!)['x-required-scope'] = requiredScope;
      jest.spyOn(spec, 'loadSpec').mockReturnValue(doctored);
      const storage = openSqlite(':memory:');
      try {
        await migrateToLatest(storage.db);
        const app = createApp({ config: testConfig(env), db: storage.db });
        await app.lastUse.stop();
        return undefined;
      } catch (err) {
        return err;
      } finally {
        await storage.close();
      }
    }

    test('a misspelt scope', async () => {
      expect(await startRequiring('token:read')).toEqual(new Error('openapi: listMyTokens requires unknown scope token:read'));
    });

    test('an EXTRA_SCOPES scope, even where the deployment configures it', async () => {
      expect(await startRequiring('reports:read', EXTRA_ENV)).toEqual(new Error('openapi: listMyTokens requires unknown scope reports:read'));
    });

    // Without this, the two refusals above could come from the doctoring rather than from the check.
    test('but starts with the same document requiring a built-in scope', async () => {
      expect(await startRequiring('tokens:write')).toBeUndefined();
    });
  });
});

describe('the scope catalog', () => {
  const mint = (userId: number, body: Record<string, unknown>) => request(ctx.app).post(`/admin/users/${userId}/tokens`).set(admin).send(body);
  const tokenCount = async () => (await ctx.storage.db.selectFrom('tokens').select('id').execute()).length;

  describe('built in only', () => {
    withApp();

    test('an unknown scope is 400 naming it and every valid scope, and stores nothing', async () => {
      const user = await createUser(ctx);
      const error = expectError(await mint(user.id, { scopes: ['bots:read', 'reports:read'] }), 400, 'VALIDATION_ERROR');
      expect(error.details).toEqual([{ field: 'scopes', in: 'body', message: `unknown scope "reports:read"; ${VALID_BUILT_IN}` }]);
      expect(await tokenCount()).toBe(0);
    });

    test('each distinct unknown scope is reported once', async () => {
      const user = await createUser(ctx);
      const error = expectError(await mint(user.id, { scopes: ['x:y', 'bots:read', 'x:y', 'z:w'] }), 400, 'VALIDATION_ERROR');
      expect(error.details).toEqual([
        { field: 'scopes', in: 'body', message: `unknown scope "x:y"; ${VALID_BUILT_IN}` },
        { field: 'scopes', in: 'body', message: `unknown scope "z:w"; ${VALID_BUILT_IN}` },
      ]);
    });

    // Scopes are stored space-separated: a name with a space in it would come back as two scopes.
    test.each([['Bots:Read'], [' bots:read'], ['bots:read tokens:write'], ['bots'], ['none'], ['*']])('%j is not a scope', async (scope) => {
      const user = await createUser(ctx);
      const error = expectError(await mint(user.id, { scopes: [scope] }), 400, 'VALIDATION_ERROR');
      expect(error.details).toEqual([{ field: 'scopes', in: 'body', message: `unknown scope "${scope}"; ${VALID_BUILT_IN}` }]);
      expect(await tokenCount()).toBe(0);
    });

    test('no scopes at all means bots:read and bots:write, stored that way', async () => {
      const user = await createUser(ctx);
      const minted = await mintToken(ctx, user.id);
      expect(minted.scopes).toEqual(['bots:read', 'bots:write']);
      expect((await tokenRow(minted.id)).scopes).toBe('bots:read bots:write');
    });

    test('duplicates are folded and the set sorted, in the response, the row, listings and /v1/me', async () => {
      const user = await createUser(ctx);
      const minted = await mintToken(ctx, user.id, { scopes: ['tokens:read', 'bots:write', 'tokens:read', 'bots:write', 'bots:read'] });
      const expected = ['bots:read', 'bots:write', 'tokens:read'];
      expect(minted.scopes).toEqual(expected);
      expect((await tokenRow(minted.id)).scopes).toBe('bots:read bots:write tokens:read');
      expect((await request(ctx.app).get(`/admin/tokens/${minted.id}`).set(admin)).body.scopes).toEqual(expected);
      expect((await request(ctx.app).get('/v1/tokens').set(as(minted.token))).body.data[0].scopes).toEqual(expected);
      expect((await request(ctx.app).get('/v1/me').set(as(minted.token))).body.token.scopes).toEqual(expected);
    });

    test('an empty list is 400 on the scopes field, not a token that can do nothing', async () => {
      const user = await createUser(ctx);
      const error = expectError(await mint(user.id, { scopes: [] }), 400, 'VALIDATION_ERROR');
      expect(error.details).toEqual([{ field: 'scopes', in: 'body', message: expect.any(String) }]);
      expect(await tokenCount()).toBe(0);
    });

    test('a key minting for itself is held to the same catalog: unknown is 400, empty is 400', async () => {
      const user = await createUser(ctx);
      const key = await mintToken(ctx, user.id, { scopes: BUILT_IN });
      const unknown = expectError(await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['admin:all'] }), 400, 'VALIDATION_ERROR');
      expect(unknown.details).toEqual([{ field: 'scopes', in: 'body', message: `unknown scope "admin:all"; ${VALID_BUILT_IN}` }]);
      const empty = expectError(await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: [] }), 400, 'VALIDATION_ERROR');
      expect(empty.details).toEqual([{ field: 'scopes', in: 'body', message: expect.any(String) }]);
      expect(await tokenCount()).toBe(1);
    });

    test('PATCH folds, sorts and validates scopes the same way', async () => {
      const user = await createUser(ctx);
      const minted = await mintToken(ctx, user.id);
      const patch = (scopes: unknown) => request(ctx.app).patch(`/admin/tokens/${minted.id}`).set(admin).send({ scopes });

      const res = await patch(['tokens:write', 'bots:read', 'tokens:write']);
      expect(res.status).toBe(200);
      expect(res.body.scopes).toEqual(['bots:read', 'tokens:write']);
      expect((await tokenRow(minted.id)).scopes).toBe('bots:read tokens:write');

      const unknown = expectError(await patch(['reports:read']), 400, 'VALIDATION_ERROR');
      expect(unknown.details).toEqual([{ field: 'scopes', in: 'body', message: `unknown scope "reports:read"; ${VALID_BUILT_IN}` }]);
      expect(expectError(await patch([]), 400, 'VALIDATION_ERROR').details).toEqual([{ field: 'scopes', in: 'body', message: expect.any(String) }]);
      expect((await tokenRow(minted.id)).scopes).toBe('bots:read tokens:write');
    });

    test('a scope change takes effect on the key\'s very next request', async () => {
      const user = await createUser(ctx);
      const key = await mintToken(ctx, user.id, { scopes: ['tokens:read'] });
      expect((await request(ctx.app).get('/v1/tokens').set(as(key.token))).status).toBe(200);
      await request(ctx.app).patch(`/admin/tokens/${key.id}`).set(admin).send({ scopes: ['bots:read'] }).expect(200);
      const error = expectError(await request(ctx.app).get('/v1/tokens').set(as(key.token)), 403, 'INSUFFICIENT_SCOPE');
      expect(error.details).toEqual({ required: ['tokens:read'] });
    });
  });

  describe('with EXTRA_SCOPES', () => {
    withApp(EXTRA_ENV);

    test('its scopes can be minted, are stored sorted, and show in /v1/me and in listings', async () => {
      const user = await createUser(ctx);
      const minted = await mintToken(ctx, user.id, { scopes: ['reports:read', 'tokens:read', 'billing:write', 'reports:read'] });
      const expected = ['billing:write', 'reports:read', 'tokens:read'];
      expect(minted.scopes).toEqual(expected);
      expect((await tokenRow(minted.id)).scopes).toBe('billing:write reports:read tokens:read');

      const me = await request(ctx.app).get('/v1/me').set(as(minted.token));
      expect(me.status).toBe(200);
      expect(me.body.token.scopes).toEqual(expected);

      const adminList = await request(ctx.app).get(`/admin/users/${user.id}/tokens`).set(admin);
      expect(adminList.body.data.map((t: { scopes: string[] }) => t.scopes)).toEqual([expected]);
      const ownList = await request(ctx.app).get('/v1/tokens').set(as(minted.token));
      expect(ownList.status).toBe(200);
      expect(ownList.body.data.map((t: { scopes: string[] }) => t.scopes)).toEqual([expected]);
    });

    test('an unknown scope is refused with a message naming the extra scopes too', async () => {
      const user = await createUser(ctx);
      const error = expectError(await mint(user.id, { scopes: ['reports:write'] }), 400, 'VALIDATION_ERROR');
      const details = error.details as Array<{ field: string; in: string; message: string }>;
      expect(details).toHaveLength(1);
      expect(details[0]).toMatchObject({ field: 'scopes', in: 'body' });
      expect(details[0]!.message).toMatch(/^unknown scope "reports:write"; valid scopes are /);
      for (const scope of [...BUILT_IN, 'reports:read', 'billing:write']) expect(details[0]!.message).toContain(scope);
    });

    test('a key can hand its extra scopes on, but not ones it lacks', async () => {
      const user = await createUser(ctx);
      const key = await mintToken(ctx, user.id, { scopes: ['tokens:write', 'reports:read'] });
      const res = await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['reports:read'] });
      expect(res.status).toBe(201);
      expect(res.body.scopes).toEqual(['reports:read']);
      const error = expectError(await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['billing:write'] }), 403, 'INSUFFICIENT_SCOPE');
      expect(error.details).toEqual({ required: ['billing:write'] });
    });

    test('the default is still bots:read and bots:write', async () => {
      const user = await createUser(ctx);
      expect((await mintToken(ctx, user.id)).scopes).toEqual(['bots:read', 'bots:write']);
    });
  });
});
