import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import Database from 'better-sqlite3';
import { sql } from 'kysely';
import request from 'supertest';
import type { Db } from '../db/database';
import { createLogger } from '../src/logger';
import { LAST_USE_FLUSH_MS, LastUseRecorder } from '../src/tokens/last-use';
import { checksum, randomBase62 } from '../src/tokens/token-format';
import { admin, createTestApp, createUser, expectError, FakeClock, mintToken, type TestContext } from './helpers/app';
import { assertBuilt, makeTempDir, removeTempDirs, startServer, stopAllServers } from './helpers/server-process';

/**
 * last_used_at / last_used_ip: shown in every listing, but never written on the hot path. Uses are
 * coalesced in memory (ctx.app.lastUse) and written in one transaction every few seconds and at
 * shutdown; listings read the pending value so this process never shows a stale one.
 */

const T0 = '2026-01-01T00:00:00.000Z';

let ctx: TestContext;
const extraContexts: TestContext[] = [];
beforeEach(async () => {
  ctx = await createTestApp({ env: { TRUST_PROXY: 'loopback' } });
});
afterEach(async () => {
  await ctx.close();
  for (const c of extraContexts.splice(0)) await c.close();
});

const lastUseRow = (id: number, c: TestContext = ctx) =>
  c.storage.db.selectFrom('tokens').select(['last_used_at', 'last_used_ip']).where('id', '=', id).executeTakeFirstOrThrow();

/**
 * What a test compares to see how many rows a step wrote, every table, triggers included. On SQLite,
 * the changes counted on the app's one connection (total_changes()); on PostgreSQL, with its many
 * connections, the text of every row of every table.
 */
type Snapshot = number | Set<string>;
const TABLES = ['users', 'tokens', 'bots', 'audit_events', 'usage_daily'];

async function snapshot(c: TestContext = ctx): Promise<Snapshot> {
  if (c.storage.dialect === 'postgres') {
    const rows = new Set<string>();
    for (const t of TABLES) for (const r of (await sql<{ x: string }>`select ${t} || x::text as x from ${sql.table(t)} x`.execute(c.storage.db)).rows) rows.add(r.x);
    return rows;
  }
  const { rows } = await sql<{ n: number }>`select total_changes() as n`.execute(c.storage.db);
  return rows[0]!.n;
}

/** Rows written (inserted or changed) since the snapshot. */
async function rowsChangedSince(before: Snapshot, c: TestContext = ctx): Promise<number> {
  const now = await snapshot(c);
  if (typeof before === 'number') return (now as number) - before;
  return [...(now as Set<string>)].filter((r) => !before.has(r)).length;
}

const me = (token: string, headers: Record<string, string> = {}) => request(ctx.app).get('/v1/me').set('X-API-Key', token).set(headers);

function wrongSecret(token: string): string {
  const body = `${token.slice(0, token.length - 38)}${randomBase62(32)}`;
  return body + checksum(body);
}

const silentLogger = () => createLogger('silent');

