import { rmSync } from 'node:fs';
import { join } from 'node:path';
import request from 'supertest';
import { ConfigError, loadConfig } from '../src/config';
import { listOperations, loadSpec } from '../src/openapi/spec';
import { checksum } from '../src/tokens/token-format';
import { ADMIN_KEY, admin, createTestApp, createUser, expectError, mintToken, tempDir, type TestContext } from './helpers/app';
import { makeTempDir, removeTempDirs, startServer, stopAllServers } from './helpers/server-process';

/**
 * GET /metrics: what it counts (by route template, never by a value from a request), which rate
 * limits and auth outcomes it tells apart, and who may read it (METRICS_ENABLED, METRICS_ALLOWED_IPS,
 * METRICS_TOKEN, TRUST_PROXY). The Prometheus text is parsed here by hand, so the test does not trust
 * prom-client to read back what it wrote.
 */

const METRICS_TOKEN = 'metrics-token-0123456789abcdefghijklmnopqrstuv';
const PROM_TEXT = /^text\/plain; version=0\.0\.4; charset=utf-8$/;

const contexts: TestContext[] = [];
const dirs: string[] = [];
async function app(env: Record<string, string> = {}): Promise<TestContext> {
  const ctx = await createTestApp({ env });
  contexts.push(ctx);
  return ctx;
}
/** The production set-up: a database file, so its size is something. */
async function fileApp(env: Record<string, string> = {}): Promise<TestContext> {
  const dir = tempDir();
  dirs.push(dir);
  return app({ DATABASE_PATH: join(dir, 'keyward.db'), ...env });
}
afterEach(async () => {
  for (const ctx of contexts.splice(0)) await ctx.close();
  await stopAllServers();
});
afterAll(() => {
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
  removeTempDirs();
});

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** Go's ParseFloat, which Prometheus uses, takes NaN and Inf in any case (prom-client writes "Nan"). */
function parseValue(raw: string): number {
  const lower = raw.toLowerCase();
  if (lower === 'nan') return NaN;
  if (lower === '+inf' || lower === 'inf') return Infinity;
  if (lower === '-inf') return -Infinity;
  const n = Number(raw);
  if (raw.trim() === '' || Number.isNaN(n)) throw new Error(`not a sample value: ${raw}`);
  return n;
}

/** The samples of a Prometheus text exposition; throws on any line that is neither a comment nor a sample. */
function parseProm(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split('\n')) {
    if (line.trim() === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$/.exec(line);
    if (!m) throw new Error(`not a Prometheus sample line: ${line}`);
    const labels: Record<string, string> = {};
    const body = m[2] ?? '';
    let consumed = '';
    for (const l of body.matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?/g)) {
      labels[l[1]!] = l[2]!.replace(/\\(.)/g, (_, c: string) => (c === 'n' ? '\n' : c));
      consumed += l[0];
    }
    if (consumed !== body) throw new Error(`labels do not parse: ${line}`);
    out.push({ name: m[1]!, labels, value: parseValue(m[3]!) });
  }
  return out;
}

class Scrape {
  readonly samples: Sample[];
  constructor(readonly text: string) {
    this.samples = parseProm(text);
  }
  /** The value of the one sample with exactly these labels; 0 when there is none (a counter not yet moved). */
  get(name: string, labels: Record<string, string> = {}): number {
    const want = JSON.stringify(Object.entries(labels).sort());
    const found = this.samples.filter((s) => s.name === name && JSON.stringify(Object.entries(s.labels).sort()) === want);
    if (found.length > 1) throw new Error(`${name} ${want} appears ${found.length} times`);
    return found[0]?.value ?? 0;
  }
  has(name: string): boolean {
    return this.samples.some((s) => s.name === name);
  }
  all(name: string): Sample[] {
    return this.samples.filter((s) => s.name === name);
  }
}

async function scrape(ctx: TestContext): Promise<Scrape> {
  const res = await request(ctx.app).get('/metrics');
  if (res.status !== 200) throw new Error(`scrape: ${res.status} ${JSON.stringify(res.body)}`);
  return new Scrape(res.text);
}

/** What moved between two scrapes. */
const delta = (before: Scrape, after: Scrape) => (name: string, labels: Record<string, string> = {}) => after.get(name, labels) - before.get(name, labels);

const as = (token: string) => ({ 'X-API-Key': token });
const requests = (route: string, method: string, status: number) => ({ route, method, status: String(status) });

/** The same token with another secret and a correct checksum: well-formed, right selector, wrong secret. */
function wrongSecret(token: string): string {
  const body = token.slice(0, -6);
  const secret = body.slice(-32);
  const other = secret.startsWith('A') ? `B${secret.slice(1)}` : `A${secret.slice(1)}`;
  const changed = body.slice(0, -32) + other;
  return changed + checksum(changed);
}

