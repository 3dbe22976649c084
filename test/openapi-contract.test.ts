import Ajv2020 from 'ajv/dist/2020';
import addFormats from 'ajv-formats';
import request from 'supertest';
import { operationRunners } from '../src/http/operations';
import { dereference, listOperations, loadSpec, type OperationSpec } from '../src/openapi/spec';
import { admin, createTestApp, createUser, mintToken, type TestContext } from './helpers/app';

const doc = loadSpec();
const operations = listOperations(doc);
const schemes = (op: OperationSpec) => {
  const raw = (doc.paths[op.path] as Record<string, { security: Array<Record<string, unknown>> }>)[op.method]!;
  return raw.security.flatMap((s) => Object.keys(s)).sort();
};

describe('the OpenAPI document', () => {
  test('has two distinct security schemes for the two APIs', () => {
    expect(doc.components?.securitySchemes).toMatchObject({
      AdminApiKey: { type: 'apiKey', in: 'header', name: 'X-Admin-API-Key' },
      UserApiKey: { type: 'apiKey', in: 'header', name: 'X-API-Key' },
      UserBearer: { type: 'http', scheme: 'bearer' },
    });
  });

  test('every /admin operation declares AdminApiKey and nothing else', () => {
    const adminOps = operations.filter((op) => op.path.startsWith('/admin/'));
    expect(adminOps.length).toBeGreaterThan(0);
    for (const op of adminOps) expect({ op: op.operationId, schemes: schemes(op) }).toEqual({ op: op.operationId, schemes: ['AdminApiKey'] });
  });

  test('every /v1 operation declares UserApiKey (or its Bearer form) and nothing else', () => {
    const userOps = operations.filter((op) => op.path.startsWith('/v1/'));
    expect(userOps.length).toBeGreaterThan(0);
    for (const op of userOps) expect({ op: op.operationId, schemes: schemes(op) }).toEqual({ op: op.operationId, schemes: ['UserApiKey', 'UserBearer'] });
  });

  test('only health checks are open', () => {
    expect(operations.filter((op) => op.auth === 'none').map((op) => op.path).sort()).toEqual(['/healthz', '/readyz']);
  });

  test('every operation documents its error responses with the error envelope', () => {
    for (const op of operations.filter((o) => o.auth !== 'none')) {
      const raw = dereference(doc, (doc.paths[op.path] as Record<string, unknown>)[op.method]) as { responses: Record<string, { content?: Record<string, { schema: unknown }> }> };
      expect({ op: op.operationId, has401: '401' in raw.responses, has400: '400' in raw.responses }).toEqual({ op: op.operationId, has401: true, has400: true });
      for (const [status, response] of Object.entries(raw.responses)) {
        if (Number(status) >= 400) expect(response.content?.['application/json']?.schema).toEqual(dereference(doc, { $ref: '#/components/schemas/Error' }));
      }
    }
  });
});

