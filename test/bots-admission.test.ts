import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import Database from 'better-sqlite3';
import { sql } from 'kysely';
import request from 'supertest';
import { isStorageUnavailable, openSqlite, writeTransaction } from '../db/database';
import { countActiveLeases, insertBot } from '../src/bots/bots.repository';
import { admin, createTestApp, createUser, expectError, mintToken, tempDir, type TestContext } from './helpers/app';
import { assertBuilt, makeTempDir, removeTempDirs, startServer, stopAllServers, type ServerProcess } from './helpers/server-process';

/**
 * Admission is exact: a bot is a lease on one of the user's `max_concurrent_bots` slots, and "expire
 * the user's run-out leases, count the active ones, insert" is one atomic step. However many
 * acquisitions arrive at once (in one process or in several sharing the file), exactly as many are
 * admitted as there are free slots, and every other one is 429 CONCURRENCY_LIMIT_EXCEEDED with
 * `details: {limit, active}` and a Retry-After: never a 500, 503 or 409.
 */

const LIMIT = 5;
const BURST = 50;
const DEFAULT_TTL = 300;
const HIGH_RATE = 1_000_000;
/**
 * The wrong-key limits (per address, AUTH_FAILURES_PER_MINUTE, and ten per key) count a key's first,
 * not yet verified, requests until it proves good. Bursts here are made of such requests on purpose
 * (see coldBurst), so the address limit is lifted and no key carries more than KEY_SHARE of a burst.
 * That valid keys are refused at all is a bug: see "a valid key's first requests, sent at once".
 */
const HIGH_AUTH_FAILURES = '10000000';
/** More than LIMIT, so one key's requests alone can overrun a broken admission; fewer than the ten per key. */
const KEY_SHARE = 8;
const OVER_LIMIT = '429 CONCURRENCY_LIMIT_EXCEEDED';

const iso = (ms: number) => new Date(ms).toISOString();

let ctx: TestContext;
let dbPath: string;
const dirs: string[] = [];
const extraContexts: TestContext[] = [];

/** The production set-up: a database file in WAL mode, not the in-memory default. */
async function fileBackedApp(env: Record<string, string> = { AUTH_FAILURES_PER_MINUTE: HIGH_AUTH_FAILURES }): Promise<{ ctx: TestContext; dbPath: string }> {
  const dir = tempDir();
  dirs.push(dir);
  const path = join(dir, 'k.db');
  // The admin API is used between rounds, and every burst mints keys: neither its rate limit nor the
  // cap on a user's keys may get in the way.
  const c = await createTestApp({
    env: { DATABASE_PATH: path, ADMIN_RATE_LIMIT_PER_MINUTE: String(HIGH_RATE), MAX_TOKENS_PER_USER: '100000', ...env },
  });
  return { ctx: c, dbPath: path };
}