/** A well-formed token of this server whose selector matches no row. */
function unknownToken(n: number): string {
  const body = `kw_live_${String(n).padStart(12, 'Z')}_${'q'.repeat(31)}${n % 10}`;
  return body + checksum(body);
}

const routeTemplates = new Set(listOperations(loadSpec()).map((op) => op.path));

describe('what /metrics counts', () => {
  test('requests by route template, method and status; a path that matches no route is the one label "unmatched"', async () => {
    const ctx = await fileApp();
    const user = await createUser(ctx);
    const { token } = await mintToken(ctx, user.id);
    const before = await scrape(ctx);

    expect((await request(ctx.app).get('/v1/me').set(as(token))).status).toBe(200);
    expect((await request(ctx.app).get('/v1/me').set(as(token))).status).toBe(200);
    expectError(await request(ctx.app).get('/v1/me'), 401, 'AUTHENTICATION_REQUIRED');
    expect((await request(ctx.app).get(`/admin/users/${user.id}`).set(admin)).status).toBe(200);
    expectError(await request(ctx.app).get('/admin/users/987654').set(admin), 404, 'NOT_FOUND');
    expect((await request(ctx.app).get(`/admin/users/email/${encodeURIComponent(user.email)}`).set(admin)).status).toBe(200);
    expect((await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ name: 'Renamed' })).status).toBe(200);
    expectError(await request(ctx.app).get(`/no/such/${token}`), 404, 'NOT_FOUND');
    expectError(await request(ctx.app).get('/another/missing/path'), 404, 'NOT_FOUND');
    expectError(await request(ctx.app).post(`/v1/${user.email}`), 404, 'NOT_FOUND');

    const after = await scrape(ctx);
    const d = delta(before, after);
    const count = 'keyward_http_requests_total';
    expect({
      meOk: d(count, requests('/v1/me', 'GET', 200)),
      meNoKey: d(count, requests('/v1/me', 'GET', 401)),
      userOk: d(count, requests('/admin/users/{id}', 'GET', 200)),
      userMissing: d(count, requests('/admin/users/{id}', 'GET', 404)),
      userPatched: d(count, requests('/admin/users/{id}', 'PATCH', 200)),
      byEmail: d(count, requests('/admin/users/email/{email}', 'GET', 200)),
      unmatchedGet: d(count, requests('unmatched', 'GET', 404)),
      unmatchedPost: d(count, requests('unmatched', 'POST', 404)),
    }).toEqual({ meOk: 2, meNoKey: 1, userOk: 1, userMissing: 1, userPatched: 1, byEmail: 1, unmatchedGet: 2, unmatchedPost: 1 });

    // Every route label is a template from the contract or "unmatched": never an id, an email or a token.
    const routes = new Set(after.all(count).map((s) => s.labels.route!));
    for (const route of routes) expect(route === 'unmatched' || routeTemplates.has(route)).toBe(true);
    expect(after.all(count).every((s) => Object.keys(s.labels).sort().join() === 'method,route,status')).toBe(true);
  });

  test('the duration histogram has one observation per counted request, by route template and method', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    const { token } = await mintToken(ctx, user.id);
    for (let i = 0; i < 3; i++) await request(ctx.app).get('/v1/me').set(as(token));
    await request(ctx.app).get('/v1/me').set(as(wrongSecret(token)));
    await request(ctx.app).get('/healthz');
    await request(ctx.app).get('/nowhere');
    await request(ctx.app).get('/metrics');

    const s = await scrape(ctx);
    const perRouteMethod = new Map<string, number>();
    for (const sample of s.all('keyward_http_requests_total')) {
      const key = `${sample.labels.route} ${sample.labels.method}`;
      perRouteMethod.set(key, (perRouteMethod.get(key) ?? 0) + sample.value);
    }
    expect(perRouteMethod.get('/v1/me GET')).toBe(4);
    expect(perRouteMethod.get('unmatched GET')).toBe(1);
    expect(perRouteMethod.size).toBeGreaterThanOrEqual(6);
    for (const [key, total] of perRouteMethod) {
      const [route, method] = key.split(' ') as [string, string];
      const labels = { route, method };
      expect({ key, count: s.get('keyward_http_request_duration_seconds_count', labels) }).toEqual({ key, count: total });
      expect({ key, inf: s.get('keyward_http_request_duration_seconds_bucket', { ...labels, le: '+Inf' }) }).toEqual({ key, inf: total });
      expect(s.get('keyward_http_request_duration_seconds_sum', labels)).toBeGreaterThan(0);
    }
    // Buckets are cumulative.
    const buckets = s
      .all('keyward_http_request_duration_seconds_bucket')
      .filter((b) => b.labels.route === '/v1/me' && b.labels.method === 'GET')
      .sort((a, b) => parseValue(a.labels.le!) - parseValue(b.labels.le!));
    for (let i = 1; i < buckets.length; i++) expect(buckets[i]!.value).toBeGreaterThanOrEqual(buckets[i - 1]!.value);
  });

  test('authentication outcomes: ok and each refusal code, per api (user, admin, sso)', async () => {
    const ctx = await app({ SSO_TRUSTED_PROXIES: '127.0.0.1, ::1' });
    const user = await createUser(ctx, { rate_limit_per_minute: 1000 });
    const readOnly = await mintToken(ctx, user.id, { scopes: ['tokens:read'] });
    const good = await mintToken(ctx, user.id);
    const revoked = await mintToken(ctx, user.id);
    const expiring = await mintToken(ctx, user.id, { expires_in: 60 });
    const walled = await mintToken(ctx, user.id, { allowed_ips: ['10.9.8.7'] });
    const limited = await createUser(ctx, { rate_limit_per_minute: 1 });
    const limitedKey = await mintToken(ctx, limited.id);
    const disabled = await createUser(ctx);
    const disabledKey = await mintToken(ctx, disabled.id);
    const ssoUser = await createUser(ctx, { email: 'person@example.com' });
    // Each key once, so every refusal below is about state, not a first-use race.
    for (const key of [readOnly, good, revoked, expiring, walled, limitedKey, disabledKey]) {
      await request(ctx.app).get('/v1/me').set(as(key.token));
    }
    expect((await request(ctx.app).delete(`/admin/tokens/${revoked.id}`).set(admin)).status).toBe(204);
    expect((await request(ctx.app).patch(`/admin/users/${disabled.id}`).set(admin).send({ disabled: true })).status).toBe(200);
    ctx.clock.advance(61);
    const before = await scrape(ctx);

    const v1 = (path: string, headers: Record<string, string> = {}) => request(ctx.app).get(path).set(headers);
    expect((await v1('/v1/me', as(good.token))).status).toBe(200);
    expect((await v1('/auth/verify', as(good.token))).status).toBe(200);
    expect((await v1('/v1/bots/987654', as(good.token))).status).toBe(404); // let in, then not found: ok
    expectError(await v1('/v1/me'), 401, 'AUTHENTICATION_REQUIRED');
    expectError(await v1('/v1/me', as(wrongSecret(good.token))), 401, 'INVALID_API_KEY');
    expectError(await v1('/auth/verify', as('not-a-key')), 401, 'INVALID_API_KEY');
    expectError(await v1('/v1/me', as(revoked.token)), 401, 'API_KEY_REVOKED');
    expectError(await v1('/v1/me', as(expiring.token)), 401, 'API_KEY_EXPIRED');
    expectError(await v1('/v1/me', as(walled.token)), 403, 'FORBIDDEN_IP');
    expectError(await v1('/v1/me', as(disabledKey.token)), 403, 'USER_DISABLED');
    expectError(await v1('/v1/bots', as(readOnly.token)), 403, 'INSUFFICIENT_SCOPE');
    expect((await v1('/v1/me', as(limitedKey.token))).status).toBe(429);
    expect((await v1(`/admin/users/${user.id}`, admin)).status).toBe(200);
    expect((await v1('/admin/users/987654', admin)).status).toBe(404); // let in, then not found: ok
    expectError(await v1('/admin/users'), 401, 'AUTHENTICATION_REQUIRED');
    expectError(await v1('/admin/users', { 'X-Admin-API-Key': `${ADMIN_KEY}x` }), 401, 'INVALID_ADMIN_KEY');
    expect((await v1('/sso/me', { 'X-Forwarded-Email': ssoUser.email })).status).toBe(200);
    expectError(await v1('/sso/me'), 401, 'AUTHENTICATION_REQUIRED');
    expectError(await request(ctx.app).post('/sso/tokens').set({ 'X-Forwarded-Email': ssoUser.email }).send({}), 403, 'CSRF_CHECK_FAILED');
    // Not an API with authentication: not counted here.
    await v1('/healthz');
    await v1('/nowhere/at/all');

    const d = delta(before, await scrape(ctx));
    const outcome = (api: string, o: string) => d('keyward_auth_outcomes_total', { api, outcome: o });
    expect({
      user: {
        ok: outcome('user', 'ok'),
        AUTHENTICATION_REQUIRED: outcome('user', 'AUTHENTICATION_REQUIRED'),
        INVALID_API_KEY: outcome('user', 'INVALID_API_KEY'),
        API_KEY_REVOKED: outcome('user', 'API_KEY_REVOKED'),
        API_KEY_EXPIRED: outcome('user', 'API_KEY_EXPIRED'),
        FORBIDDEN_IP: outcome('user', 'FORBIDDEN_IP'),
        USER_DISABLED: outcome('user', 'USER_DISABLED'),
        INSUFFICIENT_SCOPE: outcome('user', 'INSUFFICIENT_SCOPE'),
        RATE_LIMITED: outcome('user', 'RATE_LIMITED'),
      },
      admin: { ok: outcome('admin', 'ok'), AUTHENTICATION_REQUIRED: outcome('admin', 'AUTHENTICATION_REQUIRED'), INVALID_ADMIN_KEY: outcome('admin', 'INVALID_ADMIN_KEY') },
      sso: { ok: outcome('sso', 'ok'), AUTHENTICATION_REQUIRED: outcome('sso', 'AUTHENTICATION_REQUIRED'), CSRF_CHECK_FAILED: outcome('sso', 'CSRF_CHECK_FAILED') },
      other: d('keyward_auth_outcomes_total', { api: 'other', outcome: 'ok' }),
    }).toEqual({
      user: { ok: 3, AUTHENTICATION_REQUIRED: 1, INVALID_API_KEY: 2, API_KEY_REVOKED: 1, API_KEY_EXPIRED: 1, FORBIDDEN_IP: 1, USER_DISABLED: 1, INSUFFICIENT_SCOPE: 1, RATE_LIMITED: 1 },
      admin: { ok: 2, AUTHENTICATION_REQUIRED: 1, INVALID_ADMIN_KEY: 1 },
      sso: { ok: 1, AUTHENTICATION_REQUIRED: 1, CSRF_CHECK_FAILED: 1 },
      other: 0,
    });
    const apis = new Set((await scrape(ctx)).all('keyward_auth_outcomes_total').map((s) => s.labels.api));
    expect([...apis].sort()).toEqual(['admin', 'sso', 'user']);
  });

  test('a key\'s first use is a cache miss and one bcrypt check; its later uses are hits without bcrypt', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    const { token } = await mintToken(ctx, user.id);
    const names = ['keyward_verify_cache_hits_total', 'keyward_verify_cache_misses_total', 'keyward_bcrypt_checks_total'] as const;
    const step = async (send: () => Promise<unknown>) => {
      const before = await scrape(ctx);
      await send();
      const d = delta(before, await scrape(ctx));
      return { hits: d(names[0]), misses: d(names[1]), bcrypt: d(names[2]) };
    };
    const me = (key: string) => request(ctx.app).get('/v1/me').set(as(key));

    const initial = await scrape(ctx);
    for (const name of names) {
      expect(initial.text).toContain(`# TYPE ${name} counter`);
      expect(initial.get(name)).toBe(0);
    }
    expect(await step(() => me(token))).toEqual({ hits: 0, misses: 1, bcrypt: 1 });
    expect(await step(async () => {
      await me(token);
      await me(token);
      await me(token);
    })).toEqual({ hits: 3, misses: 0, bcrypt: 0 });
    // A wrong secret for a real selector costs one bcrypt; the very same wrong token again costs none.
    const wrong = wrongSecret(token);
    expect(await step(() => me(wrong))).toEqual({ hits: 0, misses: 1, bcrypt: 1 });
    expect(await step(() => me(wrong))).toEqual({ hits: 0, misses: 1, bcrypt: 0 });
    // Malformed keys never get as far as the cache or bcrypt.
    expect(await step(() => me('kw_live_garbage'))).toEqual({ hits: 0, misses: 0, bcrypt: 0 });
    // An unknown selector has no cache entry to miss, but costs the decoy bcrypt check a wrong secret
    // would (timing equalisation), once per distinct key.
    expect(await step(async () => {
      await me(unknownToken(1));
      await me(unknownToken(1));
    })).toEqual({ hits: 0, misses: 0, bcrypt: 1 });
    // The right key still comes from the cache.
    expect(await step(() => me(token))).toEqual({ hits: 1, misses: 0, bcrypt: 0 });
  });

  test('rate-limit rejections are counted per limit: user, auth_failures and admin', async () => {
    const ctx = await app({ AUTH_FAILURES_PER_MINUTE: '3' });
    const zero = await scrape(ctx);
    for (const limit of ['user', 'token', 'admin', 'auth_failures']) {
      expect(zero.samples.filter((s) => s.name === 'keyward_rate_limit_rejections_total' && s.labels.limit === limit)).toEqual([
        { name: 'keyward_rate_limit_rejections_total', labels: { limit }, value: 0 },
      ]);
    }

    const user = await createUser(ctx, { rate_limit_per_minute: 2 });
    const { token } = await mintToken(ctx, user.id);
    const statuses: number[] = [];
    for (let i = 0; i < 4; i++) statuses.push((await request(ctx.app).get('/v1/me').set(as(token))).status);
    expect(statuses).toEqual([200, 200, 429, 429]);

    // Three unknown keys are let through to be refused; from the fourth the address is refused outright.
    const wrong: number[] = [];
    for (let i = 0; i < 5; i++) wrong.push((await request(ctx.app).get('/v1/me').set(as(unknownToken(i)))).status);
    expect(wrong).toEqual([401, 401, 401, 429, 429]);
    // The same address with a wrong admin key is refused for the same reason.
    expectError(await request(ctx.app).get('/admin/users').set({ 'X-Admin-API-Key': 'not-the-admin-key-at-all-0123456789' }), 429, 'RATE_LIMITED');

    const s = await scrape(ctx);
    expect(s.get('keyward_rate_limit_rejections_total', { limit: 'user' })).toBe(2);
    expect(s.get('keyward_rate_limit_rejections_total', { limit: 'auth_failures' })).toBe(3);
    expect(s.get('keyward_rate_limit_rejections_total', { limit: 'admin' })).toBe(0);
    expect(s.get('keyward_http_requests_total', requests('/v1/me', 'GET', 429))).toBe(4);
    expect(s.get('keyward_http_requests_total', requests('/admin/users', 'GET', 429))).toBe(1);
    expect(s.get('keyward_auth_outcomes_total', { api: 'user', outcome: 'RATE_LIMITED' })).toBe(4);
    expect(s.get('keyward_auth_outcomes_total', { api: 'admin', outcome: 'RATE_LIMITED' })).toBe(1);

    const adminLimited = await app({ ADMIN_RATE_LIMIT_PER_MINUTE: '3' });
    const adminStatuses: number[] = [];
    for (let i = 0; i < 5; i++) adminStatuses.push((await request(adminLimited.app).get('/admin/users').set(admin)).status);
    expect(adminStatuses).toEqual([200, 200, 200, 429, 429]);
    const a = await scrape(adminLimited);
    expect(a.get('keyward_rate_limit_rejections_total', { limit: 'admin' })).toBe(2);
    expect(a.get('keyward_auth_outcomes_total', { api: 'admin', outcome: 'RATE_LIMITED' })).toBe(2);
  });

  test('keyward_rate_limit_store_up is 1 for memory, labelled with the store', async () => {
    const s = await scrape(await app());
    expect(s.samples.filter((x) => x.name === 'keyward_rate_limit_store_up')).toEqual([{ name: 'keyward_rate_limit_store_up', labels: { store: 'memory' }, value: 1 }]);
  });

  test('keyward_active_bots follows acquire, release and leases running out', async () => {
    const ctx = await app();
    const active = async () => (await scrape(ctx)).get('keyward_active_bots');
    const one = await createUser(ctx, { max_concurrent_bots: 5 });
    const two = await createUser(ctx, { max_concurrent_bots: 5 });
    const k1 = await mintToken(ctx, one.id);
    const k2 = await mintToken(ctx, two.id);
    expect(await active()).toBe(0);
    const a = await request(ctx.app).post('/v1/bots').set(as(k1.token)).send({ ttl_seconds: 600 });
    expect(a.status).toBe(201);
    expect(await active()).toBe(1);
    expect((await request(ctx.app).post('/v1/bots').set(as(k1.token)).send({ ttl_seconds: 60 })).status).toBe(201);
    expect((await request(ctx.app).post('/v1/bots').set(as(k2.token)).send({ ttl_seconds: 600 })).status).toBe(201);
    expect(await active()).toBe(3);
    expect((await request(ctx.app).delete(`/v1/bots/${a.body.id}`).set(as(k1.token))).status).toBe(204);
    expect(await active()).toBe(2);
    ctx.clock.advance(61); // the 60 s lease ran out, though no sweep has marked it yet
    expect(await active()).toBe(1);
    ctx.clock.advance(600);
    expect(await active()).toBe(0);
  });

  test('keyward_database_size_bytes is the size of a database file', async () => {
    const ctx = await fileApp();
    await createUser(ctx);
    const s = await scrape(ctx);
    expect(s.text).toContain('# TYPE keyward_database_size_bytes gauge');
    expect(s.get('keyward_database_size_bytes')).toBeGreaterThan(0);
  });

  test('the default Node.js process metrics are there', async () => {
    const s = await scrape(await app());
    for (const name of ['process_cpu_user_seconds_total', 'process_start_time_seconds', 'process_resident_memory_bytes', 'nodejs_heap_size_used_bytes', 'nodejs_eventloop_lag_seconds', 'nodejs_version_info']) {
      expect({ name, present: s.has(name) }).toEqual({ name, present: true });
    }
  });

  test('no token, secret, email or admin key reaches the scrape, wherever it was sent', async () => {
    const ctx = await app({ SSO_TRUSTED_PROXIES: '127.0.0.1, ::1' });
    const email = 'secret.person@example.com';
    const user = await createUser(ctx, { email, name: 'Secret Person' });
    const { token } = await mintToken(ctx, user.id);
    const secret = token.slice(-38, -6);
    const wrongAdmin = 'wrong-admin-key-ZYXWVUTSRQPONMLKJIHGFEDCBA';
    await request(ctx.app).get('/v1/me').set(as(token));
    await request(ctx.app).get(`/v1/me?api_key=${token}`);
    await request(ctx.app).get(`/v1/bots/${token}`).set(as(token));
    await request(ctx.app).get(`/${token}`);
    await request(ctx.app).get(`/v1/${secret}/${encodeURIComponent(email)}`);
    await request(ctx.app).get(`/admin/${ADMIN_KEY}`).set(admin);
    await request(ctx.app).get(`/admin/users/email/${encodeURIComponent(email)}`).set(admin);
    await request(ctx.app).get(`/admin/users/email/${encodeURIComponent(email)}`).set({ 'X-Admin-API-Key': wrongAdmin });
    await request(ctx.app).get('/sso/me').set({ 'X-Forwarded-Email': email });
    await request(ctx.app).get('/sso/me').set({ 'X-Forwarded-Email': 'nobody@example.org' });
    await request(ctx.app).get('/auth/verify').set({ Authorization: `Bearer ${token}` });

    const s = await scrape(ctx);
    for (const [what, value] of Object.entries({ token, secret, email, admin: ADMIN_KEY, wrongAdmin, other: 'nobody@example.org' })) {
      expect({ what, found: s.text.includes(value) }).toEqual({ what, found: false });
      expect({ what, found: s.text.includes(encodeURIComponent(value)) }).toEqual({ what, found: false });
    }
    const labelValues = s.samples.flatMap((x) => Object.values(x.labels));
    expect(labelValues.filter((v) => v.includes('@') || /[A-Za-z0-9]{20,}/.test(v))).toEqual([]);
  });

  test('is Prometheus text (text/plain; version=0.0.4) with HELP and TYPE for each keyward metric', async () => {
    const res = await request((await app()).app).get('/metrics');
    expect(res.status).toBe(200);
    expect(res.headers['content-type']).toMatch(PROM_TEXT);
    expect(res.headers['cache-control']).toBe('no-store');
    for (const [name, type] of [
      ['keyward_http_requests_total', 'counter'],
      ['keyward_http_request_duration_seconds', 'histogram'],
      ['keyward_auth_outcomes_total', 'counter'],
      ['keyward_rate_limit_rejections_total', 'counter'],
      ['keyward_rate_limit_store_up', 'gauge'],
      ['keyward_active_bots', 'gauge'],
      ['keyward_database_size_bytes', 'gauge'],
    ] as const) {
      expect(res.text).toMatch(new RegExp(`^# HELP ${name} \\S`, 'm'));
      expect(res.text).toContain(`# TYPE ${name} ${type}`);
    }
    expect(() => parseProm(res.text)).not.toThrow();
  });
});

