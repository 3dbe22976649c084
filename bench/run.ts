/**
 * npm run bench [-- --quick]
 *
 * Starts the built keyward server (production mode, fresh databases), a bare Express baseline and a
 * raw node:http reference, and drives them with autocannon on 127.0.0.1, alternating rounds so drift on
 * a shared machine hits all alike. Every figure is reported as a ratio to the baseline measured in the
 * same run, with the server's CPU time per request (steadier here than throughput).
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import autocannon from 'autocannon';
import bcrypt from 'bcrypt';
import SqliteDatabase from 'better-sqlite3';
import type { Response } from 'express';
import { Kysely, SqliteDialect } from 'kysely';
import type { Database } from '../db/schema';
import { systemClock } from '../src/clock';
import { createLogger } from '../src/logger';
import { Metrics } from '../src/metrics/metrics';
import { RateLimits } from '../src/rate-limit/rate-limits';
import { UsageRecorder } from '../src/usage/usage';
import { checksum, randomBase62 } from '../src/tokens/token-format';
import { children, startProcess } from './processes';

const ROOT = join(__dirname, '..', '..');
const QUICK = process.argv.includes('--quick');
const P = QUICK
  ? { duration: 2, rounds: 1, many: 200, bigUsers: 10_000, bigTokens: 100_000, memoryTokens: 5_000, coldBursts: 2 }
  : { duration: 8, rounds: 3, many: 1_000, bigUsers: 100_000, bigTokens: 1_000_000, memoryTokens: 100_000, coldBursts: 8 };
const CONNECTIONS = 50;
const ADMIN_KEY = randomBytes(32).toString('hex');

interface Load {
  rps: number;
  p50: number;
  p99: number;
  max: number;
  /** Requests answered, for CPU time per request. */
  total: number;
  /** The server's CPU time (user + system) per request, µs; NaN where not measured. */
  cpuUs: number;
  errors: number;
  non2xx: number;
  statuses: Record<string, number>;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;
const log = (msg: string) => process.stderr.write(`bench: ${msg}\n`);

/** User + system CPU time of a process so far, in seconds (Linux clock ticks are 1/100 s). */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** Runs a load and adds the CPU time the given server processes spent per request answered. */
async function measured(pids: number[], run: () => Promise<Load>): Promise<Load> {
  const before = pids.map(cpuSeconds);
  const result = await run();
  const spent = pids.reduce((sum, pid, i) => sum + cpuSeconds(pid) - before[i]!, 0);
  return { ...result, cpuUs: result.total > 0 ? (spent * 1e6) / result.total : NaN };
}