describe('recording a use', () => {
  test('a request writes nothing, yet every listing already shows its time (fake clock) and address', async () => {
    const user = await createUser(ctx);
    const used = await mintToken(ctx, user.id);
    const lister = await mintToken(ctx, user.id, { scopes: ['tokens:read'] });
    ctx.clock.advance(42);
    const before = await snapshot();

    expect((await me(used.token)).status).toBe(200);

    expect(await rowsChangedSince(before)).toBe(0);
    expect(await lastUseRow(used.id)).toEqual({ last_used_at: null, last_used_ip: null });
    const expected = { last_used_at: '2026-01-01T00:00:42.000Z', last_used_ip: '127.0.0.1' };

    expect((await request(ctx.app).get(`/admin/tokens/${used.id}`).set(admin)).body).toMatchObject(expected);
    const byUser = await request(ctx.app).get(`/admin/users/${user.id}/tokens`).set(admin);
    expect(byUser.body.data.find((t: { id: number }) => t.id === used.id)).toMatchObject(expected);
    const all = await request(ctx.app).get('/admin/tokens').set(admin);
    expect(all.body.data.find((t: { id: number }) => t.id === used.id)).toMatchObject(expected);

    ctx.clock.advance(8);
    const mine = await request(ctx.app).get('/v1/tokens').set('X-API-Key', lister.token);
    expect(mine.status).toBe(200);
    const byId = new Map<number, unknown>(mine.body.data.map((t: { id: number }) => [t.id, t]));
    expect(byId.get(used.id)).toMatchObject(expected);
    // The listing request is itself a use of the key that makes it.
    expect(byId.get(lister.id)).toMatchObject({ last_used_at: '2026-01-01T00:00:50.000Z', last_used_ip: '127.0.0.1' });

    // Reads are not writes either.
    expect(await rowsChangedSince(before)).toBe(0);
    expect(await lastUseRow(used.id)).toEqual({ last_used_at: null, last_used_ip: null });
  });

  test('a token never used shows null', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    await ctx.app.lastUse.flush();
    const res = await request(ctx.app).get(`/admin/tokens/${minted.id}`).set(admin);
    expect(res.body).toMatchObject({ last_used_at: null, last_used_ip: null });
  });

  test('flush() writes the pending use to the row, and listings keep showing it from there', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    ctx.clock.advance(5);
    await me(minted.token).expect(200);
    const before = await snapshot();

    await ctx.app.lastUse.flush();

    expect(await lastUseRow(minted.id)).toEqual({ last_used_at: '2026-01-01T00:00:05.000Z', last_used_ip: '127.0.0.1' });
    expect(await rowsChangedSince(before)).toBe(1);
    expect(ctx.app.lastUse.pending(minted.id)).toBeUndefined();
    const res = await request(ctx.app).get(`/admin/tokens/${minted.id}`).set(admin);
    expect(res.body).toMatchObject({ last_used_at: '2026-01-01T00:00:05.000Z', last_used_ip: '127.0.0.1' });

    // Nothing new to write: a second flush touches no row.
    await ctx.app.lastUse.flush();
    expect(await rowsChangedSince(before)).toBe(1);
  });

  test('many requests are one row update, carrying the latest time and address', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    const before = await snapshot();
    for (const [i, ip] of ['10.0.0.1', '10.0.0.2', '10.0.0.3', '2001:db8::7', '10.0.0.5'].entries()) {
      ctx.clock.advance(i + 1);
      await me(minted.token, { 'X-Forwarded-For': ip }).expect(200);
    }
    expect(await rowsChangedSince(before)).toBe(0);
    expect(ctx.app.lastUse.pending(minted.id)).toEqual({ at: '2026-01-01T00:00:15.000Z', ip: '10.0.0.5' });

    await ctx.app.lastUse.flush();

    expect(await rowsChangedSince(before)).toBe(1);
    expect(await lastUseRow(minted.id)).toEqual({ last_used_at: '2026-01-01T00:00:15.000Z', last_used_ip: '10.0.0.5' });
  });

  test('several tokens are written in one flush, each with its own last use', async () => {
    const user = await createUser(ctx);
    const a = await mintToken(ctx, user.id);
    const b = await mintToken(ctx, user.id);
    const unused = await mintToken(ctx, user.id);
    await me(a.token, { 'X-Forwarded-For': '10.0.0.1' }).expect(200);
    ctx.clock.advance(3);
    await me(b.token, { 'X-Forwarded-For': '10.0.0.2' }).expect(200);
    ctx.clock.advance(3);
    await me(a.token, { 'X-Forwarded-For': '10.0.0.3' }).expect(200);
    const before = await snapshot();

    await ctx.app.lastUse.flush();

    expect(await rowsChangedSince(before)).toBe(2);
    expect(await lastUseRow(a.id)).toEqual({ last_used_at: '2026-01-01T00:00:06.000Z', last_used_ip: '10.0.0.3' });
    expect(await lastUseRow(b.id)).toEqual({ last_used_at: '2026-01-01T00:00:03.000Z', last_used_ip: '10.0.0.2' });
    expect(await lastUseRow(unused.id)).toEqual({ last_used_at: null, last_used_ip: null });
  });

  test('a later use after a flush is pending again and written by the next flush', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    await me(minted.token).expect(200);
    await ctx.app.lastUse.flush();
    ctx.clock.advance(60);
    await me(minted.token, { 'X-Forwarded-For': '192.0.2.1' }).expect(200);
    expect(await lastUseRow(minted.id)).toEqual({ last_used_at: T0, last_used_ip: '127.0.0.1' });
    expect((await request(ctx.app).get(`/admin/tokens/${minted.id}`).set(admin)).body).toMatchObject({
      last_used_at: '2026-01-01T00:01:00.000Z',
      last_used_ip: '192.0.2.1',
    });
    await ctx.app.lastUse.flush();
    expect(await lastUseRow(minted.id)).toEqual({ last_used_at: '2026-01-01T00:01:00.000Z', last_used_ip: '192.0.2.1' });
  });
});