describe('who may read /metrics', () => {
  test('by default, this machine (loopback) may, without a token', async () => {
    const res = await request((await app()).app).get('/metrics');
    expect(res.status).toBe(200);
  });

  test('an address outside METRICS_ALLOWED_IPS gets 403 FORBIDDEN_IP in the error envelope', async () => {
    const ctx = await app({ METRICS_ALLOWED_IPS: '10.0.0.0/8' });
    const error = expectError(await request(ctx.app).get('/metrics'), 403, 'FORBIDDEN_IP');
    expect(error.details).toEqual({ ip: expect.stringMatching(/^(::ffff:)?127\.0\.0\.1$|^::1$/) });
  });

  test('with METRICS_TOKEN set: 401 without it or with a wrong one, 200 with exactly it', async () => {
    const ctx = await app({ METRICS_TOKEN });
    const get = (authorization?: string) => {
      const req = request(ctx.app).get('/metrics');
      return authorization === undefined ? req : req.set('Authorization', authorization);
    };
    const refused = [
      undefined,
      '',
      'Bearer',
      'Bearer ',
      'Bearer wrong-token-0123456789abcdefghijklmnopqr',
      `Bearer ${METRICS_TOKEN.slice(0, -1)}`,
      `Bearer ${METRICS_TOKEN}x`,
      `Bearer x${METRICS_TOKEN}`,
      `Bearer ${METRICS_TOKEN.slice(1)}`,
      `Bearer ${METRICS_TOKEN.toUpperCase()}`,
      `Basic ${METRICS_TOKEN}`,
      METRICS_TOKEN,
      `Token ${METRICS_TOKEN}`,
    ];
    for (const authorization of refused) {
      const res = await get(authorization);
      expect({ authorization, status: res.status }).toEqual({ authorization, status: 401 });
      expectError(res, 401, 'AUTHENTICATION_REQUIRED');
      expect(res.headers['www-authenticate']).toMatch(/^Bearer /);
    }
    // Sent somewhere else, it does not count either.
    expect((await request(ctx.app).get('/metrics').set('X-API-Key', METRICS_TOKEN)).status).toBe(401);
    expect((await request(ctx.app).get(`/metrics?token=${METRICS_TOKEN}`)).status).toBe(401);

    const ok = await get(`Bearer ${METRICS_TOKEN}`);
    expect(ok.status).toBe(200);
    expect(ok.headers['content-type']).toMatch(PROM_TEXT);
    expect((await get(`bearer ${METRICS_TOKEN}`)).status).toBe(200);
  });

  test('with METRICS_TOKEN set the address must still be allowed; METRICS_ALLOWED_IPS=any lifts that', async () => {
    const walled = await app({ METRICS_TOKEN, METRICS_ALLOWED_IPS: '192.0.2.0/24' });
    expectError(await request(walled.app).get('/metrics').set('Authorization', `Bearer ${METRICS_TOKEN}`), 403, 'FORBIDDEN_IP');
    const open = await app({ METRICS_TOKEN, METRICS_ALLOWED_IPS: 'any' });
    expect((await request(open.app).get('/metrics').set('Authorization', `Bearer ${METRICS_TOKEN}`)).status).toBe(200);
    expectError(await request(open.app).get('/metrics'), 401, 'AUTHENTICATION_REQUIRED');
  });

  test('METRICS_ENABLED=off: /metrics does not exist (404 NOT_FOUND), even with the right token', async () => {
    const ctx = await app({ METRICS_ENABLED: 'off', METRICS_TOKEN });
    expectError(await request(ctx.app).get('/metrics'), 404, 'NOT_FOUND');
    expectError(await request(ctx.app).get('/metrics').set('Authorization', `Bearer ${METRICS_TOKEN}`), 404, 'NOT_FOUND');
  });

  test('METRICS_ALLOWED_IPS=any without METRICS_TOKEN refuses to start, naming both', () => {
    const base = { ADMIN_API_TOKEN: ADMIN_KEY, DATABASE_PATH: ':memory:' };
    let thrown: unknown;
    try {
      loadConfig({ ...base, METRICS_ALLOWED_IPS: 'any' });
    } catch (err) {
      thrown = err;
    }
    expect(thrown).toBeInstanceOf(ConfigError);
    const message = (thrown as ConfigError).message;
    expect(message).toContain('METRICS_ALLOWED_IPS');
    expect(message).toContain('METRICS_TOKEN');
    expect(() => loadConfig({ ...base, METRICS_ALLOWED_IPS: 'ANY', METRICS_TOKEN: '' })).toThrow(ConfigError);
    expect(() => loadConfig({ ...base, METRICS_ALLOWED_IPS: 'any', METRICS_TOKEN })).not.toThrow();
    // A short token is refused by name.
    expect(() => loadConfig({ ...base, METRICS_TOKEN: 'short' })).toThrow(/METRICS_TOKEN/);
    expect(() => loadConfig({ ...base, METRICS_ALLOWED_IPS: 'not-an-address' })).toThrow(/METRICS_ALLOWED_IPS/);
  });

  test('behind TRUST_PROXY=loopback, X-Forwarded-For decides the address; without it, the header is ignored', async () => {
    const proxied = await app({ TRUST_PROXY: 'loopback', METRICS_ALLOWED_IPS: '10.0.0.0/8' });
    expect((await request(proxied.app).get('/metrics').set('X-Forwarded-For', '10.1.2.3')).status).toBe(200);
    const outside = expectError(await request(proxied.app).get('/metrics').set('X-Forwarded-For', '192.0.2.44'), 403, 'FORBIDDEN_IP');
    expect(outside.details).toEqual({ ip: '192.0.2.44' });
    // The proxy itself (loopback) is not the client.
    expectError(await request(proxied.app).get('/metrics').set('X-Forwarded-For', '127.0.0.1, 192.0.2.44'), 403, 'FORBIDDEN_IP');

    // With the default allowlist (loopback), a client behind the proxy is not this machine.
    const defaults = await app({ TRUST_PROXY: 'loopback' });
    expectError(await request(defaults.app).get('/metrics').set('X-Forwarded-For', '203.0.113.9'), 403, 'FORBIDDEN_IP');
    expect((await request(defaults.app).get('/metrics')).status).toBe(200);

    const direct = await app({ METRICS_ALLOWED_IPS: '10.0.0.0/8' });
    expectError(await request(direct.app).get('/metrics').set('X-Forwarded-For', '10.1.2.3'), 403, 'FORBIDDEN_IP');
  });
});

