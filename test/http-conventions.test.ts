import { Writable } from 'node:stream';
import express from 'express';
import helmet from 'helmet';
import { HELMET_OPTIONS } from '../src/http/security-headers';
import request from 'supertest';
import { errorHandler } from '../src/http/error-handler';
import { AppError } from '../src/http/errors';
import { createLogger } from '../src/logger';
import { admin, createTestApp, createUser, expectError, mintToken, type TestContext } from './helpers/app';

let ctx: TestContext;
beforeEach(async () => {
  ctx = await createTestApp();
});
afterEach(async () => {
  await ctx.close();
});

const countUsers = async () => (await ctx.storage.db.selectFrom('users').select('id').execute()).length;

describe('one error envelope from every layer', () => {
  test('an unknown route gets 404 NOT_FOUND', async () => {
    expectError(await request(ctx.app).get('/nope'), 404, 'NOT_FOUND');
    expectError(await request(ctx.app).get('/admin/nope').set(admin), 404, 'NOT_FOUND');
    expectError(await request(ctx.app).post('/v1/nothing-here'), 404, 'NOT_FOUND');
  });

  test('a known path with the wrong method gets 405 METHOD_NOT_ALLOWED with Allow', async () => {
    const res = await request(ctx.app).put('/admin/users/1').set(admin).send({});
    const error = expectError(res, 405, 'METHOD_NOT_ALLOWED');
    expect(res.headers.allow).toBe('GET, PATCH, DELETE, HEAD');
    expect(error.details).toEqual({ allow: ['GET', 'PATCH', 'DELETE', 'HEAD'] });
    expect(res.headers['allow']).toBeDefined();
    expect((await request(ctx.app).delete('/v1/me')).headers.allow).toBe('GET, HEAD');
  });

  test('malformed JSON gets 400 INVALID_JSON', async () => {
    for (const body of ['{"email": ', '{email: "x"}', 'null', '"a string"', '']) {
      const res = await request(ctx.app).post('/admin/users').set(admin).set('Content-Type', 'application/json').send(body);
      if (body === '') {
        expectError(res, 400, 'VALIDATION_ERROR');
      } else {
        expectError(res, 400, 'INVALID_JSON');
      }
    }
    expect(await countUsers()).toBe(0);
  });

  test('a JSON body that is not an object gets 400 VALIDATION_ERROR', async () => {
    const error = expectError(await request(ctx.app).post('/admin/users').set(admin).send([{ email: 'a@example.com' }]), 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([{ field: 'body', in: 'body', message: 'must be object' }]);
  });

  test('a missing required body gets 400 saying a body is required', async () => {
    const error = expectError(await request(ctx.app).post('/admin/users').set(admin), 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([{ field: 'body', in: 'body', message: 'a JSON body is required' }]);
  });

  test('a body over 64 KiB gets 413 PAYLOAD_TOO_LARGE', async () => {
    const res = await request(ctx.app)
      .post('/admin/users')
      .set(admin)
      .send({ email: 'big@example.com', name: 'x'.repeat(70 * 1024) });
    expectError(res, 413, 'PAYLOAD_TOO_LARGE');
    expect(await countUsers()).toBe(0);
  });

  test.each([
    ['text/plain', 'email=a@example.com'],
    ['application/x-www-form-urlencoded', 'email=a%40example.com'],
    ['multipart/form-data; boundary=x', '--x--'],
    ['application/json; charset=latin1', '{"email":"a@example.com"}'],
  ])('a %s body gets 415 UNSUPPORTED_MEDIA_TYPE', async (type, body) => {
    expectError(await request(ctx.app).post('/admin/users').set(admin).set('Content-Type', type).send(body), 415, 'UNSUPPORTED_MEDIA_TYPE');
    expect(await countUsers()).toBe(0);
  });

  test('a body without a Content-Type gets 415', async () => {
    const res = await request(ctx.app)
      .post('/admin/users')
      .set(admin)
      .set('Content-Type', '')
      .send(Buffer.from('{"email":"a@example.com"}'));
    expectError(res, 415, 'UNSUPPORTED_MEDIA_TYPE');
  });

  test('a body sent to an operation that takes none gets 400', async () => {
    const user = await createUser(ctx);
    const error = expectError(await request(ctx.app).delete(`/admin/users/${user.id}`).set(admin).send({ force: true }), 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([{ field: 'body', in: 'body', message: 'this operation takes no request body' }]);
    expect(await countUsers()).toBe(1);
  });

  test('an unexpected error gets a generic 500 INTERNAL_ERROR and its cause goes to the log only', async () => {
    const lines: string[] = [];
    const sink = new Writable({ write: (chunk, _enc, done) => { lines.push(String(chunk)); done(); } });
    const app = express();
    app.use((_req, res, next) => { res.locals.requestId = 'req-1'; next(); });
    app.get('/boom', () => {
      throw new Error('disk exploded at /var/secret/path');
    });
    app.use(errorHandler(createLogger('info', sink)));
    const res = await request(app).get('/boom');
    expect(res.status).toBe(500);
    expect(res.body).toEqual({ error: { code: 'INTERNAL_ERROR', message: 'Internal server error.', details: null, request_id: 'req-1' } });
    expect(lines.join('')).toContain('disk exploded');
  });
});

describe('errors as values', () => {
  test('a refusal (4xx) carries no stack trace, which costs time and tells nobody anything; a fault (5xx) keeps its own', () => {
    const refusal = new AppError(401, 'INVALID_API_KEY', 'The API key is not valid.');
    expect(refusal.stack?.split('\n')).toEqual(['AppError: The API key is not valid.']);
    const fault = new AppError(500, 'INTERNAL_ERROR', 'boom');
    expect(fault.stack?.split('\n').length).toBeGreaterThan(1);
    expect(Error.stackTraceLimit).toBeGreaterThan(0);
  });
});

describe('headers on every response', () => {
  test('X-Request-Id is new for each request, or the caller\'s own if it is plain', async () => {
    const a = await request(ctx.app).get('/healthz');
    const b = await request(ctx.app).get('/healthz');
    expect(a.headers['x-request-id']).toMatch(/^[0-9a-f-]{36}$/);
    expect(a.headers['x-request-id']).not.toBe(b.headers['x-request-id']);
    expect((await request(ctx.app).get('/healthz').set('X-Request-Id', 'trace-123.abc')).headers['x-request-id']).toBe('trace-123.abc');
    const unsafe = await request(ctx.app).get('/nope').set('X-Request-Id', 'bad id\twith "quotes"');
    expect(unsafe.headers['x-request-id']).toMatch(/^[0-9a-f-]{36}$/);
    expect(unsafe.body.error.request_id).toBe(unsafe.headers['x-request-id']);
  });

  test('helmet\'s headers are on, X-Powered-By is off, nothing is cacheable', async () => {
    const res = await request(ctx.app).get('/admin/users').set(admin);
    expect(res.headers['x-powered-by']).toBeUndefined();
    expect(res.headers['x-content-type-options']).toBe('nosniff');
    expect(res.headers['content-security-policy']).toContain("default-src 'self'");
    expect(res.headers['content-security-policy']).not.toContain('upgrade-insecure-requests');
    expect(res.headers['x-frame-options']).toBe('SAMEORIGIN');
    expect(res.headers['cache-control']).toBe('no-store');
    expect(res.headers.etag).toBeUndefined();
  });
});

describe('health, readiness and docs', () => {
  test('/healthz and /readyz answer 200 without credentials', async () => {
    expect((await request(ctx.app).get('/healthz')).body).toEqual({ status: 'ok' });
    expect((await request(ctx.app).get('/readyz')).body).toEqual({ status: 'ok', rate_limit_store: { kind: 'memory', up: true } });
  });

  test('/openapi.json serves the contract and /docs serves Swagger UI', async () => {
    const spec = await request(ctx.app).get('/openapi.json');
    expect(spec.status).toBe(200);
    expect(spec.body.openapi).toBe('3.1.0');
    expect(Object.keys(spec.body.components.securitySchemes)).toEqual(expect.arrayContaining(['AdminApiKey', 'UserApiKey']));
    const docs = await request(ctx.app).get('/docs/');
    expect(docs.status).toBe(200);
    expect(docs.text).toContain('swagger-ui');
    const init = await request(ctx.app).get('/docs/swagger-ui-init.js');
    expect(init.status).toBe(200);
    expect(init.text).toContain('X-Admin-API-Key');
    const css = await request(ctx.app).get('/docs/swagger-ui.css');
    expect(css.status).toBe(200);
    expect(css.headers['content-type']).toMatch(/^text\/css/);
    expect(css.headers['cache-control']).toBe('no-store');
  });

  test('/docs sends the browser to /docs/, where the page\'s relative links resolve', async () => {
    const res = await request(ctx.app).get('/docs');
    expect(res.status).toBe(301);
    expect(res.headers.location).toBe('/docs/');
  });

  test('under /docs/ only the page and its files exist: anything else is the 404 envelope', async () => {
    for (const path of ['/docs/../package.json', '/docs/package.json', '/docs/anything.js', '/docs/index.js', '/docs/swagger-initializer.js', '/docs/swagger-ui.css.map', '/docs/nope/', '/docs/%2e%2e/package.json', '/docs/.env']) {
      const res = await request(ctx.app).get(path);
      expect([path, res.status, res.body.error?.code]).toEqual([path, 404, 'NOT_FOUND']);
      expect(res.headers['content-type']).toMatch(/^application\/json/);
    }
    expectError(await request(ctx.app).post('/docs/swagger-ui.css'), 404, 'NOT_FOUND');
  });
});

describe('while shutting down', () => {
  test('new requests and readiness get 503 UNAVAILABLE with Connection: close', async () => {
    const lifecycle = { draining: false };
    const draining = await createTestApp({ lifecycle });
    expect((await request(draining.app).get('/readyz')).status).toBe(200);
    lifecycle.draining = true;
    for (const res of [await request(draining.app).get('/readyz'), await request(draining.app).get('/admin/users').set(admin)]) {
      expectError(res, 503, 'UNAVAILABLE');
      expect(res.headers.connection).toBe('close');
      expect(res.headers['cache-control']).toBe('no-store');
      expect(res.headers['retry-after']).toBe('1');
    }
    await draining.close();
  });
});

describe('security headers', () => {
  test('every response carries exactly the headers helmet itself would set', async () => {
    const plain = express();
    plain.use(helmet(HELMET_OPTIONS));
    plain.get('/x', (_req, res) => {
      res.json({});
    });
    const reference = (await request(plain).get('/x')).headers;
    const ours = (await request(ctx.app).get('/healthz')).headers;
    const helmetNames = Object.keys(reference).filter((h) => !['content-type', 'content-length', 'etag', 'date', 'connection', 'keep-alive'].includes(h));
    expect(helmetNames.length).toBeGreaterThanOrEqual(10);
    for (const name of helmetNames) expect({ name, value: ours[name] }).toEqual({ name, value: reference[name] });
    expect(ours['x-powered-by']).toBeUndefined();
  });
});

describe('ids beyond what the database numbers (PostgreSQL serial: 2^31 - 1)', () => {
  test('the largest id is a plain 404, the next one a 400 naming the bound, on every API (found by the fuzz as a 500 on PostgreSQL)', async () => {
    const ctx = await createTestApp({ env: { SSO_TRUSTED_PROXIES: '127.0.0.1, ::1' } });
    try {
      const sso = { 'X-Forwarded-Email': 'ids@example.com', 'X-Forwarded-User': 'ids', 'X-Keyward-CSRF': '1' };
      const user = await createUser(ctx, { email: 'ids@example.com' });
      const { token } = await mintToken(ctx, user.id, { scopes: ['bots:read', 'bots:write', 'tokens:read', 'tokens:write'] });
      const routes = (id: string) => [
        request(ctx.app).get(`/admin/tokens/${id}`).set(admin),
        request(ctx.app).get(`/admin/users/${id}`).set(admin),
        request(ctx.app).get(`/v1/bots/${id}`).set('X-API-Key', token),
        request(ctx.app).post(`/v1/tokens/${id}/rotate`).set('X-API-Key', token).send({}),
        request(ctx.app).post(`/sso/tokens/${id}/rotate`).set(sso).send({}),
      ];
      for (const res of await Promise.all(routes('2147483647'))) expectError(res, 404, 'NOT_FOUND');
      // A cursor at the largest id still names a page; one past it is no cursor (test/admin-users.test.ts).
      const lastCursor = Buffer.from('id:2147483647').toString('base64url');
      for (const path of ['/admin/users', '/admin/tokens', '/admin/bots', '/admin/audit']) {
        const page = await request(ctx.app).get(`${path}?cursor=${lastCursor}`).set(admin);
        expect([path, page.status]).toEqual([path, 200]);
      }
      for (const res of await Promise.all(routes('2147483648'))) {
        expect(expectError(res, 400, 'VALIDATION_ERROR').details).toEqual([{ field: 'id', in: 'path', message: 'must be <= 2147483647' }]);
      }
      // Numbers that are not finite skip Ajv's bounds after coercion (found by the fuzz as a 500 on
      // PostgreSQL, and a 200 on SQLite for /admin/users/Infinity/audit): each is a 400 too.
      for (const infinite of ['Infinity', '-Infinity', '1e400']) {
        for (const res of await Promise.all([...routes(infinite), request(ctx.app).get(`/admin/users/${infinite}/audit`).set(admin), request(ctx.app).get(`/admin/admin-keys/${infinite}`).set(admin)])) {
          expect(expectError(res, 400, 'VALIDATION_ERROR').details).toEqual([{ field: 'id', in: 'path', message: 'must be a finite number' }]);
        }
      }
      const limit = expectError(await request(ctx.app).get('/admin/users?limit=Infinity').set(admin), 400, 'VALIDATION_ERROR');
      expect(limit.details).toEqual([{ field: 'limit', in: 'query', message: 'must be a finite number' }]);
    } finally {
      await ctx.close();
    }
  });
});