describe('a flush never moves last_used_at backwards', () => {
  test('a row already holding a later use (another process flushed first) keeps it, address included', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    const later = { last_used_at: '2026-01-01T00:10:00.000Z', last_used_ip: '198.51.100.1' };
    await ctx.storage.db.updateTable('tokens').set(later).where('id', '=', minted.id).execute();

    await me(minted.token).expect(200);
    await ctx.app.lastUse.flush();

    expect(await lastUseRow(minted.id)).toEqual(later);
    expect((await request(ctx.app).get(`/admin/tokens/${minted.id}`).set(admin)).body).toMatchObject(later);
  });

  test('two recorders flushing out of order leave the newest use', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    const early = new FakeClock(Date.parse('2026-01-01T00:00:05.000Z'));
    const late = new FakeClock(Date.parse('2026-01-01T00:00:09.000Z'));
    const a = new LastUseRecorder({ db: ctx.storage.db, clock: late, logger: silentLogger(), table: 'tokens' });
    const b = new LastUseRecorder({ db: ctx.storage.db, clock: early, logger: silentLogger(), table: 'tokens' });
    a.record(minted.id, '10.0.0.9');
    b.record(minted.id, '10.0.0.5');

    await a.flush();
    await b.flush();
    expect(await lastUseRow(minted.id)).toEqual({ last_used_at: '2026-01-01T00:00:09.000Z', last_used_ip: '10.0.0.9' });

    // The same instant is not newer either: the first writer's address stays.
    const same = new LastUseRecorder({ db: ctx.storage.db, clock: late, logger: silentLogger(), table: 'tokens' });
    same.record(minted.id, '10.0.0.1');
    await same.flush();
    expect(await lastUseRow(minted.id)).toEqual({ last_used_at: '2026-01-01T00:00:09.000Z', last_used_ip: '10.0.0.9' });
  });
});

describe('failed requests are not uses', () => {
  async function expectNoUse(id: number) {
    expect(ctx.app.lastUse.pending(id)).toBeUndefined();
    expect((await request(ctx.app).get(`/admin/tokens/${id}`).set(admin)).body).toMatchObject({ last_used_at: null, last_used_ip: null });
    await ctx.app.lastUse.flush();
    expect(await lastUseRow(id)).toEqual({ last_used_at: null, last_used_ip: null });
  }

  test('a wrong secret for the token\'s selector', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    expectError(await me(wrongSecret(minted.token)), 401, 'INVALID_API_KEY');
    await expectNoUse(minted.id);
  });

  test('a request from outside the allowlist (FORBIDDEN_IP)', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { allowed_ips: ['10.0.0.0/8'] });
    expectError(await me(minted.token, { 'X-Forwarded-For': '192.0.2.1' }), 403, 'FORBIDDEN_IP');
    await expectNoUse(minted.id);
  });

  test('a revoked token', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    await request(ctx.app).delete(`/admin/tokens/${minted.id}`).set(admin).expect(204);
    expectError(await me(minted.token), 401, 'API_KEY_REVOKED');
    await expectNoUse(minted.id);
  });

  test('an expired token', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { expires_in: 60 });
    ctx.clock.advance(60);
    expectError(await me(minted.token), 401, 'API_KEY_EXPIRED');
    await expectNoUse(minted.id);
  });

  test('a disabled user\'s token', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: true }).expect(200);
    expectError(await me(minted.token), 403, 'USER_DISABLED');
    await expectNoUse(minted.id);
  });

  test('a failure after a success does not overwrite the successful use', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { allowed_ips: ['127.0.0.1'] });
    await me(minted.token).expect(200);
    ctx.clock.advance(30);
    expectError(await me(minted.token, { 'X-Forwarded-For': '192.0.2.1' }), 403, 'FORBIDDEN_IP');
    expectError(await me(wrongSecret(minted.token)), 401, 'INVALID_API_KEY');
    expect(ctx.app.lastUse.pending(minted.id)).toEqual({ at: T0, ip: '127.0.0.1' });
    await ctx.app.lastUse.flush();
    expect(await lastUseRow(minted.id)).toEqual({ last_used_at: T0, last_used_ip: '127.0.0.1' });
  });
});