describe('a real server process', () => {
  test('serves /metrics over HTTP with METRICS_TOKEN, counting what it served', async () => {
    const dir = makeTempDir('metrics');
    const adminKey = 'e2e-admin-key-0123456789abcdefghijklmnopqrstuvwxyz';
    const server = await startServer({
      env: { ADMIN_API_TOKEN: adminKey, DATABASE_PATH: join(dir, 'k.db'), BCRYPT_ROUNDS: '4', PORT: '0', HOST: '127.0.0.1', METRICS_TOKEN },
    });
    expect((await fetch(`${server.baseUrl}/healthz`)).status).toBe(200);
    const created = await fetch(`${server.baseUrl}/admin/users`, {
      method: 'POST',
      headers: { 'X-Admin-API-Key': adminKey, 'Content-Type': 'application/json' },
      body: JSON.stringify({ email: 'e2e@example.com' }),
    });
    expect(created.status).toBe(201);
    const { id } = (await created.json()) as { id: number };
    expect((await fetch(`${server.baseUrl}/admin/users/${id}`, { headers: { 'X-Admin-API-Key': adminKey } })).status).toBe(200);

    expect((await fetch(`${server.baseUrl}/metrics`)).status).toBe(401);
    const res = await fetch(`${server.baseUrl}/metrics`, { headers: { Authorization: `Bearer ${METRICS_TOKEN}` } });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(PROM_TEXT);
    const s = new Scrape(await res.text());
    expect(s.get('keyward_http_requests_total', requests('/healthz', 'GET', 200))).toBe(1);
    expect(s.get('keyward_http_requests_total', requests('/admin/users', 'POST', 201))).toBe(1);
    expect(s.get('keyward_http_requests_total', requests('/admin/users/{id}', 'GET', 200))).toBe(1);
    expect(s.get('keyward_http_requests_total', requests('/metrics', 'GET', 401))).toBe(1);
    expect(s.get('keyward_auth_outcomes_total', { api: 'admin', outcome: 'ok' })).toBe(2);
    expect(s.get('keyward_database_size_bytes')).toBeGreaterThan(0);
    expect(s.get('process_start_time_seconds')).toBeGreaterThan(0);
    for (const secret of [adminKey, METRICS_TOKEN, 'e2e@example.com']) expect(s.text.includes(secret)).toBe(false);
    expect(await server.stop()).toEqual({ code: 0, signal: null });
  });

  test('on a dual-stack socket (HOST=::), an IPv4 client is judged and named by its IPv4 address', async () => {
    const dir = makeTempDir('metrics');
    const env = { ADMIN_API_TOKEN: ADMIN_KEY, DATABASE_PATH: join(dir, 'k.db'), BCRYPT_ROUNDS: '4', PORT: '0', HOST: '::' };
    // The default allowlist (127.0.0.0/8, ::1) must cover 127.0.0.1 arriving as ::ffff:127.0.0.1.
    const loopback = await startServer({ env });
    expect((await fetch(`http://127.0.0.1:${loopback.port}/metrics`)).status).toBe(200);
    await loopback.stop();
    // Refused, the address is shown as elsewhere in keyward (details.ip of a key's FORBIDDEN_IP): 127.0.0.1.
    const walled = await startServer({ env: { ...env, DATABASE_PATH: join(dir, 'k2.db'), METRICS_ALLOWED_IPS: '10.0.0.0/8' } });
    const res = await fetch(`http://127.0.0.1:${walled.port}/metrics`);
    expect(res.status).toBe(403);
    expect(((await res.json()) as { error: { details: unknown } }).error.details).toEqual({ ip: '127.0.0.1' });
    await walled.stop();
  });
});