function peakRssMb(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

type Request = { method?: string; path?: string; headers?: Record<string, string>; body?: string };

/** A runner's whole cycle per connection, over and over: acquire a slot, then release it. */
async function botPairs(base: string, token: string, connections: number): Promise<Load> {
  const result = await autocannon({
    url: base,
    connections,
    duration: P.duration,
    requests: [
      {
        method: 'POST',
        path: '/v1/bots',
        headers: { 'x-api-key': token, 'content-type': 'application/json' },
        body: JSON.stringify({ ttl_seconds: 60 }),
        onResponse: (status: number, body: string, context: Record<string, unknown>) => {
          context.botId = status === 201 ? (JSON.parse(body) as { id: number }).id : undefined;
        },
      },
      {
        method: 'DELETE',
        headers: { 'x-api-key': token },
        setupRequest: (req: Request, context: Record<string, unknown>) => ({ ...req, path: `/v1/bots/${String(context.botId ?? 0)}` }),
      },
    ],
  } as unknown as autocannon.Options);
  const statuses: Record<string, number> = {};
  for (const k of ['1xx', '2xx', '3xx', '4xx', '5xx'] as const) if (result[k]) statuses[k] = result[k];
  return loadOf(result, statuses);
}

function loadOf(result: autocannon.Result, statuses: Record<string, number>): Load {
  return {
    rps: result.requests.average,
    p50: result.latency.p50,
    p99: result.latency.p99,
    max: result.latency.max,
    total: result.requests.total,
    cpuUs: NaN,
    errors: result.errors + result.timeouts,
    non2xx: result.non2xx,
    statuses,
  };
}

/** The per-user rate limiter on its own: its cost per request, measured in this process. */
async function limiterMicros(): Promise<number> {
  const limits = new RateLimits({ authFailuresPerMinute: 20, adminRateLimitPerMinute: 1200 });
  const res = { setHeader: () => undefined } as unknown as Response;
  const n = 200_000;
  for (let i = 0; i < 20_000; i++) await limits.userRequest(i % 100, Number.MAX_SAFE_INTEGER, res);
  const start = process.hrtime.bigint();
  for (let i = 0; i < n; i++) await limits.userRequest(i % 100, Number.MAX_SAFE_INTEGER, res);
  return Number(process.hrtime.bigint() - start) / n / 1000;
}

/** What issue 7 added to every request, measured alone in this process: the metrics update and the usage count. */
async function observabilityMicros(): Promise<number> {
  const db = new Kysely<Database>({ dialect: new SqliteDialect({ database: new SqliteDatabase(':memory:') }) });
  const limits = new RateLimits({ authFailuresPerMinute: 20, adminRateLimitPerMinute: 1200 });
  const metrics = new Metrics({ db, databasePath: ':memory:', verifier: { bcryptChecks: 0, cacheHits: 0, cacheMisses: 0 }, limits, activeBots: async () => 0 });
  const usage = new UsageRecorder({ db, clock: systemClock, logger: createLogger('silent') });
  const outcome = { route: '/v1/me', method: 'GET', status: 200, seconds: 0.002, errorCode: null, ip: '127.0.0.1' };
  const n = 200_000;
  const run = () => {
    for (let i = 0; i < n; i++) {
      metrics.observe(outcome);
      usage.request(1, (i % 100) + 1);
    }
  };
  run();
  const start = process.hrtime.bigint();
  run();
  const micros = Number(process.hrtime.bigint() - start) / n / 1000;
  await db.destroy();
  return micros;
}

async function load(url: string, opts: { headers?: Record<string, string>; rotate?: string[]; method?: string; body?: string; connections?: number; duration?: number; amount?: number }): Promise<Load> {
  let i = 0;
  const rotate = opts.rotate;
  const result = await autocannon({
    url,
    connections: opts.connections ?? CONNECTIONS,
    ...(opts.amount ? { amount: opts.amount } : { duration: opts.duration ?? P.duration }),
    method: (opts.method ?? 'GET') as 'GET',
    headers: opts.headers,
    body: opts.body,
    requests: rotate
      ? [{ setupRequest: (req: Request) => ({ ...req, headers: { ...req.headers, 'x-api-key': rotate[i++ % rotate.length]! } }) }]
      : undefined,
  } as autocannon.Options);
  const statuses: Record<string, number> = {};
  for (const k of ['1xx', '2xx', '3xx', '4xx', '5xx'] as const) if (result[k]) statuses[k] = result[k];
  return loadOf(result, statuses);
}

/** Two loads run at once (one per instance) as one: throughput adds up, latencies are the worse of the two. */
function combined(a: Load, b: Load): Load {
  return {
    rps: a.rps + b.rps,
    p50: Math.max(a.p50, b.p50),
    p99: Math.max(a.p99, b.p99),
    max: Math.max(a.max, b.max),
    total: a.total + b.total,
    cpuUs: NaN,
    errors: a.errors + b.errors,
    non2xx: a.non2xx + b.non2xx,
    statuses: {},
  };
}

/** PostgreSQL for the two-instance rows, if one answers (KEYWARD_BENCH_POSTGRES_URL, default the local one). */
const PG_URL = process.env.KEYWARD_BENCH_POSTGRES_URL ?? 'postgres://postgres@127.0.0.1:5432/test';

async function postgresSchema(): Promise<{ url: string; drop: () => Promise<void> } | null> {
  const { Client } = await import('pg');
  const client = new Client({ connectionString: PG_URL, connectionTimeoutMillis: 3000 });
  try {
    await client.connect();
  } catch {
    return null;
  }
  const schema = `kw_bench_${randomBytes(5).toString('hex')}`;
  await client.query(`create schema ${schema}`);
  return {
    url: `${PG_URL}?options=-c%20search_path%3D${schema}`,
    drop: async () => {
      await client.query(`drop schema ${schema} cascade`);
      await client.end();
    },
  };
}

/** Redis for the shared rate-limit rows, if one answers (KEYWARD_BENCH_REDIS_URL, default the local one). */
const REDIS_URL = process.env.KEYWARD_BENCH_REDIS_URL ?? 'redis://127.0.0.1:6379';

async function redisAnswers(): Promise<boolean> {
  const { Redis } = await import('ioredis');
  const client = new Redis(REDIS_URL, { lazyConnect: true, connectTimeout: 2000, maxRetriesPerRequest: 0, retryStrategy: () => null });
  client.on('error', () => undefined);
  try {
    await client.connect();
    return (await client.ping()) === 'PONG';
  } catch {
    return false;
  } finally {
    client.disconnect();
  }
}

function tokenFor(selector: string, secret: string): string {
  const body = `kw_live_${selector}_${secret}`;
  return body + checksum(body);
}

/** Direct SQL, one transaction: the API would spend hours in bcrypt for a million tokens. */
function seed(dbPath: string, users: number, tokensPerUser: number, userOffset: number, secretHash: string, keepSelectors: number): string[] {
  const db = new SqliteDatabase(dbPath);
  db.pragma('busy_timeout = 10000');
  const now = new Date().toISOString();
  const insertUser = db.prepare(
    'insert into users (email, email_lower, name, max_concurrent_bots, rate_limit_per_minute, data, disabled_at, deleted_at, created_at, updated_at) values (?, ?, null, 3, 1000000, null, null, null, ?, ?) returning id',
  );
  const insertToken = db.prepare(
    "insert into tokens (user_id, name, selector, secret_hash, last4, environment, scopes, created_at, expires_at, revoked_at) values (?, null, ?, ?, ?, 'live', 'bots:read bots:write', ?, null, null)",
  );
  const kept: string[] = [];
  db.transaction(() => {
    for (let u = 0; u < users; u++) {
      const email = `seed${userOffset + u}@bench.example`;
      const { id } = insertUser.get(email, email, now, now) as { id: number };
      for (let t = 0; t < tokensPerUser; t++) {
        const selector = randomBase62(12);
        if (kept.length < keepSelectors) kept.push(selector);
        insertToken.run(id, selector, secretHash, selector.slice(-4), now);
      }
    }
  })();
  db.close();
  return kept;
}

/**
 * Seeding blocks this process's event loop for seconds, during which the servers close idle
 * keep-alive sockets; let the HTTP client see those closes before it sends anything again.
 */
const settle = () => new Promise((resolve) => setTimeout(resolve, 250));

async function api(base: string, method: string, path: string, body?: unknown) {
  const res = await fetch(base + path, {
    method,
    headers: { 'X-Admin-API-Key': ADMIN_KEY, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${await res.text()}`);
  return res.json() as Promise<Record<string, unknown>>;
}

async function warm(base: string, tokens: string[], concurrency = 8): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < tokens.length) {
        const token = tokens[next++]!;
        const res = await fetch(`${base}/v1/me`, { headers: { 'X-API-Key': token } });
        if (res.status !== 200) throw new Error(`warming a token: ${res.status} ${await res.text()}`);
      }
    }),
  );
}

async function timedFirstRequest(base: string, token: string): Promise<number> {
  const start = process.hrtime.bigint();
  const res = await fetch(`${base}/v1/me`, { headers: { 'X-API-Key': token } });
  await res.arrayBuffer();
  if (res.status !== 200) throw new Error(`cold token: ${res.status}`);
  return Number(process.hrtime.bigint() - start) / 1e6;
}

async function main(): Promise<void> {
  if (!existsSync(join(ROOT, 'dist', 'src', 'server.js'))) throw new Error('dist/src/server.js is missing: run `npm run build`');
  const dir = mkdtempSync(join(tmpdir(), 'keyward-bench-'));
  const started = Date.now();
  log(`${QUICK ? 'quick' : 'full'} run in ${dir}`);

  // As `npm start` and the image run it: with package.json's config.node_flags.
  const nodeFlags = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { config: { node_flags: string } }).config.node_flags.split(' ').filter((f) => f !== '');
  const serverArgs = [...nodeFlags, join(ROOT, 'dist', 'src', 'server.js')];
  // The bench sends a flood of wrong keys from one address to measure how cheaply they are refused; the
  // per-address limit would turn all but the first 20 a minute into 429s (and then refuse the cold
  // tokens that follow), so it is lifted here. The refusal measured is the one an attacker spreading
  // over many addresses gets.
  const env = (db: string) => ({ ADMIN_API_TOKEN: ADMIN_KEY, DATABASE_PATH: join(dir, db), LOG_LEVEL: 'info', AUTH_FAILURES_PER_MINUTE: '10000000' });
  const baseline = await startProcess('baseline', [join(ROOT, 'bench', 'baseline-server.js')], {}, dir, '/v1/me');
  const raw = await startProcess('raw', [join(ROOT, 'bench', 'raw-server.js')], {}, dir, '/v1/me');
  const small = await startProcess('keyward-small', serverArgs, env('small.db'), dir, '/readyz');
  const large = await startProcess('keyward-large', serverArgs, env('large.db'), dir, '/readyz');

  // Small database: one user, a warm token minted through the API (real bcrypt cost), plus seeded ones.
  // Rate limits and bot slots high enough that the load itself is never refused.
  const user = await api(small.base, 'POST', '/admin/users', { email: 'bench@example.com', name: 'Bench', rate_limit_per_minute: 1_000_000, max_concurrent_bots: 1000 });
  const warmToken = (await api(small.base, 'POST', `/admin/users/${user.id}/tokens`)).token as string;
  await warm(small.base, [warmToken]);
  // The allowlist's cost: the caller's address is the last of ten entries, so every entry is checked.
  const allowedIps = [...Array.from({ length: 9 }, (_, i) => `10.${i}.0.0/16`), '127.0.0.1'];
  const allowlistToken = (await api(small.base, 'POST', `/admin/users/${user.id}/tokens`, { allowed_ips: allowedIps })).token as string;
  await warm(small.base, [allowlistToken]);
  // A revoked key the server has verified before: refused after the lookup, without bcrypt.
  const revoked = await api(small.base, 'POST', `/admin/users/${user.id}/tokens`);
  const revokedToken = revoked.token as string;
  await warm(small.base, [revokedToken]);
  await fetch(`${small.base}/admin/tokens/${String(revoked.id)}`, { method: 'DELETE', headers: { 'X-Admin-API-Key': ADMIN_KEY } });
  const sharedSecret = randomBase62(32);
  log('hashing the shared seed secrets');
  const cheapHash = await bcrypt.hash(sharedSecret, 4);
  const realHash = await bcrypt.hash(sharedSecret, 10);
  const manySelectors = seed(join(dir, 'small.db'), 1, P.many, 0, cheapHash, P.many);
  const many = manySelectors.map((s) => tokenFor(s, sharedSecret));
  const coldCount = 20 * P.coldBursts + 20;
  const cold = seed(join(dir, 'small.db'), 1, coldCount, 1, realHash, coldCount).map((s) => tokenFor(s, sharedSecret));
  await settle();
  log(`warming ${many.length} distinct tokens`);
  await warm(small.base, many);

  log(`seeding ${P.bigUsers} users and ${P.bigTokens} tokens into the large database`);
  const seedStart = Date.now();
  const bigSelectors = seed(join(dir, 'large.db'), P.bigUsers, P.bigTokens / P.bigUsers, 0, cheapHash, P.memoryTokens);
  log(`seeded in ${((Date.now() - seedStart) / 1000).toFixed(1)} s`);
  const bigTokens = bigSelectors.map((s) => tokenFor(s, sharedSecret));
  await settle();
  await warm(large.base, [bigTokens[0]!]);

  const badChecksum = warmToken.slice(0, -1) + (warmToken.endsWith('a') ? 'b' : 'a');
  const unknownSelector = tokenFor(randomBase62(12), randomBase62(32));

  const onSmall = (run: () => Promise<Load>) => () => measured([small.pid], run);
  const scenarios: Array<{ key: string; run: () => Promise<Load> }> = [
    { key: 'baseline', run: () => measured([baseline.pid], () => load(`${baseline.base}/v1/me`, {})) },
    { key: 'raw', run: () => measured([raw.pid], () => load(`${raw.base}/v1/me`, {})) },
    { key: 'warm', run: onSmall(() => load(`${small.base}/v1/me`, { headers: { 'x-api-key': warmToken } })) },
    // Right after the warm /v1/me it is compared with, so the two see the same machine.
    { key: 'forwardAuth', run: onSmall(() => load(`${small.base}/auth/verify?scope=bots:read`, { headers: { 'x-api-key': warmToken } })) },
    { key: 'many', run: onSmall(() => load(`${small.base}/v1/me`, { rotate: many })) },
    { key: 'allowlist', run: onSmall(() => load(`${small.base}/v1/me`, { headers: { 'x-api-key': allowlistToken } })) },
    { key: 'badChecksum', run: onSmall(() => load(`${small.base}/v1/me`, { headers: { 'x-api-key': badChecksum } })) },
    { key: 'unknownSelector', run: onSmall(() => load(`${small.base}/v1/me`, { headers: { 'x-api-key': unknownSelector } })) },
    { key: 'revoked', run: onSmall(() => load(`${small.base}/v1/me`, { headers: { 'x-api-key': revokedToken } })) },
    { key: 'missingScope', run: onSmall(() => load(`${small.base}/auth/verify?scope=tokens:write`, { headers: { 'x-api-key': warmToken } })) },
    { key: 'large', run: () => measured([large.pid], () => load(`${large.base}/v1/me`, { headers: { 'x-api-key': bigTokens[0]! } })) },
    { key: 'botPair', run: onSmall(() => botPairs(small.base, warmToken, 10)) },
  ];
  // PostgreSQL: two instances on one database, each driven at once by half the connections.
  const pg = await postgresSchema();
  let pgWarmToken = '';
  let pgInstances: Array<{ base: string; pid: number }> = [];
  /** Two instances on the PostgreSQL database per RATE_LIMIT_STORE (memory: pgInstances). */
  const byStore: Record<string, Array<{ base: string; pid: number }>> = {};
  if (pg) {
    log('starting two instances on PostgreSQL');
    const pgEnv = { ADMIN_API_TOKEN: ADMIN_KEY, DATABASE_URL: pg.url, LOG_LEVEL: 'info', AUTH_FAILURES_PER_MINUTE: '10000000' };
    pgInstances = [await startProcess('keyward-pg-1', serverArgs, pgEnv, dir, '/readyz'), await startProcess('keyward-pg-2', serverArgs, pgEnv, dir, '/readyz')];
    const pgUser = await api(pgInstances[0]!.base, 'POST', '/admin/users', { email: 'bench@example.com', rate_limit_per_minute: 1_000_000, max_concurrent_bots: 1000 });
    pgWarmToken = (await api(pgInstances[0]!.base, 'POST', `/admin/users/${pgUser.id}/tokens`)).token as string;
    for (const instance of pgInstances) await warm(instance.base, [pgWarmToken]);
    byStore.memory = pgInstances;
    // The same database with the rate limits shared: in it, and in Redis if one answers.
    const stores = ['postgres', ...((await redisAnswers()) ? ['redis'] : [])];
    if (!stores.includes('redis')) log(`no Redis at ${REDIS_URL}: the Redis rows are left out`);
    for (const store of stores) {
      log(`starting two instances with RATE_LIMIT_STORE=${store}`);
      const env = { ...pgEnv, RATE_LIMIT_STORE: store, REDIS_URL, RATE_LIMIT_STORE_PREFIX: `bench-${randomBytes(4).toString('hex')}` };
      byStore[store] = [await startProcess(`keyward-${store}-1`, serverArgs, env, dir, '/readyz'), await startProcess(`keyward-${store}-2`, serverArgs, env, dir, '/readyz')];
      for (const instance of byStore[store]!) await warm(instance.base, [pgWarmToken]);
    }
  } else {
    log(`no PostgreSQL at ${PG_URL}: the PostgreSQL rows are left out`);
  }
  if (pg) {
    scenarios.push(
      {
        key: 'pgWarm',
        run: async () => {
          // CPU per request: both instances' time over both instances' requests.
          return measured(pgInstances.map((i) => i.pid), async () => {
            const [a, b] = await Promise.all(pgInstances.map((i) => load(`${i.base}/v1/me`, { headers: { 'x-api-key': pgWarmToken }, connections: CONNECTIONS / 2 })));
            return combined(a!, b!);
          });
        },
      },
      {
        key: 'pgBotPair',
        run: async () => {
          const [a, b] = await Promise.all(pgInstances.map((i) => botPairs(i.base, pgWarmToken, 5)));
          return combined(a!, b!);
        },
      },
    );
  }

  // A warm GET /v1/me per rate-limit store: one instance alone, then two at once (memory's two is pgWarm).
  const warmOn = (instances: Array<{ base: string; pid: number }>) =>
    measured(instances.map((i) => i.pid), async () => {
      const loads = await Promise.all(instances.map((i) => load(`${i.base}/v1/me`, { headers: { 'x-api-key': pgWarmToken }, connections: CONNECTIONS / instances.length })));
      return loads.length === 1 ? loads[0]! : combined(loads[0]!, loads[1]!);
    });
  for (const [store, instances] of Object.entries(byStore)) {
    scenarios.push({ key: `store-${store}-1`, run: () => warmOn(instances.slice(0, 1)) });
    if (store !== 'memory') scenarios.push({ key: `store-${store}-2`, run: () => warmOn(instances) });
  }

  const samples: Record<string, Load[]> = {};
  for (let round = 1; round <= P.rounds; round++) {
    for (const s of scenarios) {
      log(`round ${round}/${P.rounds}: ${s.key}`);
      (samples[s.key] ??= []).push(await s.run());
    }
  }

  // Cold verification: what a token's first request costs, then warm traffic while cold ones arrive.
  log('cold verification');
  const coldLatencies: number[] = [];
  for (const token of cold.slice(0, 20)) coldLatencies.push(await timedFirstRequest(small.base, token));
  const warmLatencies: number[] = [];
  for (let i = 0; i < 20; i++) warmLatencies.push(await timedFirstRequest(small.base, warmToken));
  let burstTokens = cold.slice(20);
  const bursts: Promise<unknown>[] = [];
  const burstTimer = setInterval(() => {
    const batch = burstTokens.slice(0, 20);
    burstTokens = burstTokens.slice(20);
    if (batch.length === 20) bursts.push(Promise.all(batch.map((t) => timedFirstRequest(small.base, t))));
  }, (P.duration * 1000) / (P.coldBursts + 1));
  const warmDuringCold = await load(`${small.base}/v1/me`, { headers: { 'x-api-key': warmToken } });
  clearInterval(burstTimer);
  await Promise.all(bursts);

  // Minting: its own throughput, then warm traffic's p99 while it runs.
  log('minting');
  const mintPath = `/admin/users/${user.id}/tokens`;
  const mintHeaders = { 'x-admin-api-key': ADMIN_KEY };
  const mint = await load(`${small.base}${mintPath}`, { method: 'POST', headers: mintHeaders, connections: 8 });
  const [warmDuringMint] = await Promise.all([
    load(`${small.base}/v1/me`, { headers: { 'x-api-key': warmToken } }),
    load(`${small.base}${mintPath}`, { method: 'POST', headers: mintHeaders, connections: 4 }),
  ]);

  const limiterUs = await limiterMicros();
  const observabilityUs = await observabilityMicros();

  // Memory: verify many distinct tokens on the large database, then read each server's peak RSS.
  log(`verifying ${bigTokens.length} distinct tokens on the large database`);
  const memoryRun = await load(`${large.base}/v1/me`, { rotate: bigTokens, amount: bigTokens.length, connections: 16 });

  const summary = (key: string) => {
    const xs = samples[key]!;
    return {
      rps: median(xs.map((x) => x.rps)),
      p50: median(xs.map((x) => x.p50)),
      p99: median(xs.map((x) => x.p99)),
      max: Math.max(...xs.map((x) => x.max)),
      cpuUs: median(xs.map((x) => x.cpuUs)),
      non2xx: xs.reduce((a, x) => a + x.non2xx, 0),
      errors: xs.reduce((a, x) => a + x.errors, 0),
    };
  };
  const base = summary('baseline');
  const rawS = summary('raw');
  const ratio = (a: number, b: number) => (Number.isFinite(a) && Number.isFinite(b) && b > 0 ? a / b : NaN);
  const fmt = (x: number | null, digits = 0) => (x === null || !Number.isFinite(x) ? '–' : x.toLocaleString('en', { maximumFractionDigits: digits, minimumFractionDigits: digits }));
  type Row = { scenario: string; rps: number | null; p50: number | null; p99: number | null; max: number | null; cpuUs: number | null; note: string };
  const rows: Row[] = [];
  const add = (scenario: string, l: { rps: number; p50: number; p99: number; max?: number; cpuUs?: number } | null, note = '') =>
    rows.push({ scenario, rps: l?.rps ?? null, p50: l?.p50 ?? null, p99: l?.p99 ?? null, max: l?.max ?? null, cpuUs: l?.cpuUs ?? null, note });
  add('baseline: bare Express 5, one route, res.json', base);
  add('reference: raw node:http, the same body', rawS, 'the ceiling on this machine');
  const warmS = summary('warm');
  add('GET /v1/me, warm token', warmS);
  const forwardS = summary('forwardAuth');
  add('GET /auth/verify?scope=bots:read (forward auth), warm token', forwardS);
  add(`GET /v1/me, ${P.many.toLocaleString('en')} distinct warm tokens`, summary('many'));
  add('GET /v1/me, warm token with a 10-entry IP allowlist', summary('allowlist'));
  const refusals = (['badChecksum', 'unknownSelector', 'revoked', 'missingScope'] as const).map((k) => [k, summary(k)] as const);
  add('bad checksum (401)', summary('badChecksum'));
  add('unknown selector (401)', summary('unknownSelector'));
  add('revoked key, verified before (401)', summary('revoked'));
  add('forward auth, scope the key lacks (403)', summary('missingScope'));
  add('cold verification: first request, one at a time', { rps: NaN, p50: median(coldLatencies), p99: Math.max(...coldLatencies) }, `warm request one at a time: ${median(warmLatencies).toFixed(2)} ms`);
  add(`GET /v1/me, warm, while bursts of 20 cold tokens arrive`, warmDuringCold, `${P.coldBursts} bursts`);
  add('POST /admin/users/{id}/tokens (mint), 8 connections', mint);
  add('GET /v1/me, warm, while minting (4 connections)', warmDuringMint);
  const botS = summary('botPair');
  add('acquire + release a bot (POST, then DELETE /v1/bots/{id}), 10 connections', botS, `${fmt(botS.rps / 2)} pairs/s; each acquisition is a durable write transaction`);
  if (samples.pgWarm) {
    add('PostgreSQL, 2 instances: GET /v1/me, warm token (25 connections each)', summary('pgWarm'), 'both instances on one database, driven at once; throughput added');
    const pgBots = summary('pgBotPair');
    add('PostgreSQL, 2 instances: acquire + release a bot (5 connections each)', pgBots, `${fmt(pgBots.rps / 2)} pairs/s; each admission locks the user's row`);
    // What counting the rate limits in a shared store costs, against counting them in memory.
    const memoryOne = summary('store-memory-1');
    const memoryTwo = summary('pgWarm');
    add('PostgreSQL, RATE_LIMIT_STORE=memory, 1 instance: GET /v1/me, warm token', memoryOne, 'each instance counts its own limits');
    for (const store of Object.keys(byStore).filter((k) => k !== 'memory')) {
      const one = summary(`store-${store}-1`);
      const two = summary(`store-${store}-2`);
      const cost = (l: typeof one, m: typeof one) => `${fmt(ratio(l.rps, m.rps), 2)}× memory's throughput, ${fmt(l.cpuUs - m.cpuUs)} µs more keyward CPU per request`;
      add(`PostgreSQL, RATE_LIMIT_STORE=${store}, 1 instance: GET /v1/me, warm token`, one, `${cost(one, memoryOne)}; a round trip to ${store} per request`);
      add(`PostgreSQL, RATE_LIMIT_STORE=${store}, 2 instances: GET /v1/me, warm token (25 connections each)`, two, `${cost(two, memoryTwo)} (2 instances); limits exact across both`);
    }
  }
  const warmMicros = warmS.cpuUs;
  add('per-user rate limiter alone, per request (in-process)', null, `${limiterUs.toFixed(2)} µs, ${((100 * limiterUs) / warmMicros).toFixed(1)}% of a warm GET /v1/me (${warmMicros.toFixed(0)} µs of server CPU)`);
  add('metrics and usage counting alone, per request (in-process)', null, `${observabilityUs.toFixed(2)} µs, ${((100 * observabilityUs) / warmMicros).toFixed(1)}% of a warm GET /v1/me; the servers above run with both on, and with request logs`);
  const largeS = summary('large');
  add(`large database: ${P.bigUsers.toLocaleString('en')} users, ${P.bigTokens.toLocaleString('en')} tokens, warm GET /v1/me`, largeS);
  add(`${bigTokens.length.toLocaleString('en')} distinct tokens verified once each (bcrypt cost 4), 16 connections`, memoryRun);

  const rssSmall = peakRssMb(small.pid);
  const rssLarge = peakRssMb(large.pid);

  const slowestRefusal = Math.min(...refusals.map(([, r]) => r.rps));
  const targets = [
    { what: 'warm GET /v1/me throughput ≥ 2× bare Express (floor 1.5×)', value: ratio(warmS.rps, base.rps), ok: (v: number) => v >= 2, unit: '×' },
    { what: 'warm GET /v1/me p99 ≤ bare Express p99', value: ratio(warmS.p99, base.p99), ok: (v: number) => v <= 1, unit: '×' },
    { what: 'forward auth throughput ≥ 2× bare Express (floor 1.5×)', value: ratio(forwardS.rps, base.rps), ok: (v: number) => v >= 2, unit: '×' },
    { what: 'forward auth p99 ≤ bare Express p99', value: ratio(forwardS.p99, base.p99), ok: (v: number) => v <= 1, unit: '×' },
    { what: `${P.bigTokens.toLocaleString('en')} tokens within 5% of the small database`, value: ratio(largeS.rps, warmS.rps), ok: (v: number) => v >= 0.95, unit: '×' },
    { what: 'refusals (bad checksum, unknown selector, revoked, missing scope) at least as fast as a warm success: the slowest', value: ratio(slowestRefusal, warmS.rps), ok: (v: number) => v >= 1, unit: '×' },
    { what: 'warm p99 during cold verifications ≤ 2× warm p99', value: ratio(warmDuringCold.p99, warmS.p99), ok: (v: number) => v <= 2, unit: '×' },
    { what: 'warm p99 during minting ≤ 2× warm p99', value: ratio(warmDuringMint.p99, warmS.p99), ok: (v: number) => v <= 2, unit: '×' },
    { what: `peak RSS < 150 MB with ${bigTokens.length.toLocaleString('en')} distinct tokens verified`, value: rssLarge, ok: (v: number) => v < 150, unit: ' MB' },
  ];

  const machine = `${cpus().length} cores (${cpus()[0]?.model.trim() ?? 'unknown'}), Node ${process.version}, ${QUICK ? 'quick' : 'full'} mode: ${P.rounds} round(s) of ${P.duration} s per scenario, ${CONNECTIONS} connections unless noted`;
  const lines = [
    `# keyward benchmark (${new Date().toISOString()})`,
    '',
    machine,
    '',
    '| scenario | req/s | × Express | × node:http | p50 ms | p99 ms | p99 × Express | max ms | server µs/req | note |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |',
    ...rows.map(
      (r) =>
        `| ${r.scenario} | ${fmt(r.rps)} | ${fmt(ratio(r.rps ?? NaN, base.rps), 2)} | ${fmt(ratio(r.rps ?? NaN, rawS.rps), 2)} | ${fmt(r.p50, 1)} | ${fmt(r.p99, 1)} | ${fmt(ratio(r.p99 ?? NaN, base.p99), 2)} | ${fmt(r.max)} | ${fmt(r.cpuUs)} | ${r.note} |`,
    ),
    '',
    `Peak RSS: bare Express ${peakRssMb(baseline.pid).toFixed(0)} MB, node:http ${peakRssMb(raw.pid).toFixed(0)} MB, small-database server ${rssSmall.toFixed(0)} MB, large-database server ${rssLarge.toFixed(0)} MB.`,
    '',
    '| target | measured | |',
    '| --- | ---: | --- |',
    ...targets.map((t) => `| ${t.what} | ${fmt(t.value, 2)}${t.unit} | ${t.ok(t.value) ? 'met' : '**missed**'} |`),
    '',
    `Errors: ${Object.entries(samples).map(([k, xs]) => `${k} ${xs.reduce((a, x) => a + x.errors, 0)}`).join(', ')}; non-2xx where 2xx expected: warm ${warmS.non2xx}, forward auth ${forwardS.non2xx}, bots ${botS.non2xx}, allowlist ${summary('allowlist').non2xx}, large ${largeS.non2xx}, many ${summary('many').non2xx}, distinct-token run ${memoryRun.non2xx}.`,
    `Run took ${((Date.now() - started) / 1000).toFixed(0)} s.`,
  ];
  const markdown = lines.join('\n') + '\n';
  process.stdout.write(markdown);
  const out = join(ROOT, 'bench', 'results');
  mkdirSync(out, { recursive: true });
  writeFileSync(join(out, 'latest.md'), markdown);
  writeFileSync(join(out, 'latest.json'), JSON.stringify({ machine, quick: QUICK, params: P, rows, samples, targets: targets.map((t) => ({ what: t.what, value: t.value, met: t.ok(t.value) })), rss_mb: { small: rssSmall, large: rssLarge } }, null, 2));

  for (const c of children) c.kill('SIGTERM');
  await new Promise((resolve) => setTimeout(resolve, 500));
  await pg?.drop();
  rmSync(dir, { recursive: true, force: true });
  const sanity =
    warmS.non2xx + summary('forwardAuth').non2xx + summary('botPair').non2xx + summary('allowlist').non2xx + largeS.non2xx + summary('many').non2xx + memoryRun.non2xx +
    (samples.pgWarm ? summary('pgWarm').non2xx + summary('pgBotPair').non2xx : 0);
  if (sanity > 0) {
    log(`FAILED: ${sanity} non-2xx answers where every request should have succeeded`);
    process.exit(1);
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