describe('when uses are written', () => {
  test('the flush interval is a few seconds', () => {
    expect(LAST_USE_FLUSH_MS).toBeGreaterThanOrEqual(1_000);
    expect(LAST_USE_FLUSH_MS).toBeLessThanOrEqual(10_000);
  });

  test('the app writes pending uses on its own once the interval has passed, not before', async () => {
    // Only the interval timer is faked: sockets, SQLite and promises run for real.
    jest.useFakeTimers({
      doNotFake: [
        'Date', 'hrtime', 'nextTick', 'performance', 'queueMicrotask', 'requestAnimationFrame', 'cancelAnimationFrame',
        'requestIdleCallback', 'cancelIdleCallback', 'setImmediate', 'clearImmediate', 'setTimeout', 'clearTimeout',
      ],
    });
    let timed: TestContext | undefined;
    try {
      timed = await createTestApp();
      const user = await createUser(timed);
      const minted = await mintToken(timed, user.id);
      await request(timed.app).get('/v1/me').set('X-API-Key', minted.token).expect(200);

      jest.advanceTimersByTime(LAST_USE_FLUSH_MS - 1);
      // Long enough in real time for a flush, had one started, to land even on PostgreSQL.
      expect(await rowOnceWritten(minted.id, timed, 500)).toEqual({ last_used_at: null, last_used_ip: null });

      jest.advanceTimersByTime(1);
      // The timer's own flush, nothing else, writes it; on PostgreSQL that is a few round trips away.
      expect(await rowOnceWritten(minted.id, timed)).toEqual({ last_used_at: T0, last_used_ip: '127.0.0.1' });
    } finally {
      await timed?.close();
      jest.useRealTimers();
    }
  });

  test('stop() writes what is pending (the shutdown path) and stops the timer', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    const recorder = new LastUseRecorder({ db: ctx.storage.db, clock: ctx.clock, logger: silentLogger(), table: 'tokens' });
    recorder.start(60_000);
    recorder.record(minted.id, '203.0.113.4');
    await recorder.stop();
    expect(await lastUseRow(minted.id)).toEqual({ last_used_at: T0, last_used_ip: '203.0.113.4' });
  });

  test('a failed flush keeps its uses for the next one, unless a newer use of the token arrived meanwhile', async () => {
    const user = await createUser(ctx);
    const a = await mintToken(ctx, user.id);
    const b = await mintToken(ctx, user.id);
    let failNext = true;
    let flushStarted: () => void = () => undefined;
    const started = new Promise<void>((resolve) => (flushStarted = resolve));
    let release: () => void = () => undefined;
    const released = new Promise<void>((resolve) => (release = resolve));
    // The real database, except that the next transaction fails after a pause.
    const flaky = new Proxy(ctx.storage.db, {
      get(target, prop, receiver) {
        if (prop === 'transaction' && failNext) {
          failNext = false;
          return () => ({
            execute: async () => {
              flushStarted();
              await released;
              throw new Error('SQLITE_BUSY: database is locked');
            },
          });
        }
        const value: unknown = Reflect.get(target, prop, receiver);
        return typeof value === 'function' ? value.bind(target) : value;
      },
    }) as Db;
    const clock = new FakeClock();
    const recorder = new LastUseRecorder({ db: flaky, clock, logger: silentLogger(), table: 'tokens' });
    recorder.record(a.id, '10.0.0.1');
    recorder.record(b.id, '10.0.0.2');

    const failing = recorder.flush();
    await started;
    // While a flush is on its way, listings still see the uses it carries.
    expect(recorder.pending(a.id)).toEqual({ at: T0, ip: '10.0.0.1' });
    clock.advance(10);
    recorder.record(b.id, '10.0.0.22');
    release();
    await failing;

    expect(await lastUseRow(a.id)).toEqual({ last_used_at: null, last_used_ip: null });
    expect(recorder.pending(a.id)).toEqual({ at: T0, ip: '10.0.0.1' });
    expect(recorder.pending(b.id)).toEqual({ at: '2026-01-01T00:00:10.000Z', ip: '10.0.0.22' });

    await recorder.flush();
    expect(await lastUseRow(a.id)).toEqual({ last_used_at: T0, last_used_ip: '10.0.0.1' });
    expect(await lastUseRow(b.id)).toEqual({ last_used_at: '2026-01-01T00:00:10.000Z', last_used_ip: '10.0.0.22' });
  });
});