beforeEach(async () => {
  ({ ctx, dbPath } = await fileBackedApp());
});
afterEach(async () => {
  await ctx.close();
  for (const c of extraContexts.splice(0)) await c.close();
});
afterAll(() => {
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------------
// helpers

interface Runner {
  userId: number;
  token: string;
}

async function runner(limit = LIMIT, c: TestContext = ctx): Promise<Runner> {
  const user = await createUser(c, { max_concurrent_bots: limit, rate_limit_per_minute: HIGH_RATE });
  const { token } = await mintToken(c, user.id, { scopes: ['bots:read', 'bots:write'] });
  return { userId: user.id, token };
}

function acquire(token: string, body?: Record<string, unknown>, c: TestContext = ctx) {
  const req = request(c.app).post('/v1/bots').set('X-API-Key', token);
  return body === undefined ? req : req.send(body);
}

/** `n` keys of the user that no process has verified yet. */
async function freshKeys(userId: number, n: number, c: TestContext = ctx): Promise<string[]> {
  const keys: string[] = [];
  for (let i = 0; i < n; i++) keys.push((await mintToken(c, userId, { scopes: ['bots:write'] })).token);
  return keys;
}

/**
 * `n` acquisitions at once, each with its own body, with keys of the user that this app has never
 * verified (KEY_SHARE requests a key). Why fresh keys: in one process, a request whose key is already
 * verified runs from its socket read to its reply without giving way to another (better-sqlite3 is
 * synchronous), so a "concurrent" burst with a warm key is served one request after another and proves
 * little. A never-seen key sends its requests through one bcrypt check, off the event loop; they come
 * back together and their admission steps interleave, which is the race under test.
 */
async function coldBurst(userId: number, n: number, body: (i: number) => Record<string, unknown> | undefined = () => undefined, c: TestContext = ctx) {
  const keys = await freshKeys(userId, Math.ceil(n / KEY_SHARE), c);
  return Promise.all(Array.from({ length: n }, (_, i) => acquire(keys[i % keys.length]!, body(i), c)));
}

const release = (token: string, id: number, c: TestContext = ctx) => request(c.app).delete(`/v1/bots/${id}`).set('X-API-Key', token);
const forceRelease = (id: number, c: TestContext = ctx) => request(c.app).delete(`/admin/bots/${id}`).set(admin);
const heartbeat = (token: string, id: number, c: TestContext = ctx) => request(c.app).post(`/v1/bots/${id}/heartbeat`).set('X-API-Key', token);

/** "201", "429 CONCURRENCY_LIMIT_EXCEEDED", "503 UNAVAILABLE", …: what a burst got, counted. */
function histogram(responses: Array<{ status: number; body: any }>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const r of responses) {
    const key = r.status < 400 ? String(r.status) : `${r.status} ${r.body?.error?.code ?? '?'}`;
    out[key] = (out[key] ?? 0) + 1;
  }
  return out;
}

function expected(created: number, refused: number, extra: Record<string, number> = {}): Record<string, number> {
  const out: Record<string, number> = { ...extra };
  if (created > 0) out['201'] = created;
  if (refused > 0) out[OVER_LIMIT] = refused;
  return out;
}

/** The exact 429: one envelope, `details: {limit, active}`, an integer Retry-After of at least 1 s. */
function expectLimitExceeded(res: request.Response, limit: number, active: number, retryAfter?: number): void {
  const error = expectError(res, 429, 'CONCURRENCY_LIMIT_EXCEEDED');
  expect(error.details).toEqual({ limit, active });
  const header = res.headers['retry-after'];
  expect(header).toMatch(/^[1-9][0-9]*$/);
  if (retryAfter !== undefined) expect(Number(header)).toBe(retryAfter);
}

/** Rows the database itself calls active (status), and of those, the ones whose lease is still ahead. */
async function dbActive(userId: number, c: TestContext = ctx): Promise<{ ids: number[]; unexpired: number }> {
  const rows = await c.storage.db
    .selectFrom('bots')
    .select(['id', 'expires_at'])
    .where('user_id', '=', userId)
    .where('status', '=', 'active')
    .orderBy('id')
    .execute();
  const now = c.clock.now().toISOString();
  return { ids: rows.map((r) => r.id), unexpired: rows.filter((r) => r.expires_at > now).length };
}

const sorted = (ids: number[]) => [...ids].sort((a, b) => a - b);

async function adminActiveBots(userId: number, c: TestContext = ctx): Promise<{ limit: number; active: number }> {
  const res = await request(c.app).get(`/admin/users/${userId}`).set(admin);
  expect(res.status).toBe(200);
  return { limit: res.body.max_concurrent_bots, active: res.body.active_bots };
}

async function myConcurrency(token: string, c: TestContext = ctx): Promise<{ limit: number; active: number; ids: number[] }> {
  const res = await request(c.app).get('/v1/bots').set('X-API-Key', token);
  expect(res.status).toBe(200);
  return { ...res.body.concurrency, ids: res.body.data.map((b: { id: number }) => b.id) };
}

/**
 * Polls a second connection to the database file between the app's own steps and remembers the most
 * active leases of the user it ever saw committed: "at every moment", not just at the end.
 */
function watchActive(path: string, userId: number, now: () => string) {
  const reader = new Database(path, { fileMustExist: true });
  reader.pragma('busy_timeout = 5000');
  const count = reader.prepare("select count(*) as n from bots where user_id = ? and status = 'active' and expires_at > ?");
  let max = 0;
  let samples = 0;
  let running = true;
  const tick = () => {
    if (!running) return;
    const { n } = count.get(userId, now()) as { n: number };
    max = Math.max(max, n);
    samples++;
    setImmediate(tick);
  };
  setImmediate(tick);
  return {
    stop: () => {
      running = false;
      reader.close();
      return { max, samples };
    },
  };
}

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

describe('a burst of acquisitions at the limit, in one process', () => {
  test('50 at once at a limit of 5: exactly 5 × 201 and 45 × 429, 30 rounds in a row (database file, WAL)', async () => {
    const { userId, token } = await runner();
    const ROUNDS = 30;
    for (let round = 0; round < ROUNDS; round++) {
      const now = ctx.clock.now().getTime();
      // Every request asks for its own lease length, so the 429s' Retry-After names the winners' shortest.
      const ttls = Array.from({ length: BURST }, (_, i) => 10 + ((i * 37 + round * 11) % 500));
      const responses = await coldBurst(userId, BURST, (i) => ({ ttl_seconds: ttls[i], label: `r${round}-${i}` }));

      expect({ round, ...histogram(responses) }).toEqual({ round, ...expected(LIMIT, BURST - LIMIT) });

      const created = responses.flatMap((r, i) => (r.status === 201 ? [{ res: r, ttl: ttls[i]!, label: `r${round}-${i}` }] : []));
      for (const { res, ttl, label } of created) {
        expect(res.body).toMatchObject({
          user_id: userId,
          status: 'active',
          label,
          ttl_seconds: ttl,
          created_at: iso(now),
          heartbeat_at: iso(now),
          expires_at: iso(now + ttl * 1000),
          ended_at: null,
          ended_by: null,
        });
        expect(res.headers.location).toBe(`/v1/bots/${res.body.id}`);
      }
      const createdIds = sorted(created.map((c) => c.res.body.id));
      expect(new Set(createdIds).size).toBe(LIMIT);

      // A 429 is only ever answered once all 5 winners hold their slots: Retry-After is exactly the
      // time until the first of them runs out.
      const shortest = Math.min(...created.map((c) => c.ttl));
      for (const res of responses.filter((r) => r.status === 429)) expectLimitExceeded(res, LIMIT, LIMIT, shortest);

      // The database agrees: exactly the 5 admitted rows are active, and nothing else was written.
      expect(await dbActive(userId)).toEqual({ ids: createdIds, unexpired: LIMIT });
      const rowsThisRound = await ctx.storage.db
        .selectFrom('bots')
        .select((eb) => eb.fn.countAll<number>().as('n'))
        .where('user_id', '=', userId)
        .where('label', 'like', `r${round}-%`)
        .executeTakeFirstOrThrow();
      expect(Number(rowsThisRound.n)).toBe(LIMIT);
      expect(await adminActiveBots(userId)).toEqual({ limit: LIMIT, active: LIMIT });
      const mine = await myConcurrency(token);
      expect(mine).toEqual({ limit: LIMIT, active: LIMIT, ids: createdIds });

      // Give every slot back (concurrently), and the next round starts from zero.
      const released = await Promise.all(createdIds.map((id) => release(token, id)));
      expect(released.map((r) => r.status)).toEqual(Array(LIMIT).fill(204));
      expect(await dbActive(userId)).toEqual({ ids: [], unexpired: 0 });
      ctx.clock.advance(1);
    }
    // 30 rounds of 50 requests: on a loaded 2-core machine that can take longer than jest's default.
  }, 120_000);

  test('the same on the in-memory database (10 rounds, fresh user each round)', async () => {
    const memory = await createTestApp({ env: { AUTH_FAILURES_PER_MINUTE: HIGH_AUTH_FAILURES } });
    extraContexts.push(memory);
    for (let round = 0; round < 10; round++) {
      const { userId } = await runner(LIMIT, memory);
      const responses = await coldBurst(userId, BURST, () => undefined, memory);
      expect({ round, ...histogram(responses) }).toEqual({ round, ...expected(LIMIT, BURST - LIMIT) });
      for (const res of responses.filter((r) => r.status === 429)) expectLimitExceeded(res, LIMIT, LIMIT, DEFAULT_TTL);
      const createdIds = sorted(responses.filter((r) => r.status === 201).map((r) => r.body.id));
      expect(await dbActive(userId, memory)).toEqual({ ids: createdIds, unexpired: LIMIT });
      expect(await adminActiveBots(userId, memory)).toEqual({ limit: LIMIT, active: LIMIT });
    }
  });

  test('the limit is per user, not per key: 7 keys of one user share 5 slots, and two users racing each get their own limit', async () => {
    const a = await runner(LIMIT);
    const b = await runner(3);
    for (let round = 0; round < 5; round++) {
      // Fresh keys every round (see coldBurst).
      const aKeys = await freshKeys(a.userId, Math.ceil(BURST / KEY_SHARE));
      const bKeys = await freshKeys(b.userId, Math.ceil(30 / KEY_SHARE));
      const requests = interleave(
        [
          ...Array.from({ length: BURST }, (_, i) => ({ who: 'a' as const, token: aKeys[i % aKeys.length]! })),
          ...Array.from({ length: 30 }, (_, i) => ({ who: 'b' as const, token: bKeys[i % bKeys.length]! })),
        ],
        round,
      );
      const responses = await Promise.all(requests.map((r) => acquire(r.token)));
      const of = (who: 'a' | 'b') => responses.filter((_, i) => requests[i]!.who === who);
      expect({ round, a: histogram(of('a')), b: histogram(of('b')) }).toEqual({
        round,
        a: expected(LIMIT, BURST - LIMIT),
        b: expected(3, 27),
      });
      for (const res of of('a').filter((r) => r.status === 429)) expectLimitExceeded(res, LIMIT, LIMIT, DEFAULT_TTL);
      for (const res of of('b').filter((r) => r.status === 429)) expectLimitExceeded(res, 3, 3, DEFAULT_TTL);
      expect((await dbActive(a.userId)).unexpired).toBe(LIMIT);
      expect((await dbActive(b.userId)).unexpired).toBe(3);
      for (const res of responses.filter((r) => r.status === 201)) {
        const owner = requests[responses.indexOf(res)]!.who === 'a' ? a : b;
        expect((await release(owner.token, res.body.id)).status).toBe(204);
      }
      ctx.clock.advance(1);
    }
  });

  test('one meeting at a time: 50 at once for the same meeting admit exactly one; the rest get 409 naming it', async () => {
    const { userId } = await runner();
    // Four meetings, one slot left free each time, so the only thing standing in the way is the meeting.
    for (let round = 0; round < LIMIT - 1; round++) {
      const body = { platform: 'google_meet', native_meeting_id: `abc-defg-${round}` };
      const responses = await coldBurst(userId, BURST, () => body);
      expect({ round, ...histogram(responses) }).toEqual({ round, '201': 1, '409 CONFLICT': BURST - 1 });
      const winner = responses.find((r) => r.status === 201)!.body.id;
      for (const res of responses.filter((r) => r.status === 409)) {
        expect(expectError(res, 409, 'CONFLICT').details).toEqual({ existing_id: winner });
      }
      const active = await dbActive(userId);
      expect(active.unexpired).toBe(round + 1);
      expect(active.ids).toContain(winner);
    }
    // Ten different meetings race for the last slot: one gets it, the other nine are over the limit.
    const responses = await coldBurst(userId, 10, (i) => ({ platform: 'google_meet', native_meeting_id: `other-${i}` }));
    expect(histogram(responses)).toEqual(expected(1, 9));
    for (const res of responses.filter((r) => r.status === 429)) expectLimitExceeded(res, LIMIT, LIMIT, DEFAULT_TTL);
    expect((await dbActive(userId)).unexpired).toBe(LIMIT);
  });
});

describe('two server processes sharing one database file', () => {
  const adminKey = randomBytes(32).toString('hex');
  const adminHeaders = { 'X-Admin-API-Key': adminKey };
  let servers: ServerProcess[] = [];
  let sharedPath: string;
  let reader: Database.Database;

  interface Result {
    server: number;
    status: number;
    body: any;
    retryAfter: string | null;
  }

  async function call(server: number, method: string, path: string, headers: Record<string, string>, body?: unknown): Promise<Result> {
    const res = await fetch(`${servers[server]!.baseUrl}${path}`, {
      method,
      headers: body === undefined ? headers : { 'Content-Type': 'application/json', ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    return { server, status: res.status, body: text === '' ? null : JSON.parse(text), retryAfter: res.headers.get('retry-after') };
  }

  function activeInFile(userId: number): number[] {
    const rows = reader
      .prepare("select id from bots where user_id = ? and status = 'active' and expires_at > ? order by id")
      .all(userId, new Date().toISOString()) as Array<{ id: number }>;
    return rows.map((r) => r.id);
  }

  function expectExactRefusal(r: Result, limit: number, active: number): void {
    expect(r.body).toEqual({
      error: { code: 'CONCURRENCY_LIMIT_EXCEEDED', message: expect.any(String), details: { limit, active }, request_id: expect.any(String) },
    });
    expect(r.retryAfter).toMatch(/^[1-9][0-9]*$/);
    expect(Number(r.retryAfter)).toBeLessThanOrEqual(DEFAULT_TTL);
  }

  async function twoProcessRunner(): Promise<Runner> {
    const user = await call(0, 'POST', '/admin/users', adminHeaders, {
      email: `runner-${randomBytes(4).toString('hex')}@example.com`,
      max_concurrent_bots: LIMIT,
      rate_limit_per_minute: HIGH_RATE,
    });
    expect(user.status).toBe(201);
    // Minted through the other process: both read the same file.
    const token = await call(1, 'POST', `/admin/users/${user.body.id}/tokens`, adminHeaders, { scopes: ['bots:read', 'bots:write'] });
    expect(token.status).toBe(201);
    // Each process verifies the key once before the race, so the race is about admission only.
    for (const s of [0, 1]) expect((await call(s, 'GET', '/v1/me', { 'X-API-Key': token.body.token })).status).toBe(200);
    return { userId: user.body.id, token: token.body.token };
  }

  beforeAll(async () => {
    assertBuilt();
    const dir = makeTempDir('bots-admission');
    sharedPath = join(dir, 'data', 'keyward.db');
    const env = {
      ADMIN_API_TOKEN: adminKey,
      DATABASE_PATH: sharedPath,
      BCRYPT_ROUNDS: '4',
      PORT: '0',
      HOST: '127.0.0.1',
      ADMIN_RATE_LIMIT_PER_MINUTE: String(HIGH_RATE),
      AUTH_FAILURES_PER_MINUTE: HIGH_AUTH_FAILURES,
    };
    // One after the other: the first one migrates the file, the second finds it migrated.
    servers = [await startServer({ env, cwd: dirname(dirname(sharedPath)) })];
    servers.push(await startServer({ env, cwd: dirname(dirname(sharedPath)) }));
    reader = new Database(sharedPath, { fileMustExist: true });
    reader.pragma('busy_timeout = 5000');
  });
  afterAll(async () => {
    reader?.close();
    await stopAllServers();
    removeTempDirs();
  });

  test('25 acquisitions at each process at once: exactly 5 × 201 in total, 45 exact 429s, 8 rounds', async () => {
    const { userId, token } = await twoProcessRunner();
    for (let round = 0; round < 8; round++) {
      // Even rounds: a key both processes already verified (each process serves its requests one after
      // another, so the race is between the processes). Odd rounds: keys neither has seen, KEY_SHARE
      // requests a key at each process, so the requests also interleave inside each process (see coldBurst).
      const keys = [token];
      if (round % 2 === 1) {
        keys.splice(0);
        for (let k = 0; k < Math.ceil(BURST / 2 / KEY_SHARE); k++) {
          keys.push((await call(k % 2, 'POST', `/admin/users/${userId}/tokens`, adminHeaders, { scopes: ['bots:write'] })).body.token);
        }
      }
      // Alternate the two processes in the order the requests leave.
      const results = await Promise.all(
        Array.from({ length: BURST }, (_, i) =>
          call(i % 2, 'POST', '/v1/bots', { 'X-API-Key': keys[Math.floor(i / 2) % keys.length]! }, { label: `p${round}-${i}` }),
        ),
      );
      expect({ round, ...histogram(results) }).toEqual({ round, ...expected(LIMIT, BURST - LIMIT) });
      for (const r of results.filter((x) => x.status === 429)) expectExactRefusal(r, LIMIT, LIMIT);

      const created = results.filter((r) => r.status === 201);
      const createdIds = sorted(created.map((r) => r.body.id));
      expect(new Set(createdIds).size).toBe(LIMIT);
      expect(activeInFile(userId)).toEqual(createdIds);
      for (const s of [0, 1]) {
        const user = await call(s, 'GET', `/admin/users/${userId}`, adminHeaders);
        expect({ server: s, active_bots: user.body.active_bots }).toEqual({ server: s, active_bots: LIMIT });
      }

      // Released through either process, the slots are free for both.
      const released = await Promise.all(createdIds.map((id, i) => call(i % 2, 'DELETE', `/v1/bots/${id}`, { 'X-API-Key': token })));
      expect(released.map((r) => r.status)).toEqual(Array(LIMIT).fill(204));
      expect(activeInFile(userId)).toEqual([]);
    }
  });

  test('releases racing acquisitions across both processes never let the count pass the limit, 8 rounds', async () => {
    const { userId, token } = await twoProcessRunner();
    const headers = { 'X-API-Key': token };
    const held: number[] = [];
    for (let i = 0; i < LIMIT; i++) {
      const r = await call(i % 2, 'POST', '/v1/bots', headers);
      expect(r.status).toBe(201);
      held.push(r.body.id);
    }
    let admittedInRaces = 0;
    for (let round = 0; round < 8; round++) {
      const ops = interleave(
        [
          ...held.map((id, i) => ({ kind: 'release' as const, id, server: i % 2 })),
          ...Array.from({ length: 20 }, (_, i) => ({ kind: 'acquire' as const, id: 0, server: i % 2 })),
        ],
        round,
      );
      const results = await Promise.all(
        ops.map((op) => (op.kind === 'release' ? call(op.server, 'DELETE', `/v1/bots/${op.id}`, headers) : call(op.server, 'POST', '/v1/bots', headers))),
      );
      const releases = results.filter((_, i) => ops[i]!.kind === 'release');
      const acquisitions = results.filter((_, i) => ops[i]!.kind === 'acquire');
      expect(releases.map((r) => r.status)).toEqual(Array(LIMIT).fill(204));
      const hist = histogram(acquisitions);
      expect(Object.keys(hist).filter((k) => k !== '201' && k !== OVER_LIMIT)).toEqual([]);
      const admitted = acquisitions.filter((r) => r.status === 201).map((r) => r.body.id);
      expect(admitted.length).toBeLessThanOrEqual(LIMIT);
      // A refusal only ever happens at a full house.
      for (const r of acquisitions.filter((x) => x.status === 429)) expectExactRefusal(r, LIMIT, LIMIT);
      expect(activeInFile(userId)).toEqual(sorted(admitted));
      admittedInRaces += admitted.length;

      held.splice(0, held.length, ...admitted);
      while (held.length < LIMIT) {
        const r = await call(held.length % 2, 'POST', '/v1/bots', headers);
        expect(r.status).toBe(201);
        held.push(r.body.id);
      }
      expect(activeInFile(userId)).toEqual(sorted(held));
    }
    // The race did happen: some acquisitions got a slot a release had just freed.
    expect(admittedInRaces).toBeGreaterThan(0);
  });
});

describe('a release racing an admission', () => {
  test('5 releases and 20 acquisitions at once never make more than 5 active, 20 rounds', async () => {
    const { userId, token } = await runner();
    const held: number[] = [];
    for (let i = 0; i < LIMIT; i++) held.push((await acquire(token).expect(201)).body.id);
    let admittedInRaces = 0;
    let samples = 0;
    for (let round = 0; round < 20; round++) {
      // The acquisitions come with a key never verified before (see coldBurst), the releases with a warm one.
      const fresh = await freshKeys(userId, Math.ceil(20 / KEY_SHARE));
      const watcher = watchActive(dbPath, userId, () => ctx.clock.now().toISOString());
      const ops = interleave(
        [
          // Some by the runner, some forced by the admin.
          ...held.map((id, i) => ({ kind: i < 3 ? ('release' as const) : ('force' as const), id })),
          ...Array.from({ length: 20 }, () => ({ kind: 'acquire' as const, id: 0 })),
        ],
        round,
      );
      const responses = await Promise.all(
        ops.map((op, i) => (op.kind === 'acquire' ? acquire(fresh[i % fresh.length]!) : op.kind === 'release' ? release(token, op.id) : forceRelease(op.id))),
      );
      const seen = watcher.stop();
      samples += seen.samples;

      const releases = responses.filter((_, i) => ops[i]!.kind !== 'acquire');
      const acquisitions = responses.filter((_, i) => ops[i]!.kind === 'acquire');
      expect(releases.map((r) => r.status)).toEqual(Array(LIMIT).fill(204));
      const hist = histogram(acquisitions);
      expect({ round, unexpected: Object.keys(hist).filter((k) => k !== '201' && k !== OVER_LIMIT) }).toEqual({ round, unexpected: [] });
      const admitted = acquisitions.filter((r) => r.status === 201).map((r) => r.body.id as number);
      expect(admitted.length).toBeLessThanOrEqual(LIMIT);
      for (const res of acquisitions.filter((r) => r.status === 429)) expectLimitExceeded(res, LIMIT, LIMIT);

      // Never more than 5 at any moment another connection looked, and exactly the admitted ones now.
      expect({ round, max: seen.max }).toEqual({ round, max: Math.min(seen.max, LIMIT) });
      expect(await dbActive(userId)).toEqual({ ids: sorted(admitted), unexpired: admitted.length });
      expect(await adminActiveBots(userId)).toEqual({ limit: LIMIT, active: admitted.length });
      // The released ones say by whom.
      const ended = await ctx.storage.db.selectFrom('bots').select(['id', 'status', 'ended_by']).where('id', 'in', held).orderBy('id').execute();
      expect(ended).toEqual(
        sorted(held).map((id) => ({ id, status: 'released', ended_by: held.indexOf(id) < 3 ? 'user' : 'admin' })),
      );
      admittedInRaces += admitted.length;

      held.splice(0, held.length, ...admitted);
      while (held.length < LIMIT) held.push((await acquire(token).expect(201)).body.id);
      // Full again: the next one is refused.
      expectLimitExceeded(await acquire(token), LIMIT, LIMIT, DEFAULT_TTL);
      ctx.clock.advance(1);
    }
    expect(admittedInRaces).toBeGreaterThan(0);
    expect(samples).toBeGreaterThan(20);
  });
});

describe('leases that run out during a burst', () => {
  test('5 leases of 60 s, 60 s later: 50 at once admit exactly 5, and the old rows are marked expired as of when they ran out', async () => {
    const { userId, token } = await runner();
    const T0 = ctx.clock.now().getTime();
    const old: number[] = [];
    for (let i = 0; i < LIMIT; i++) old.push((await acquire(token, { ttl_seconds: 60 }).expect(201)).body.id);
    const oldExpiry = iso(T0 + 60_000);

    // One second before: still all taken, and the first frees up in 1 s.
    ctx.clock.advance(59);
    const early = await coldBurst(userId, 20);
    expect(histogram(early)).toEqual(expected(0, 20));
    for (const res of early) expectLimitExceeded(res, LIMIT, LIMIT, 1);

    // On the dot: expires_at <= now is run out.
    ctx.clock.advance(1);
    const burst = await coldBurst(userId, BURST);
    expect(histogram(burst)).toEqual(expected(LIMIT, BURST - LIMIT));
    for (const res of burst.filter((r) => r.status === 429)) expectLimitExceeded(res, LIMIT, LIMIT, DEFAULT_TTL);
    const fresh = sorted(burst.filter((r) => r.status === 201).map((r) => r.body.id));
    expect(await dbActive(userId)).toEqual({ ids: fresh, unexpired: LIMIT });

    const oldRows = await ctx.storage.db.selectFrom('bots').select(['id', 'status', 'ended_by', 'ended_at', 'expires_at']).where('id', 'in', old).orderBy('id').execute();
    expect(oldRows).toEqual(old.map((id) => ({ id, status: 'expired', ended_by: 'expiry', ended_at: oldExpiry, expires_at: oldExpiry })));
    const listed = await request(ctx.app).get(`/admin/users/${userId}/bots`).query({ status: 'expired' }).set(admin);
    expect(listed.status).toBe(200);
    expect(listed.body.data.map((b: { id: number; ended_by: string; ended_at: string }) => [b.id, b.ended_by, b.ended_at])).toEqual(
      old.map((id) => [id, 'expiry', oldExpiry]),
    );
    // A run-out lease cannot be renewed: its slot is someone else's now.
    expectError(await heartbeat(token, old[0]!), 409, 'CONFLICT');

    // And again, round after round: each burst finds the previous winners run out some while ago, and
    // marks them as of when they ran out, not as of now.
    for (let round = 0; round < 5; round++) {
      const before = (await dbActive(userId)).ids;
      const ranOutAt = iso(ctx.clock.now().getTime() + DEFAULT_TTL * 1000);
      ctx.clock.advance(DEFAULT_TTL + 7 * (round + 1));
      const again = await coldBurst(userId, BURST);
      expect({ round, ...histogram(again) }).toEqual({ round, ...expected(LIMIT, BURST - LIMIT) });
      for (const res of again.filter((r) => r.status === 429)) expectLimitExceeded(res, LIMIT, LIMIT, DEFAULT_TTL);
      expect((await dbActive(userId)).unexpired).toBe(LIMIT);
      const previous = await ctx.storage.db.selectFrom('bots').select(['status', 'ended_by', 'ended_at']).where('id', 'in', before).execute();
      expect(previous).toEqual(before.map(() => ({ status: 'expired', ended_by: 'expiry', ended_at: ranOutAt })));
    }
  });

  test('a mix: 2 ran out 15 s ago, 3 still running → exactly 2 admitted, Retry-After until the next one runs out', async () => {
    const { userId, token } = await runner();
    const T0 = ctx.clock.now().getTime();
    const short: number[] = [];
    const long: number[] = [];
    for (let i = 0; i < 2; i++) short.push((await acquire(token, { ttl_seconds: 60 }).expect(201)).body.id);
    for (let i = 0; i < 3; i++) long.push((await acquire(token, { ttl_seconds: 120 }).expect(201)).body.id);
    ctx.clock.advance(75);

    const burst = await coldBurst(userId, BURST);
    expect(histogram(burst)).toEqual(expected(2, BURST - 2));
    // The 3 long ones run out at T0+120, 45 s from now: before any new lease does.
    for (const res of burst.filter((r) => r.status === 429)) expectLimitExceeded(res, LIMIT, LIMIT, 45);
    const fresh = burst.filter((r) => r.status === 201).map((r) => r.body.id as number);
    expect(await dbActive(userId)).toEqual({ ids: sorted([...long, ...fresh]), unexpired: LIMIT });
    const shortRows = await ctx.storage.db.selectFrom('bots').select(['status', 'ended_by', 'ended_at']).where('id', 'in', short).execute();
    expect(shortRows).toEqual(short.map(() => ({ status: 'expired', ended_by: 'expiry', ended_at: iso(T0 + 60_000) })));
    const longRows = await ctx.storage.db.selectFrom('bots').select(['status', 'ended_by', 'ended_at']).where('id', 'in', long).execute();
    expect(longRows).toEqual(long.map(() => ({ status: 'active', ended_by: null, ended_at: null })));
    expect(await adminActiveBots(userId)).toEqual({ limit: LIMIT, active: LIMIT });
  });

  test('a heartbeat keeps a lease in the count: of 5 leases of 60 s, the 2 renewed at 30 s survive and only 3 slots free up', async () => {
    const { userId, token } = await runner();
    const held: number[] = [];
    for (let i = 0; i < LIMIT; i++) held.push((await acquire(token, { ttl_seconds: 60 }).expect(201)).body.id);
    ctx.clock.advance(30);
    for (const id of held.slice(0, 2)) expect((await heartbeat(token, id)).status).toBe(200);
    ctx.clock.advance(30);

    const burst = await coldBurst(userId, BURST);
    expect(histogram(burst)).toEqual(expected(3, BURST - 3));
    // The renewed ones run out at 90 s, 30 s from now.
    for (const res of burst.filter((r) => r.status === 429)) expectLimitExceeded(res, LIMIT, LIMIT, 30);
    const fresh = burst.filter((r) => r.status === 201).map((r) => r.body.id as number);
    expect(await dbActive(userId)).toEqual({ ids: sorted([...held.slice(0, 2), ...fresh]), unexpired: LIMIT });
  });
});

describe('changing the limit under running bots', () => {
  async function fiveRunning(): Promise<Runner & { held: number[] }> {
    const r = await runner();
    const held: number[] = [];
    // Distinct lease lengths: the earliest runs out in 100 s.
    for (let i = 0; i < LIMIT; i++) held.push((await acquire(r.token, { ttl_seconds: 100 + 100 * i }).expect(201)).body.id);
    return { ...r, held };
  }

  const setLimit = async (userId: number, limit: number) => {
    const res = await request(ctx.app).patch(`/admin/users/${userId}`).set(admin).send({ max_concurrent_bots: limit });
    expect(res.status).toBe(200);
    return res.body;
  };

  test('lowering it below the active count stops new admissions and leaves the running bots alone', async () => {
    const { userId, token, held } = await fiveRunning();
    expect(await setLimit(userId, 2)).toMatchObject({ max_concurrent_bots: 2, active_bots: LIMIT });

    const refused = await coldBurst(userId, 20);
    expect(histogram(refused)).toEqual(expected(0, 20));
    // A slot frees up only once four of the five leases have ended (100, 200, 300, 400 s).
    for (const res of refused) expectLimitExceeded(res, 2, LIMIT, 400);

    // Still running, still renewable.
    expect(await dbActive(userId)).toEqual({ ids: sorted(held), unexpired: LIMIT });
    ctx.clock.advance(10);
    for (const id of held) {
      const res = await heartbeat(token, id);
      expect(res.status).toBe(200);
      expect(res.body).toMatchObject({ status: 'active', heartbeat_at: ctx.clock.now().toISOString() });
    }
    expect(await myConcurrency(token)).toEqual({ limit: 2, active: LIMIT, ids: held });
    // Renewed for their own 100..500 s from now: the fourth to run out does so in 400 s again.
    expectLimitExceeded(await acquire(token), 2, LIMIT, 400);

    // Releasing down to the new limit is still not enough…
    for (const id of held.slice(0, 3)) expect((await release(token, id)).status).toBe(204);
    const atLimit = await coldBurst(userId, 10);
    expect(histogram(atLimit)).toEqual(expected(0, 10));
    for (const res of atLimit) expectLimitExceeded(res, 2, 2);
    // …one below it frees exactly one slot, however many ask at once.
    expect((await release(token, held[3]!)).status).toBe(204);
    const oneFree = await coldBurst(userId, 10);
    expect(histogram(oneFree)).toEqual(expected(1, 9));
    for (const res of oneFree.filter((r) => r.status === 429)) expectLimitExceeded(res, 2, 2);

    // Raising it again admits exactly the difference.
    expect(await setLimit(userId, LIMIT)).toMatchObject({ max_concurrent_bots: LIMIT, active_bots: 2 });
    const raised = await coldBurst(userId, 20);
    expect(histogram(raised)).toEqual(expected(3, 17));
    for (const res of raised.filter((r) => r.status === 429)) expectLimitExceeded(res, LIMIT, LIMIT);
    expect((await dbActive(userId)).unexpired).toBe(LIMIT);
  });

  test('a limit of 0 refuses every acquisition, with Retry-After 60 when nothing is running', async () => {
    const { userId, token } = await runner(0);
    const responses = await coldBurst(userId, 20);
    expect(histogram(responses)).toEqual(expected(0, 20));
    for (const res of responses) {
      expectLimitExceeded(res, 0, 0, 60);
      expect(res.body.error.message).toMatch(/max_concurrent_bots is 0/);
    }
    const rows = await ctx.storage.db.selectFrom('bots').select('id').where('user_id', '=', userId).execute();
    expect(rows).toEqual([]);
    expect(await myConcurrency(token)).toEqual({ limit: 0, active: 0, ids: [] });
  });

  test('lowering it to 0 with bots running refuses everything and leaves them running', async () => {
    const { userId, token, held } = await fiveRunning();
    expect(await setLimit(userId, 0)).toMatchObject({ max_concurrent_bots: 0, active_bots: LIMIT });
    const responses = await coldBurst(userId, 20);
    expect(histogram(responses)).toEqual(expected(0, 20));
    for (const res of responses) expectLimitExceeded(res, 0, LIMIT);
    for (const id of held) expect((await heartbeat(token, id)).status).toBe(200);
    for (const id of held) expect((await release(token, id)).status).toBe(204);
    expectLimitExceeded(await acquire(token), 0, 0, 60);
    expect(await dbActive(userId)).toEqual({ ids: [], unexpired: 0 });
  });
});

describe('the write transaction admission runs in', () => {
  /**
   * What makes admission exact across processes: the transaction takes the write lock before its first
   * read (SQLite BEGIN IMMEDIATE), so a second connection cannot even start its count while the first
   * is between its count and its insert. A deferred BEGIN would let it count a state that is about to
   * change. Two connections to one file stand in for two processes; the first one pauses mid-step.
   */
  test('a second connection cannot begin its count while the first is between its count and its insert', async () => {
    const { userId } = await runner(1);
    const other = openSqlite(dbPath);
    let resume: () => void = () => undefined;
    let first: Promise<unknown> = Promise.resolve();
    try {
      // Fail fast instead of the usual 5 s: this test holds the lock on purpose.
      await sql`pragma busy_timeout = 200`.execute(other.db);
      const now = ctx.clock.now().toISOString();
      const row = () => ({
        user_id: userId, token_id: null, platform: null, native_meeting_id: null, label: null, metadata: null,
        status: 'active' as const, ttl_seconds: DEFAULT_TTL, created_at: now, heartbeat_at: now,
        expires_at: iso(Date.parse(now) + DEFAULT_TTL * 1000), ended_at: null, ended_by: null,
      });

      let counted!: () => void;
      const hasCounted = new Promise<void>((r) => (counted = r));
      const paused = new Promise<void>((r) => (resume = r));
      first = writeTransaction(ctx.storage.db, async (trx) => {
        const active = await countActiveLeases(trx, userId, now);
        counted();
        await paused;
        return active < 1 ? insertBot(trx, row()) : undefined;
      });
      await hasCounted;

      let secondCounted: number | undefined;
      const second = await writeTransaction(other.db, async (trx) => {
        const counted = await countActiveLeases(trx, userId, now);
        secondCounted = counted;
        return counted < 1 ? insertBot(trx, row()) : undefined;
      }).then(
        (value) => ({ value, error: undefined as unknown }),
        (error: unknown) => ({ value: undefined, error }),
      );
      // Refused at BEGIN (busy, which the API answers with 503 and a retry), before counting anything.
      expect(secondCounted).toBeUndefined();
      expect(second.value).toBeUndefined();
      expect(isStorageUnavailable(second.error)).toBe(true);

      resume();
      expect(await first).toMatchObject({ user_id: userId, status: 'active' });
      // Once the first has committed, the second counts its row and does not insert a second one.
      const retried = await writeTransaction(other.db, async (trx) => {
        const active = await countActiveLeases(trx, userId, now);
        return active < 1 ? insertBot(trx, row()) : active;
      });
      expect(retried).toBe(1);
      expect((await dbActive(userId)).ids).toHaveLength(1);
    } finally {
      // Whatever happened above, the first transaction ends before the connections close.
      resume();
      await first.catch(() => undefined);
      await other.close();
    }
  });
});

// These once failed: every request with a key not yet verified counted as a wrong attempt until bcrypt
// said otherwise, so a runner pool's first burst was refused with RATE_LIMITED.
describe("a valid key's first requests, sent at once, are never refused by the wrong-key limits", () => {
  /**
   * A process has not verified a key yet after a restart, on a second process, or when the key is new.
   * A runner pool starting its bots at once then sends many first requests with one good key. They must
   * get what admission decides (201 or CONCURRENCY_LIMIT_EXCEEDED), never RATE_LIMITED: the wrong-key
   * limits are for wrong keys. Today each such request counts as a failed attempt until the shared
   * bcrypt check says otherwise, so the eleventh concurrent one is refused by the per-key limit (ten),
   * and the twenty-first from one address by AUTH_FAILURES_PER_MINUTE.
   */
  test('20 at once with one key this process has not verified: 5 × 201 and 15 × CONCURRENCY_LIMIT_EXCEEDED', async () => {
    const { userId } = await runner();
    const [key] = await freshKeys(userId, 1);
    const responses = await Promise.all(Array.from({ length: 20 }, () => acquire(key!)));
    expect(histogram(responses)).toEqual(expected(LIMIT, 15));
  });

  test('30 at once from one address with the default limits (6 unverified keys, 5 requests each): no RATE_LIMITED', async () => {
    const defaults = await fileBackedApp({});
    extraContexts.push(defaults.ctx);
    expect(defaults.ctx.config.authFailuresPerMinute).toBe(20);
    const { userId } = await runner(LIMIT, defaults.ctx);
    const keys = await freshKeys(userId, 6, defaults.ctx);
    const responses = await Promise.all(Array.from({ length: 30 }, (_, i) => acquire(keys[i % keys.length]!, undefined, defaults.ctx)));
    expect(histogram(responses)).toEqual(expected(LIMIT, 25));
  });
});