describe('mounting refuses a contract and handlers that disagree', () => {
  const noop = () => undefined;
  const auth = { admin: noop as never, user: noop as never, sso: noop as never, metrics: noop as never };
  const allHandlers = Object.fromEntries(operations.map((op) => [op.operationId, noop]));

  test('an operation without a handler stops start-up', () => {
    const { getMe: _omit, ...rest } = allHandlers;
    expect(() => operationRunners(operations, rest, auth)).toThrow('operation getMe in openapi.yaml has no handler');
  });

  test('a handler without an operation stops start-up', () => {
    expect(() => operationRunners(operations, { ...allHandlers, secretBackdoor: noop }, auth)).toThrow(
      'handlers without an operation in openapi.yaml: secretBackdoor',
    );
  });

  test('an operation that declares no security stops start-up', () => {
    const broken = { ...doc, paths: { '/v1/open': { get: { operationId: 'open', responses: {} } } } };
    expect(() => listOperations(broken)).toThrow('openapi: open declares no security');
  });

  test.each([
    [undefined, 'openapi: admin operation open declares no x-admin-scope of src/admin-keys/admin-scopes.ts (got undefined)'],
    ['users:delete', 'openapi: admin operation open declares no x-admin-scope of src/admin-keys/admin-scopes.ts (got "users:delete")'],
    ['none', 'openapi: admin operation open declares no x-admin-scope of src/admin-keys/admin-scopes.ts (got "none")'],
  ])('an /admin operation with x-admin-scope %j stops start-up (deny by default)', (scope, message) => {
    const broken = { ...doc, paths: { '/admin/open': { get: { operationId: 'open', security: [{ AdminApiKey: [] }], 'x-admin-scope': scope, responses: {} } } } };
    expect(() => listOperations(broken)).toThrow(message);
  });

  test('a user operation cannot declare an admin scope, nor an admin operation a user scope', () => {
    const userWithAdmin = { ...doc, paths: { '/v1/x': { get: { operationId: 'x', security: [{ UserApiKey: [] }], 'x-required-scope': 'none', 'x-admin-scope': 'users:read', responses: {} } } } };
    expect(() => listOperations(userWithAdmin)).toThrow('openapi: x is not an admin operation but declares x-admin-scope');
    const adminWithUser = { ...doc, paths: { '/admin/x': { get: { operationId: 'x', security: [{ AdminApiKey: [] }], 'x-admin-scope': 'users:read', 'x-required-scope': 'bots:read', responses: {} } } } };
    expect(() => listOperations(adminWithUser)).toThrow('openapi: x is not a user operation but declares x-required-scope');
  });

  test.each([
    ['/v1/open', [], 'openapi: open is under v1/ but its security is open'],
    ['/v1/open', [{ AdminApiKey: [] }], 'openapi: open is under v1/ but its security is admin'],
    ['/admin/open', [], 'openapi: open is under admin/ but its security is open'],
    ['/admin/open', [{ UserApiKey: [] }], 'openapi: open is under admin/ but its security is user'],
  ])('an operation under %s with security %j stops start-up', (path, security, message) => {
    const broken = { ...doc, paths: { [path]: { get: { operationId: 'open', security, 'x-required-scope': 'none', responses: {} } } } };
    expect(() => listOperations(broken)).toThrow(message);
  });
});