/** The row once a flush has written it, waiting up to `waitMs` of real time; the unwritten row after that. */
async function rowOnceWritten(id: number, c: TestContext, waitMs = 5_000) {
  const deadline = Date.now() + waitMs;
  for (;;) {
    const row = await lastUseRow(id, c);
    if (row.last_used_at !== null || Date.now() > deadline) return row;
    await new Promise<void>((resolve) => setTimeout(resolve, 10));
  }
}

describe('the real server process writes pending uses at shutdown', () => {
  beforeAll(() => {
    assertBuilt();
  });
  afterEach(async () => {
    await stopAllServers();
  });
  afterAll(() => {
    removeTempDirs();
  });

  test('one request, SIGTERM well before the flush interval, exit 0: the row has the use', async () => {
    const dir = makeTempDir('last-use');
    const adminKey = randomBytes(32).toString('hex');
    const databasePath = join(dir, 'data', 'keyward.db');
    const server = await startServer({
      env: { ADMIN_API_TOKEN: adminKey, DATABASE_PATH: databasePath, BCRYPT_ROUNDS: '4', PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'info' },
      cwd: dir,
    });
    const listeningAt = Date.now();
    const post = (path: string, body: unknown) =>
      fetch(`${server.baseUrl}${path}`, {
        method: 'POST',
        headers: { 'X-Admin-API-Key': adminKey, 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
    const user = (await (await post('/admin/users', { email: 'last-use@example.com' })).json()) as { id: number };
    const minted = (await (await post(`/admin/users/${user.id}/tokens`, {})).json()) as { id: number; token: string };

    const before = new Date().toISOString();
    const res = await fetch(`${server.baseUrl}/v1/me`, { headers: { 'X-API-Key': minted.token } });
    expect(res.status).toBe(200);
    await res.text();
    const after = new Date().toISOString();

    // Before shutdown the file has no use: the request itself wrote nothing.
    const live = new Database(databasePath, { readonly: true, fileMustExist: true });
    try {
      expect(live.prepare('select last_used_at, last_used_ip from tokens where id = ?').get(minted.id)).toEqual({ last_used_at: null, last_used_ip: null });
    } finally {
      live.close();
    }

    // Well inside the first interval, so only the shutdown path can have written the use.
    expect(Date.now() - listeningAt).toBeLessThan(LAST_USE_FLUSH_MS - 1_000);
    const exit = await server.stop('SIGTERM');
    expect(exit).toEqual({ code: 0, signal: null });

    const file = new Database(databasePath, { readonly: true, fileMustExist: true });
    try {
      const row = file.prepare('select last_used_at, last_used_ip from tokens where id = ?').get(minted.id) as {
        last_used_at: string | null;
        last_used_ip: string | null;
      };
      expect(row.last_used_ip).toBe('127.0.0.1');
      expect(row.last_used_at).not.toBeNull();
      expect(row.last_used_at! >= before).toBe(true);
      expect(row.last_used_at! <= after).toBe(true);
      expect(row.last_used_at).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    } finally {
      file.close();
    }
  });
});
