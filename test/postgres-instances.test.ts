import { randomBytes } from 'node:crypto';
import { Client } from 'pg';
import { migrationProvider } from '../db/migrations';
import { POSTGRES_URL } from './helpers/app';
import { useFreshSchema, type TestSchema } from './helpers/postgres-schema';
import { assertBuilt, removeTempDirs, startServer, stopAllServers, type ServerProcess } from './helpers/server-process';

/**
 * Several keyward processes on one PostgreSQL database, the way it is scaled out: real server
 * processes (`node dist/src/server.js`) with DATABASE_URL, each describe on a fresh schema of its own.
 * What holds for one process must hold for all of them together: migrations run once however many
 * instances start at once, bot admission and the token cap are exact across instances (the user's
 * row is locked, SELECT … FOR UPDATE), and revoking a key or disabling a user through one instance is
 * seen by every other one on its very next request (the credential row is read on every request; only
 * the bcrypt result is cached).
 *
 * Only under `npm run test:postgres` (KEYWARD_TEST_POSTGRES_URL set): plain `npm test` must need
 * nothing installed besides node_modules, so jest.config.js leaves this file out of it.
 */
if (!POSTGRES_URL) throw new Error('postgres-instances.test.ts runs under `npm run test:postgres` (KEYWARD_TEST_POSTGRES_URL)');

const HIGH_RATE = 1_000_000;
/** A key's first, not yet verified, requests count against the wrong-key limits (see bots-admission.test.ts). */
const HIGH_AUTH_FAILURES = '10000000';
/** Fewer requests per never-verified key per process than the ten wrong attempts a key may make. */
const KEY_SHARE = 7;
const LIMIT = 5;
const BURST = 50;
const DEFAULT_TTL = 300;
const OVER_LIMIT = '429 CONCURRENCY_LIMIT_EXCEEDED';
const TOKEN_CAP = 5;
const OVER_CAP = '409 CONFLICT';

/** The session-level advisory lock Kysely's Migrator takes on PostgreSQL (PostgresAdapter's LOCK_ID). */
const KYSELY_MIGRATION_LOCK = '3853314791062309107';

// ---------------------------------------------------------------------------------------------------
// server processes

const adminKey = randomBytes(32).toString('hex');
const adminHeaders = { 'X-Admin-API-Key': adminKey };
const started: ServerProcess[] = [];

function serverEnv(schema: TestSchema, extra: Record<string, string> = {}): Record<string, string> {
  return {
    ADMIN_API_TOKEN: adminKey,
    DATABASE_URL: schema.url,
    BCRYPT_ROUNDS: '4',
    PORT: '0',
    HOST: '127.0.0.1',
    ADMIN_RATE_LIMIT_PER_MINUTE: String(HIGH_RATE),
    AUTH_FAILURES_PER_MINUTE: HIGH_AUTH_FAILURES,
    ...extra,
  };
}

/** `n` instances on `schema`, all started at the same moment. */
async function startInstances(n: number, schema: TestSchema, extra: Record<string, string> = {}): Promise<ServerProcess[]> {
  const env = serverEnv(schema, extra);
  const settled = await Promise.allSettled(Array.from({ length: n }, () => startServer({ env, timeoutMs: 40_000 })));
  const servers = settled.flatMap((s) => (s.status === 'fulfilled' ? [s.value] : []));
  started.push(...servers);
  const failed = settled.flatMap((s) => (s.status === 'rejected' ? [s.reason] : []));
  if (failed.length > 0) throw failed[0];
  return servers;
}

/** Stops them gracefully (they flush last use and usage before closing the pool), then makes sure. */
async function stopServers(): Promise<void> {
  const servers = started.splice(0);
  await Promise.allSettled(servers.map((s) => s.stop()));
  await stopAllServers();
}

interface Result {
  server: number;
  status: number;
  body: any;
  headers: Headers;
}