describe('responses match the documented schemas', () => {
  let ctx: TestContext;
  beforeAll(async () => {
    ctx = await createTestApp();
  });
  afterAll(async () => {
    await ctx.close();
  });

  const ajv = new Ajv2020({ strict: false, allErrors: true });
  addFormats(ajv);
  const checked = new Set<string>();
  function expectDocumented(operationId: string, res: request.Response) {
    checked.add(operationId);
    const op = operations.find((o) => o.operationId === operationId)!;
    const raw = dereference(doc, (doc.paths[op.path] as Record<string, unknown>)[op.method]) as {
      responses: Record<string, { content?: Record<string, { schema: object }> }>;
    };
    const documented = raw.responses[String(res.status)];
    expect({ operationId, status: res.status, documented: documented !== undefined }).toEqual({ operationId, status: res.status, documented: true });
    const content = documented!.content;
    if (!content) return expect(res.text).toBe('');
    const schema = content['application/json']?.schema;
    // A file or plain text: the documented media type is the one sent.
    if (!schema) return expect(res.headers['content-type']?.split(';')[0]).toBe(Object.keys(content)[0]);
    const validate = ajv.compile(schema);
    expect({ operationId, valid: validate(res.body), errors: validate.errors ?? null }).toEqual({ operationId, valid: true, errors: null });
  }

  test('for the admin and user APIs, on success and on error', async () => {
    const created = await request(ctx.app).post('/admin/users').set(admin).send({ email: 'doc@example.com', data: { a: 1 } });
    expectDocumented('createUser', created);
    expectDocumented('createUser', await request(ctx.app).post('/admin/users').set(admin).send({ email: 'doc@example.com' }));
    expectDocumented('createUser', await request(ctx.app).post('/admin/users').set(admin).send({}));
    expectDocumented('listUsers', await request(ctx.app).get('/admin/users').set(admin));
    expectDocumented('getUser', await request(ctx.app).get(`/admin/users/${created.body.id}`).set(admin));
    expectDocumented('getUser', await request(ctx.app).get('/admin/users/999').set(admin));
    expectDocumented('getUserByEmail', await request(ctx.app).get('/admin/users/email/doc@example.com').set(admin));
    expectDocumented('updateUser', await request(ctx.app).patch(`/admin/users/${created.body.id}`).set(admin).send({ name: 'Doc' }));
    const user = await createUser(ctx);
    const minted = await request(ctx.app).post(`/admin/users/${user.id}/tokens`).set(admin).send({ expires_in: 600 });
    expectDocumented('mintToken', minted);
    expectDocumented('listUserTokens', await request(ctx.app).get(`/admin/users/${user.id}/tokens`).set(admin));
    expectDocumented('getToken', await request(ctx.app).get(`/admin/tokens/${minted.body.id}`).set(admin));
    expectDocumented('getMe', await request(ctx.app).get('/v1/me').set('X-API-Key', minted.body.token));
    expectDocumented('getMe', await request(ctx.app).get('/v1/me'));
    expectDocumented('revokeToken', await request(ctx.app).delete(`/admin/tokens/${minted.body.id}`).set(admin));
    const second = await mintToken(ctx, user.id);
    expectDocumented('deleteUser', await request(ctx.app).delete(`/admin/users/${user.id}`).set(admin));
    expectDocumented('getMe', await request(ctx.app).get('/v1/me').set('X-API-Key', second.token));
    expectDocumented('getHealth', await request(ctx.app).get('/healthz'));
    expectDocumented('getReadiness', await request(ctx.app).get('/readyz'));
  });

  test('for token lifecycle and self-service operations, on success and on error', async () => {
    const user = await createUser(ctx);
    const key = await mintToken(ctx, user.id, { scopes: ['bots:read', 'tokens:read', 'tokens:write'], allowed_ips: ['127.0.0.1', '::1'] });
    const narrow = await mintToken(ctx, user.id, { scopes: ['bots:read'] });
    const asKey = { 'X-API-Key': key.token };

    expectDocumented('listTokens', await request(ctx.app).get(`/admin/tokens?user_id=${user.id}&status=active&environment=live`).set(admin));
    expectDocumented('listTokens', await request(ctx.app).get('/admin/tokens?status=gone').set(admin));
    expectDocumented('listTokens', await request(ctx.app).get('/admin/tokens?user_id=999999').set(admin));
    expectDocumented('updateToken', await request(ctx.app).patch(`/admin/tokens/${narrow.id}`).set(admin).send({ name: 'renamed', allowed_ips: null }));
    expectDocumented('updateToken', await request(ctx.app).patch(`/admin/tokens/${narrow.id}`).set(admin).send({}));
    const rotated = await request(ctx.app).post(`/admin/tokens/${narrow.id}/rotate`).set(admin).send({ grace_period_seconds: 0 });
    expectDocumented('rotateToken', rotated);
    expectDocumented('rotateToken', await request(ctx.app).post(`/admin/tokens/${narrow.id}/rotate`).set(admin));
    expectDocumented('updateToken', await request(ctx.app).patch(`/admin/tokens/${narrow.id}`).set(admin).send({ name: 'late' }));

    expectDocumented('listMyTokens', await request(ctx.app).get('/v1/tokens').set(asKey));
    expectDocumented('listMyTokens', await request(ctx.app).get('/v1/tokens').set('X-API-Key', rotated.body.token));
    const mine = await request(ctx.app).post('/v1/tokens').set(asKey).send({ scopes: ['bots:read'] });
    expectDocumented('mintMyToken', mine);
    expectDocumented('mintMyToken', await request(ctx.app).post('/v1/tokens').set(asKey).send({ scopes: ['bots:write'] }));
    expectDocumented('mintMyToken', await request(ctx.app).post('/v1/tokens').set(asKey).send({ allowed_ips: ['10.0.0.1'] }));
    expectDocumented('getMyToken', await request(ctx.app).get(`/v1/tokens/${mine.body.id}`).set(asKey));
    expectDocumented('getMyToken', await request(ctx.app).get('/v1/tokens/999999').set(asKey));
    expectDocumented('rotateMyToken', await request(ctx.app).post(`/v1/tokens/${mine.body.id}/rotate`).set(asKey).send({ grace_period_seconds: 60 }));
    expectDocumented('rotateMyToken', await request(ctx.app).post(`/v1/tokens/${mine.body.id}/rotate`).set(asKey));
    expectDocumented('revokeMyToken', await request(ctx.app).delete(`/v1/tokens/${mine.body.id}`).set(asKey));
    expectDocumented('revokeMyToken', await request(ctx.app).delete('/v1/tokens/999999').set(asKey));
    expectDocumented('getMe', await request(ctx.app).get('/v1/me').set('X-Forwarded-For', '10.0.0.1').set(asKey));
  });

  test('for bots, on success and on error', async () => {
    const user = await createUser(ctx, { max_concurrent_bots: 1 });
    const key = await mintToken(ctx, user.id, { scopes: ['bots:read', 'bots:write'] });
    const asKey = { 'X-API-Key': key.token };

    const bot = await request(ctx.app).post('/v1/bots').set(asKey).send({ platform: 'meet', native_meeting_id: 'm-1', metadata: { a: 1 } });
    expectDocumented('acquireBot', bot);
    expectDocumented('acquireBot', await request(ctx.app).post('/v1/bots').set(asKey).send({ native_meeting_id: 'm-2' }));
    expectDocumented('acquireBot', await request(ctx.app).post('/v1/bots').set(asKey).send({ ttl_seconds: 1 }));
    expectDocumented('listMyBots', await request(ctx.app).get('/v1/bots').set(asKey));
    expectDocumented('getMyBot', await request(ctx.app).get(`/v1/bots/${bot.body.id}`).set(asKey));
    expectDocumented('getMyBot', await request(ctx.app).get('/v1/bots/999999').set(asKey));
    expectDocumented('heartbeatBot', await request(ctx.app).post(`/v1/bots/${bot.body.id}/heartbeat`).set(asKey).send({ ttl_seconds: 60 }));
    expectDocumented('listUserBots', await request(ctx.app).get(`/admin/users/${user.id}/bots?status=active`).set(admin));
    expectDocumented('listUserBots', await request(ctx.app).get('/admin/users/999999/bots').set(admin));
    expectDocumented('listBots', await request(ctx.app).get('/admin/bots?status=active').set(admin));
    expectDocumented('listBots', await request(ctx.app).get('/admin/bots?status=running').set(admin));
    expectDocumented('getBot', await request(ctx.app).get(`/admin/bots/${bot.body.id}`).set(admin));
    expectDocumented('releaseBot', await request(ctx.app).delete(`/v1/bots/${bot.body.id}`).set(asKey));
    expectDocumented('heartbeatBot', await request(ctx.app).post(`/v1/bots/${bot.body.id}/heartbeat`).set(asKey));
    expectDocumented('releaseBot', await request(ctx.app).delete('/v1/bots/999999').set(asKey));
    expectDocumented('forceReleaseBot', await request(ctx.app).delete(`/admin/bots/${bot.body.id}`).set(admin));
    expectDocumented('forceReleaseBot', await request(ctx.app).delete('/admin/bots/999999').set(admin));
  });

  test('for forward auth, on success and on error', async () => {
    const user = await createUser(ctx);
    const key = await mintToken(ctx, user.id, { scopes: ['bots:read'] });
    const good = await request(ctx.app).get('/auth/verify?scope=bots:read').set('X-API-Key', key.token);
    expectDocumented('verifyKey', good);
    expect(good.headers['x-keyward-user-id']).toBe(String(user.id));
    expectDocumented('verifyKey', await request(ctx.app).get('/auth/verify?scope=bots:write').set('X-API-Key', key.token));
    expectDocumented('verifyKey', await request(ctx.app).get('/auth/verify?scope=,').set('X-API-Key', key.token));
    expectDocumented('verifyKey', await request(ctx.app).get('/auth/verify'));
  });

  test('for single sign-on, on success and on error', async () => {
    const sso = await createTestApp({ env: { SSO_TRUSTED_PROXIES: '127.0.0.1, ::1', SSO_AUTO_PROVISION: 'on' } });
    try {
      const person = { 'X-Forwarded-Email': 'sso-doc@example.com', 'X-Forwarded-User': 'sub-doc' };
      const change = { ...person, 'X-Keyward-CSRF': '1' };
      expectDocumented('getSsoMe', await request(sso.app).get('/sso/me').set(person));
      expectDocumented('getSsoMe', await request(sso.app).get('/sso/me'));
      const minted = await request(sso.app).post('/sso/tokens').set(change).send({ name: 'laptop' });
      expectDocumented('mintSsoToken', minted);
      expectDocumented('mintSsoToken', await request(sso.app).post('/sso/tokens').set(person).send({}));
      expectDocumented('mintSsoToken', await request(sso.app).post('/sso/tokens').set(change).send({ scopes: ['tokens:write'] }));
      expectDocumented('listSsoTokens', await request(sso.app).get('/sso/tokens').set(person));
      expectDocumented('rotateSsoToken', await request(sso.app).post(`/sso/tokens/${minted.body.id}/rotate`).set(change).send({ grace_period_seconds: 0 }));
      expectDocumented('rotateSsoToken', await request(sso.app).post(`/sso/tokens/${minted.body.id}/rotate`).set(change));
      expectDocumented('revokeSsoToken', await request(sso.app).delete(`/sso/tokens/${minted.body.id}`).set(change));
      expectDocumented('revokeSsoToken', await request(sso.app).delete('/sso/tokens/999999').set(change));
    } finally {
      await sso.close();
    }
  });

  test('for the audit log, usage, credits, backup and metrics, on success and on error', async () => {
    const user = await createUser(ctx, { credits: 5 });
    const key = await mintToken(ctx, user.id);
    const asKey = { 'X-API-Key': key.token };
    expectDocumented('listAuditEvents', await request(ctx.app).get('/admin/audit?action=token.*&limit=2').set(admin));
    expectDocumented('listAuditEvents', await request(ctx.app).get('/admin/audit?target=user:x').set(admin));
    expectDocumented('listAuditEvents', await request(ctx.app).get('/admin/audit'));
    expectDocumented('listUserAuditEvents', await request(ctx.app).get(`/admin/users/${user.id}/audit`).set(admin));
    expectDocumented('listUserAuditEvents', await request(ctx.app).get(`/admin/users/${user.id}/audit?since=yesterday`).set(admin));
    expectDocumented('getUserUsage', await request(ctx.app).get(`/admin/users/${user.id}/usage`).set(admin));
    expectDocumented('getUserUsage', await request(ctx.app).get('/admin/users/999999/usage').set(admin));
    expectDocumented('getUserUsage', await request(ctx.app).get(`/admin/users/${user.id}/usage?from=2026-02-01&to=2026-01-01`).set(admin));
    expectDocumented('getMyUsage', await request(ctx.app).get('/v1/usage').set(asKey));
    expectDocumented('getMyUsage', await request(ctx.app).get('/v1/usage?from=January').set(asKey));
    expectDocumented('getMyCredits', await request(ctx.app).get('/v1/credits').set(asKey));
    expectDocumented('getMyCredits', await request(ctx.app).get('/v1/credits'));
    expectDocumented('createBackup', await request(ctx.app).post('/admin/backup').set(admin).buffer(true));
    expectDocumented('createBackup', await request(ctx.app).post('/admin/backup'));
    expectDocumented('getMetrics', await request(ctx.app).get('/metrics'));
    expectDocumented('getMetrics', await request(ctx.app).get('/metrics?x=1'));
    const tokenOnly = await createTestApp({ env: { METRICS_TOKEN: 'm'.repeat(16) + 'etrics-token-0123456789', METRICS_ALLOWED_IPS: 'any' } });
    const outside = await createTestApp({ env: { METRICS_ALLOWED_IPS: '10.0.0.0/8' } });
    try {
      expectDocumented('getMetrics', await request(tokenOnly.app).get('/metrics'));
      expectDocumented('getMetrics', await request(outside.app).get('/metrics'));
    } finally {
      await tokenOnly.close();
      await outside.close();
    }
  });

  test('for admin keys, on success and on error', async () => {
    const created = await request(ctx.app).post('/admin/admin-keys').set(admin).send({ name: 'contract', scopes: ['users:read'], expires_in: 600 });
    expectDocumented('createAdminKey', created);
    expectDocumented('createAdminKey', await request(ctx.app).post('/admin/admin-keys').set(admin).send({ name: 'contract', scopes: ['users:read'] }));
    expectDocumented('createAdminKey', await request(ctx.app).post('/admin/admin-keys').set(admin).send({ name: 'x', scopes: ['nope'] }));
    const narrow = { 'X-Admin-API-Key': created.body.key as string };
    expectDocumented('createAdminKey', await request(ctx.app).post('/admin/admin-keys').set(narrow).send({ name: 'y', scopes: ['users:read'] }));
    expectDocumented('listUsers', await request(ctx.app).get('/admin/users').set(narrow));
    expectDocumented('listAdminKeys', await request(ctx.app).get('/admin/admin-keys').set(admin));
    expectDocumented('listAdminKeys', await request(ctx.app).get('/admin/admin-keys').set(narrow));
    expectDocumented('getAdminKey', await request(ctx.app).get(`/admin/admin-keys/${created.body.id}`).set(admin));
    expectDocumented('getAdminKey', await request(ctx.app).get('/admin/admin-keys/999').set(admin));
    expectDocumented('revokeAdminKey', await request(ctx.app).delete(`/admin/admin-keys/${created.body.id}`).set(admin));
    expectDocumented('revokeAdminKey', await request(ctx.app).delete('/admin/admin-keys/999').set(admin));
    expectDocumented('listUsers', await request(ctx.app).get('/admin/users').set(narrow));
    expectDocumented('listAuditEvents', await request(ctx.app).get('/admin/audit?actor=admin_key').set(admin));
  });

  // Runs after the ones above (jest keeps a file's order): a new operation must join them.
  test('every operation in the document was checked above', () => {
    expect(operations.map((o) => o.operationId).filter((id) => !checked.has(id))).toEqual([]);
  });
});
