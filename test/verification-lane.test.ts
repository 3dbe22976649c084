import type { IncomingMessage, ServerResponse } from 'node:http';
import request from 'supertest';
import { verificationLane } from '../src/http/lane';
import type { OperationRunner } from '../src/http/operations';
import { listOperations, loadSpec } from '../src/openapi/spec';
import { admin, createTestApp, createUser, expectError, mintToken, type TestContext } from './helpers/app';

/**
 * The verification lane answers GET/HEAD /v1/me and /auth/verify before Express; every other
 * spelling of a request goes through Express. Both run the same operation, so they must give the
 * same answer, header for header.
 */
let ctx: TestContext;
beforeEach(async () => {
  ctx = await createTestApp();
});
afterEach(async () => {
  await ctx.close();
});

const operations = listOperations(loadSpec());

describe('which requests the lane takes', () => {
  const taken: string[] = [];
  const recorder = (id: string): OperationRunner => async (_req, _res, params, query) => {
    taken.push(`${id} ${JSON.stringify(params)} ${JSON.stringify(query)}`);
  };
  const runners = new Map(operations.map((op) => [op, recorder(op.operationId)]));
  const lane = verificationLane(runners, ['getMe', 'verifyKey'], () => undefined);
  const offer = (method: string, url: string) => lane({ method, url } as IncomingMessage, {} as ServerResponse);

  beforeEach(() => {
    taken.length = 0;
  });

  test('GET and HEAD of the exact paths, with the query parsed as Express parses it', () => {
    expect(offer('GET', '/v1/me')).toBe(true);
    expect(offer('HEAD', '/v1/me')).toBe(true);
    expect(offer('GET', '/auth/verify?scope=bots:read&scope=x%20y')).toBe(true);
    expect(offer('GET', '/auth/verify?')).toBe(true);
    expect(taken).toEqual([
      'getMe {} {}',
      'getMe {} {}',
      'verifyKey {} {"scope":["bots:read","x y"]}',
      'verifyKey {} {}',
    ]);
  });

  test('anything else goes on to Express', () => {
    for (const [method, url] of [
      ['POST', '/v1/me'],
      ['DELETE', '/auth/verify'],
      ['OPTIONS', '/v1/me'],
      ['GET', '/v1/me/'],
      ['GET', '/V1/ME'],
      ['GET', '/v1/me?x=1#frag'],
      ['GET', '/v1/tokens'],
      ['GET', '/v1//me'],
    ] as const) {
      expect([method, url, offer(method, url)]).toEqual([method, url, false]);
    }
    expect(taken).toEqual([]);
  });

  test('only a GET without path parameters or body may be put in the lane', () => {
    expect(() => verificationLane(runners, ['getUser'], () => undefined)).toThrow('verification lane: getUser is not a GET without path parameters or body');
    expect(() => verificationLane(runners, ['createUser'], () => undefined)).toThrow('verification lane: createUser is not a GET without path parameters or body');
    expect(() => verificationLane(runners, ['nope'], () => undefined)).toThrow('verification lane: no operation nope in openapi.yaml');
  });
});

/** Status, headers and body, without what differs per request by design. */
function answer(res: request.Response) {
  // RateLimit-Remaining counts down with each request, and Reset with the clock: both must be there alike.
  const { 'x-request-id': id, date: _date, connection: _connection, 'keep-alive': _keepAlive, 'ratelimit-remaining': remaining, 'ratelimit-reset': reset, ...headers } = res.headers;
  if (remaining !== undefined) headers['ratelimit-remaining'] = /^\d+$/.test(remaining) ? 'a count' : remaining;
  if (reset !== undefined) headers['ratelimit-reset'] = /^\d+$/.test(reset) ? 'seconds' : reset;
  const body = res.body && typeof res.body === 'object' && res.body.error ? { ...res.body, error: { ...res.body.error, request_id: res.body.error.request_id === id ? 'the X-Request-Id' : res.body.error.request_id } } : res.body;
  return { status: res.status, headers, body };
}

describe('the lane and Express give the same answer', () => {
  // A trailing slash and another letter case are the same route to Express, which the lane leaves to it.
  const pairs = (path: string) => [path, `${path.replace(/\?|$/, '/$&')}`, path.toUpperCase().replace(/\?.*$/, (q) => q.toLowerCase())];

  test('for a good key, a wrong one, none, and a missing scope, on both routes, GET and HEAD', async () => {
    // Many wrong keys from one address: lift its limit, or the later answers would all be 429.
    await ctx.close();
    ctx = await createTestApp({ env: { AUTH_FAILURES_PER_MINUTE: '10000' } });
    const user = await createUser(ctx, { email: 'lane@example.com' });
    const minted = await mintToken(ctx, user.id, { scopes: ['bots:read'] });
    const revoked = await mintToken(ctx, user.id);
    await request(ctx.app).delete(`/admin/tokens/${revoked.id}`).set(admin).expect(204);
    const keys: Array<Record<string, string>> = [
      { 'X-API-Key': minted.token },
      { Authorization: `Bearer ${minted.token}` },
      { 'X-API-Key': revoked.token },
      { 'X-API-Key': `${minted.token.slice(0, -1)}x` },
      {},
    ];
    for (const path of ['/v1/me', '/auth/verify', '/auth/verify?scope=bots:read', '/auth/verify?scope=bots:write', '/auth/verify?scope=', '/auth/verify?nope=1']) {
      for (const headers of keys) {
        for (const method of ['get', 'head'] as const) {
          const [lanePath, ...expressPaths] = pairs(path);
          const lane = answer(await request(ctx.app)[method](lanePath!).set(headers));
          for (const other of expressPaths) {
            expect([other, method, headers, answer(await request(ctx.app)[method](other).set(headers))]).toEqual([other, method, headers, lane]);
          }
        }
      }
    }
  });

  test('a refusal through the lane is the one envelope, with its request id', async () => {
    const res = await request(ctx.app).get('/v1/me').set('X-Request-Id', 'lane-trace-1');
    expect(expectError(res, 401, 'AUTHENTICATION_REQUIRED')).toBeDefined();
    expect(res.body.error.request_id).toBe('lane-trace-1');
    expect(res.headers['cache-control']).toBe('no-store');
    expect(res.headers['content-security-policy']).toBeDefined();
  });
});