function caller(servers: () => ServerProcess[]) {
  return async (server: number, method: string, path: string, headers: Record<string, string>, body?: unknown): Promise<Result> => {
    const res = await fetch(`${servers()[server]!.baseUrl}${path}`, {
      method,
      headers: body === undefined ? headers : { 'Content-Type': 'application/json', ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    return { server, status: res.status, body: text === '' ? null : JSON.parse(text), headers: res.headers };
  };
}

/** "201", "429 CONCURRENCY_LIMIT_EXCEEDED", "503 UNAVAILABLE", …: what a burst got, counted. */
function histogram(results: Result[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const r of results) {
    const key = r.status < 400 ? String(r.status) : `${r.status} ${r.body?.error?.code ?? '?'}`;
    out[key] = (out[key] ?? 0) + 1;
  }
  return out;
}

function expected(ok: number, okKey: string, refused: number, refusedKey: string): Record<string, number> {
  const out: Record<string, number> = {};
  if (ok > 0) out[okKey] = ok;
  if (refused > 0) out[refusedKey] = refused;
  return out;
}

/** The one error envelope, with the request id of the response. */
function expectEnvelope(r: Result, status: number, code: string, details?: unknown): void {
  expect({ server: r.server, status: r.status, code: r.body?.error?.code }).toEqual({ server: r.server, status, code });
  expect(Object.keys(r.body).sort()).toEqual(['error']);
  expect(Object.keys(r.body.error).sort()).toEqual(['code', 'details', 'message', 'request_id']);
  expect(typeof r.body.error.message).toBe('string');
  expect(r.body.error.request_id).toBe(r.headers.get('x-request-id'));
  expect(r.headers.get('content-type')).toMatch(/^application\/json/);
  if (details !== undefined) expect(r.body.error.details).toEqual(details);
}

const sorted = (ids: number[]) => [...ids].sort((a, b) => a - b);

/** A fixed shuffle (no Math.random: a failure must replay the same way). */
function interleave<T>(items: T[], seed: number): T[] {
  const out = [...items];
  let s = seed * 2654435761 + 1;
  for (let i = out.length - 1; i > 0; i--) {
    s = (s * 1103515245 + 12345) % 2147483648;
    const j = s % (i + 1);
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------

describe('startup: several instances started at once on an empty database', () => {
  const schemas = [useFreshSchema('migrate_a', stopServers), useFreshSchema('migrate_b', stopServers)];

  /**
   * Runs `start` while a session of the test's own holds Kysely's migration lock, until `n`
   * connections of `schema`'s instances are seen waiting for it; then lets them go.
   */
  async function withMigrationLockHeld<T>(schema: TestSchema, n: number, start: () => Promise<T>): Promise<T> {
    const gate = await schema.connect();
    await gate.query(`select pg_advisory_lock(${KYSELY_MIGRATION_LOCK})`);
    let starting: Promise<T> | undefined;
    try {
      starting = start();
      let failed: unknown;
      let listening = false;
      starting.then(
        () => (listening = true),
        (err: unknown) => (failed = err ?? new Error('start failed')),
      );
      const deadline = Date.now() + 30_000;
      let waiting = 0;
      while (waiting < n) {
        if (failed !== undefined) throw failed;
        if (listening) throw new Error(`the instances started while the migration lock was held (${waiting} of ${n} waited for it)`);
        if (Date.now() > deadline) throw new Error(`only ${waiting} of ${n} instances ever waited for the migration lock`);
        await new Promise((r) => setTimeout(r, 50));
        const { rows } = await gate.query<{ n: number }>(
          `select count(distinct l.pid)::int as n from pg_locks l join pg_stat_activity a on a.pid = l.pid
           where l.locktype = 'advisory' and not l.granted and a.application_name = $1`,
          [schema.name],
        );
        waiting = rows[0]!.n;
      }
      expect(waiting).toBe(n);
    } finally {
      await gate.query(`select pg_advisory_unlock(${KYSELY_MIGRATION_LOCK})`);
    }
    return starting;
  }

  test('node-postgres honours `options=-c search_path=…` in DATABASE_URL', async () => {
    const c = new Client({ connectionString: schemas[0]!.url });
    await c.connect();
    try {
      expect((await c.query('select current_schema() as s, current_setting(\'application_name\') as a')).rows).toEqual([{ s: schemas[0]!.name, a: schemas[0]!.name }]);
    } finally {
      await c.end();
    }
  });

  test('3 instances at once on an empty schema, twice: all become ready, each migration runs exactly once, the tables are in that schema', async () => {
    const migrations = Object.keys(await migrationProvider.getMigrations()).sort();
    expect(migrations.length).toBeGreaterThan(0);
    const tablesIn = async (s: TestSchema) =>
      (await s.query<{ t: string }>('select table_name as t from information_schema.tables where table_schema = $1 order by 1', [s.name])).map((r) => r.t);
    const recordedIn = (s: TestSchema) => s.query(`select name, timestamp from ${s.q}.kysely_migration order by name`);

    const tableLists: string[][] = [];
    let migratedBefore: unknown[] = [];
    for (const [round, schema] of schemas.entries()) {
      expect({ round, tables: await tablesIn(schema) }).toEqual({ round, tables: [] });
      let servers: ServerProcess[];
      let late: ServerProcess[] = [];
      if (round === 0) {
        // Held at the gate: this test holds the migration lock until all three instances are waiting
        // for it, so they certainly migrate at the same moment (process start-up alone jitters by
        // seconds). Released, they take it one after another. (Other workers' migrations on this
        // database wait too, for the few seconds this takes.)
        servers = await withMigrationLockHeld(schema, 3, () => startInstances(3, schema));
      } else {
        // Free-running, as a deployment starts them; and a fourth instance starts at the same moment
        // on the schema the first three migrated: it finds everything done and migrates nothing again.
        [servers, late] = await Promise.all([startInstances(3, schema), startInstances(1, schemas[0]!)]);
      }
      const call = caller(() => servers);

      for (const s of [0, 1, 2]) {
        const ready = await call(s, 'GET', '/readyz', {});
        expect({ round, server: s, status: ready.status, body: ready.body }).toEqual({ round, server: s, status: 200, body: { status: 'ok', rate_limit_store: { kind: 'memory', up: true } } });
        expect(servers[s]!.logs).not.toMatch(/cannot open or migrate|migration .* failed/);
      }

      // Each migration is recorded once, and the migrator's lock is free again.
      const recorded = await schema.query<{ name: string; n: number }>(
        `select name, count(*)::int as n from ${schema.q}.kysely_migration group by name order by name`,
      );
      expect({ round, recorded }).toEqual({ round, recorded: migrations.map((name) => ({ name, n: 1 })) });
      expect(await schema.query(`select id, is_locked from ${schema.q}.kysely_migration_lock`)).toEqual([{ id: 'migration_lock', is_locked: 0 }]);

      const tables = await tablesIn(schema);
      expect(tables).toEqual(expect.arrayContaining(['users', 'tokens', 'bots', 'audit_events', 'usage_daily', 'kysely_migration', 'kysely_migration_lock']));
      tableLists.push(tables);

      // One database behind all three: a user created through one is seen by the others.
      const created = await call(round, 'POST', '/admin/users', adminHeaders, { email: `first-${round}@example.com` });
      expect(created.status).toBe(201);
      for (const s of [0, 1, 2]) {
        const got = await call(s, 'GET', `/admin/users/${created.body.id}`, adminHeaders);
        expect({ server: s, status: got.status, email: got.body?.email }).toEqual({ server: s, status: 200, email: `first-${round}@example.com` });
      }

      if (round === 0) migratedBefore = await recordedIn(schema);
      else {
        expect((await caller(() => late)(0, 'GET', '/readyz', {})).status).toBe(200);
        expect(late[0]!.logs).not.toMatch(/cannot open or migrate|migration .* failed/);
        expect(await recordedIn(schemas[0]!)).toEqual(migratedBefore);
        expect(await tablesIn(schemas[0]!)).toEqual(tableLists[0]);
      }
      await stopServers();
    }
    // The same tables both times.
    expect(tableLists[1]).toEqual(tableLists[0]);
  }, 90_000);
});

// ---------------------------------------------------------------------------------------------------

describe('bot admission is exact across 3 instances on one database', () => {
  const schema = useFreshSchema('bots', stopServers);
  let servers: ServerProcess[] = [];
  const call = caller(() => servers);
  const N = 3;

  beforeAll(async () => {
    // Every cold round mints keys: the cap on a user's keys must not get in the way.
    servers = await startInstances(N, schema, { MAX_TOKENS_PER_USER: '100000' });
  }, 60_000);

  /** The user's leases the database itself calls active, by a direct query. */
  async function activeInDb(userId: number): Promise<number[]> {
    const rows = await schema.query<{ id: number }>(
      `select id from ${schema.q}.bots where user_id = $1 and status = 'active' and expires_at > $2 order by id`,
      [userId, new Date().toISOString()],
    );
    return rows.map((r) => r.id);
  }

  function expectExactRefusal(r: Result): void {
    expectEnvelope(r, 429, 'CONCURRENCY_LIMIT_EXCEEDED', { limit: LIMIT, active: LIMIT });
    const retryAfter = r.headers.get('retry-after');
    expect(retryAfter).toMatch(/^[1-9][0-9]*$/);
    expect(Number(retryAfter)).toBeLessThanOrEqual(DEFAULT_TTL);
  }

  /** A user at a limit of 5 and a key every instance has already verified. */
  async function runner(): Promise<{ userId: number; token: string }> {
    const user = await call(0, 'POST', '/admin/users', adminHeaders, {
      email: `runner-${randomBytes(4).toString('hex')}@example.com`,
      max_concurrent_bots: LIMIT,
      rate_limit_per_minute: HIGH_RATE,
    });
    expect(user.status).toBe(201);
    // Minted through another instance: all of them read the same database.
    const token = await call(1, 'POST', `/admin/users/${user.body.id}/tokens`, adminHeaders, { scopes: ['bots:read', 'bots:write'] });
    expect(token.status).toBe(201);
    for (let s = 0; s < N; s++) expect((await call(s, 'GET', '/v1/me', { 'X-API-Key': token.body.token })).status).toBe(200);
    return { userId: user.body.id, token: token.body.token };
  }

  test('50 acquisitions at once spread over the instances: exactly 5 × 201 and 45 exact 429s, 20 rounds', async () => {
    const { userId, token } = await runner();
    let roundsWonOnSeveralInstances = 0;
    for (let round = 0; round < 20; round++) {
      // Even rounds: the key every instance has verified. Odd rounds: keys no instance has seen yet
      // (each one's first requests share one bcrypt check, then arrive together).
      let keys = [token];
      if (round % 2 === 1) {
        const minted = await Promise.all(
          Array.from({ length: Math.ceil(BURST / KEY_SHARE) }, (_, k) => call(k % N, 'POST', `/admin/users/${userId}/tokens`, adminHeaders, { scopes: ['bots:write'] })),
        );
        expect(minted.map((m) => m.status)).toEqual(minted.map(() => 201));
        keys = minted.map((m) => m.body.token);
      }
      const results = await Promise.all(
        Array.from({ length: BURST }, (_, i) => call(i % N, 'POST', '/v1/bots', { 'X-API-Key': keys[i % keys.length]! }, { label: `p${round}-${i}` })),
      );
      expect({ round, ...histogram(results) }).toEqual({ round, ...expected(LIMIT, '201', BURST - LIMIT, OVER_LIMIT) });
      for (const r of results.filter((x) => x.status === 429)) expectExactRefusal(r);

      const created = results.filter((r) => r.status === 201);
      for (const r of created) expect(r.body).toMatchObject({ user_id: userId, status: 'active', label: expect.stringMatching(new RegExp(`^p${round}-`)) });
      const createdIds = sorted(created.map((r) => r.body.id));
      expect(new Set(createdIds).size).toBe(LIMIT);
      if (new Set(created.map((r) => r.server)).size > 1) roundsWonOnSeveralInstances++;

      // The database agrees: exactly the admitted rows are active, and no other row was written.
      expect({ round, active: await activeInDb(userId) }).toEqual({ round, active: createdIds });
      const written = await schema.query<{ n: number }>(`select count(*)::int as n from ${schema.q}.bots where user_id = $1 and label like $2`, [userId, `p${round}-%`]);
      expect(written).toEqual([{ n: LIMIT }]);
      for (let s = 0; s < N; s++) {
        const user = await call(s, 'GET', `/admin/users/${userId}`, adminHeaders);
        expect({ server: s, active_bots: user.body.active_bots }).toEqual({ server: s, active_bots: LIMIT });
      }

      // Released through any instance, the slots are free on all of them.
      const released = await Promise.all(createdIds.map((id, i) => call(i % N, 'DELETE', `/v1/bots/${id}`, { 'X-API-Key': token })));
      expect(released.map((r) => r.status)).toEqual(Array(LIMIT).fill(204));
      expect(await activeInDb(userId)).toEqual([]);
    }
    // The race was between instances: winners came from more than one of them.
    expect(roundsWonOnSeveralInstances).toBeGreaterThan(0);
  }, 60_000);

  test('releases racing acquisitions across the instances never let the count pass the limit, 20 rounds', async () => {
    const { userId, token } = await runner();
    const headers = { 'X-API-Key': token };
    const held: number[] = [];
    for (let i = 0; i < LIMIT; i++) {
      const r = await call(i % N, 'POST', '/v1/bots', headers);
      expect(r.status).toBe(201);
      held.push(r.body.id);
    }
    // A second connection counts the user's active leases over and over while each round runs: "at
    // every moment", not just at the end.
    const watcher = await schema.connect();
    let admittedInRaces = 0;
    let samples = 0;
    for (let round = 0; round < 20; round++) {
      let watching = true;
      let max = 0;
      const watch = (async () => {
        while (watching) {
          const { rows } = await watcher.query<{ n: number }>(
            `select count(*)::int as n from ${schema.q}.bots where user_id = $1 and status = 'active' and expires_at > $2`,
            [userId, new Date().toISOString()],
          );
          max = Math.max(max, rows[0]!.n);
          samples++;
        }
      })();
      const ops = interleave(
        [
          ...held.map((id, i) => ({ kind: 'release' as const, id, server: (i + round) % N })),
          ...Array.from({ length: 20 }, (_, i) => ({ kind: 'acquire' as const, id: 0, server: i % N })),
        ],
        round,
      );
      const results = await Promise.all(
        ops.map((op) => (op.kind === 'release' ? call(op.server, 'DELETE', `/v1/bots/${op.id}`, headers) : call(op.server, 'POST', '/v1/bots', headers))),
      );
      watching = false;
      await watch;

      const releases = results.filter((_, i) => ops[i]!.kind === 'release');
      const acquisitions = results.filter((_, i) => ops[i]!.kind === 'acquire');
      expect(releases.map((r) => r.status)).toEqual(Array(LIMIT).fill(204));
      const hist = histogram(acquisitions);
      expect({ round, unexpected: Object.keys(hist).filter((k) => k !== '201' && k !== OVER_LIMIT) }).toEqual({ round, unexpected: [] });
      const admitted = acquisitions.filter((r) => r.status === 201).map((r) => r.body.id as number);
      expect(admitted.length).toBeLessThanOrEqual(LIMIT);
      // A refusal only ever happens at a full house.
      for (const r of acquisitions.filter((x) => x.status === 429)) expectExactRefusal(r);
      expect({ round, max: max <= LIMIT }).toEqual({ round, max: true });
      expect({ round, active: await activeInDb(userId) }).toEqual({ round, active: sorted(admitted) });
      admittedInRaces += admitted.length;

      held.splice(0, held.length, ...admitted);
      while (held.length < LIMIT) {
        const r = await call(held.length % N, 'POST', '/v1/bots', headers);
        expect(r.status).toBe(201);
        held.push(r.body.id);
      }
      expect(await activeInDb(userId)).toEqual(sorted(held));
      // Full again, on every instance.
      for (let s = 0; s < N; s++) expectExactRefusal(await call(s, 'POST', '/v1/bots', headers));
    }
    // The race did happen (some acquisitions got a slot a release had just freed), and was watched.
    expect(admittedInRaces).toBeGreaterThan(0);
    expect(samples).toBeGreaterThan(20);
  }, 60_000);
});

// ---------------------------------------------------------------------------------------------------

describe('MAX_TOKENS_PER_USER holds exactly across 3 instances', () => {
  const schema = useFreshSchema('tokens', stopServers);
  let servers: ServerProcess[] = [];
  const call = caller(() => servers);
  const N = 3;
  const MANAGER_SCOPES = ['bots:read', 'bots:write', 'tokens:read', 'tokens:write'];

  beforeAll(async () => {
    servers = await startInstances(N, schema, { MAX_TOKENS_PER_USER: String(TOKEN_CAP) });
  }, 60_000);

  /** Tokens of the user that count against the cap, by a direct query (revoked, rotated-out and expired ones do not). */
  async function activeTokens(userId: number): Promise<number[]> {
    const rows = await schema.query<{ id: number }>(
      `select id from ${schema.q}.tokens where user_id = $1 and revoked_at is null and rotated_to is null and (expires_at is null or expires_at > $2) order by id`,
      [userId, new Date().toISOString()],
    );
    return rows.map((r) => r.id);
  }

  async function newUser(round: number): Promise<number> {
    const user = await call(round % N, 'POST', '/admin/users', adminHeaders, {
      email: `cap-${round}-${randomBytes(4).toString('hex')}@example.com`,
      rate_limit_per_minute: HIGH_RATE,
    });
    expect(user.status).toBe(201);
    return user.body.id;
  }

  test('30 admin mints at once spread over the instances: exactly as many succeed as fit, 8 rounds', async () => {
    for (let round = 0; round < 8; round++) {
      const userId = await newUser(round);
      // Odd rounds start with 2 tokens already (and a revoked one, which does not count): 3 fit.
      const already: number[] = [];
      if (round % 2 === 1) {
        for (let i = 0; i < 3; i++) {
          const t = await call(i % N, 'POST', `/admin/users/${userId}/tokens`, adminHeaders, { name: `pre-${i}` });
          expect(t.status).toBe(201);
          already.push(t.body.id);
        }
        expect((await call(2, 'DELETE', `/admin/tokens/${already.pop()}`, adminHeaders)).status).toBe(204);
      }
      const fit = TOKEN_CAP - already.length;
      const results = await Promise.all(
        Array.from({ length: 30 }, (_, i) => call(i % N, 'POST', `/admin/users/${userId}/tokens`, adminHeaders, { name: `m${round}-${i}` })),
      );
      expect({ round, ...histogram(results) }).toEqual({ round, ...expected(fit, '201', 30 - fit, OVER_CAP) });
      for (const r of results.filter((x) => x.status === 409)) expectEnvelope(r, 409, 'CONFLICT', { limit: TOKEN_CAP, active: TOKEN_CAP });
      const minted = results.filter((r) => r.status === 201).map((r) => r.body.id as number);
      expect(new Set(minted).size).toBe(fit);
      expect({ round, active: await activeTokens(userId) }).toEqual({ round, active: sorted([...already, ...minted]) });
      // Nothing else was written, and every instance counts the same.
      const written = await schema.query<{ n: number }>(`select count(*)::int as n from ${schema.q}.tokens where user_id = $1 and name like $2`, [userId, `m${round}-%`]);
      expect(written).toEqual([{ n: fit }]);
      for (let s = 0; s < N; s++) {
        expectEnvelope(await call(s, 'POST', `/admin/users/${userId}/tokens`, adminHeaders, {}), 409, 'CONFLICT', { limit: TOKEN_CAP, active: TOKEN_CAP });
      }
    }
  }, 60_000);

  test('self-service mints (POST /v1/tokens) racing on every instance, with revocations racing too: never more than the cap, 8 rounds', async () => {
    const userId = await newUser(100);
    const manager = await call(0, 'POST', `/admin/users/${userId}/tokens`, adminHeaders, { scopes: MANAGER_SCOPES, name: 'manager' });
    expect(manager.status).toBe(201);
    const headers = { 'X-API-Key': manager.body.token };
    for (let s = 0; s < N; s++) expect((await call(s, 'GET', '/v1/me', headers)).status).toBe(200);
    const mint = (server: number, name: string) => call(server, 'POST', '/v1/tokens', headers, { name, scopes: ['bots:read'] });

    // The manager key counts too: 4 others fit.
    const first = await Promise.all(Array.from({ length: 30 }, (_, i) => mint(i % N, `first-${i}`)));
    expect(histogram(first)).toEqual(expected(TOKEN_CAP - 1, '201', 30 - (TOKEN_CAP - 1), OVER_CAP));
    let held = first.filter((r) => r.status === 201).map((r) => r.body.id as number);
    expect(await activeTokens(userId)).toEqual(sorted([manager.body.id, ...held]));

    let mintedInRaces = 0;
    for (let round = 0; round < 8; round++) {
      // At the cap; 2 tokens are revoked (through the instances, by the key itself) while 30 mints race.
      const toRevoke = held.slice(0, 2);
      const ops = interleave(
        [
          ...toRevoke.map((id, i) => ({ kind: 'revoke' as const, id, server: (i + round) % N })),
          ...Array.from({ length: 30 }, (_, i) => ({ kind: 'mint' as const, id: 0, server: i % N })),
        ],
        round,
      );
      const results = await Promise.all(
        ops.map((op, i) => (op.kind === 'revoke' ? call(op.server, 'DELETE', `/v1/tokens/${op.id}`, headers) : mint(op.server, `s${round}-${i}`))),
      );
      const revokes = results.filter((_, i) => ops[i]!.kind === 'revoke');
      const mints = results.filter((_, i) => ops[i]!.kind === 'mint');
      expect(revokes.map((r) => r.status)).toEqual(Array(toRevoke.length).fill(204));
      const hist = histogram(mints);
      expect({ round, unexpected: Object.keys(hist).filter((k) => k !== '201' && k !== OVER_CAP) }).toEqual({ round, unexpected: [] });
      for (const r of mints.filter((x) => x.status === 409)) expectEnvelope(r, 409, 'CONFLICT', { limit: TOKEN_CAP, active: TOKEN_CAP });
      const minted = mints.filter((r) => r.status === 201).map((r) => r.body.id as number);
      // Only the slots the revocations freed, at most (how many of them a mint saw free depends on timing).
      expect({ round, minted: minted.length <= toRevoke.length }).toEqual({ round, minted: true });
      mintedInRaces += minted.length;
      held = [...held.filter((id) => !toRevoke.includes(id)), ...minted];
      expect({ round, active: await activeTokens(userId) }).toEqual({ round, active: sorted([manager.body.id, ...held]) });

      // Fill what is left one at a time; then the cap is reached on every instance.
      while (held.length < TOKEN_CAP - 1) {
        const r = await mint(held.length % N, `fill-${round}`);
        expect(r.status).toBe(201);
        held.push(r.body.id);
      }
      for (let s = 0; s < N; s++) expectEnvelope(await mint(s, 'over'), 409, 'CONFLICT', { limit: TOKEN_CAP, active: TOKEN_CAP });
      expect(await activeTokens(userId)).toEqual(sorted([manager.body.id, ...held]));
    }
    // Some mints did get a slot a racing revocation had just freed.
    expect(mintedInRaces).toBeGreaterThan(0);
  }, 60_000);
});

// ---------------------------------------------------------------------------------------------------

describe('what one instance changes, the other enforces on its very next request', () => {
  const schema = useFreshSchema('state', stopServers);
  let servers: ServerProcess[] = [];
  const call = caller(() => servers);

  beforeAll(async () => {
    servers = await startInstances(2, schema);
  }, 60_000);

  /** A counter from the instance's /metrics (plain text, no labels). */
  async function metric(server: number, name: string): Promise<number> {
    const res = await fetch(`${servers[server]!.baseUrl}/metrics`);
    expect(res.status).toBe(200);
    const line = (await res.text()).split('\n').find((l) => l.startsWith(`${name} `));
    if (line === undefined) throw new Error(`${name} is not in /metrics`);
    return Number(line.split(' ')[1]);
  }

  async function userWithKey(): Promise<{ userId: number; tokenId: number; token: string }> {
    const user = await call(0, 'POST', '/admin/users', adminHeaders, {
      email: `state-${randomBytes(4).toString('hex')}@example.com`,
      max_concurrent_bots: LIMIT,
      rate_limit_per_minute: HIGH_RATE,
    });
    expect(user.status).toBe(201);
    const token = await call(1, 'POST', `/admin/users/${user.body.id}/tokens`, adminHeaders, { scopes: ['bots:read', 'bots:write'] });
    expect(token.status).toBe(201);
    return { userId: user.body.id, tokenId: token.body.id, token: token.body.token };
  }

  /** Both instances have verified the key and answer it from their caches (no bcrypt any more). */
  async function warmOnBoth(token: string): Promise<void> {
    for (const s of [0, 1]) {
      expect((await call(s, 'GET', '/v1/me', { 'X-API-Key': token })).status).toBe(200);
      const hits = await metric(s, 'keyward_verify_cache_hits_total');
      const me = await call(s, 'GET', '/v1/me', { 'X-API-Key': token });
      expect(me.status).toBe(200);
      expect({ server: s, cacheHits: (await metric(s, 'keyward_verify_cache_hits_total')) - hits }).toEqual({ server: s, cacheHits: 1 });
    }
  }

  test('a key revoked through one instance is refused (401 API_KEY_REVOKED) by the other on its next request, both ways, 6 keys', async () => {
    for (let round = 0; round < 6; round++) {
      const through = round % 2;
      const other = 1 - through;
      const { tokenId, token } = await userWithKey();
      const headers = { 'X-API-Key': token };
      await warmOnBoth(token);

      expect((await call(through, 'DELETE', `/admin/tokens/${tokenId}`, adminHeaders)).status).toBe(204);

      // The very next request on the other instance, from the cache's point of view a key it knows.
      const next = await call(other, 'GET', '/v1/me', headers);
      expectEnvelope(next, 401, 'API_KEY_REVOKED');
      expect(next.headers.get('www-authenticate')).toMatch(/^Bearer /);
      expectEnvelope(await call(other, 'POST', '/v1/bots', headers), 401, 'API_KEY_REVOKED');
      expectEnvelope(await call(through, 'GET', '/v1/me', headers), 401, 'API_KEY_REVOKED');
      const [row] = await schema.query(`select revoked_at from ${schema.q}.tokens where id = $1`, [tokenId]);
      expect(row!.revoked_at).toEqual(expect.any(String));
    }
  });

  test('a user disabled through one instance is refused (403 USER_DISABLED) by the other at once, and enabled again the same way, 4 rounds', async () => {
    const { userId, token } = await userWithKey();
    const headers = { 'X-API-Key': token };
    await warmOnBoth(token);
    for (let round = 0; round < 4; round++) {
      const through = round % 2;
      const other = 1 - through;

      const disabled = await call(through, 'PATCH', `/admin/users/${userId}`, adminHeaders, { disabled: true });
      expect({ status: disabled.status, disabled: disabled.body?.disabled }).toEqual({ status: 200, disabled: true });
      expectEnvelope(await call(other, 'GET', '/v1/me', headers), 403, 'USER_DISABLED');
      expectEnvelope(await call(other, 'POST', '/v1/bots', headers), 403, 'USER_DISABLED');
      expectEnvelope(await call(through, 'GET', '/v1/me', headers), 403, 'USER_DISABLED');
      const [row] = await schema.query(`select disabled_at from ${schema.q}.users where id = $1`, [userId]);
      expect(row!.disabled_at).toEqual(expect.any(String));

      const enabled = await call(other, 'PATCH', `/admin/users/${userId}`, adminHeaders, { disabled: false });
      expect({ status: enabled.status, disabled: enabled.body?.disabled }).toEqual({ status: 200, disabled: false });
      expect((await call(through, 'GET', '/v1/me', headers)).status).toBe(200);
      expect((await call(other, 'GET', '/v1/me', headers)).status).toBe(200);
    }
  });
});
