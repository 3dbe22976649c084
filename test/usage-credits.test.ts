import { rmSync } from 'node:fs';
import { join } from 'node:path';
import type { KyselyPlugin, QueryId } from 'kysely';
import request from 'supertest';
import { openSqlite } from '../db/database';
import { createApp } from '../src/app';
import { createLogger } from '../src/logger';
import { admin, createTestApp, createUser, expectError, mintToken, tempDir, type TestContext } from './helpers/app';

/**
 * Usage (requests per token and UTC day, bot minutes per day) and credits (a balance the admin sets,
 * spent by bot starts). Usage is counted in memory and written in batches, and bot time is folded into
 * the daily rows when old bots are swept: every read must show each request and each bot minute
 * exactly once, whichever of those places it sits in.
 */

const DAY = 86_400;
const D1 = '2026-01-01';
const D2 = '2026-01-02';

const contexts: TestContext[] = [];
const dirs: string[] = [];
async function app(env: Record<string, string> = {}): Promise<TestContext> {
  const ctx = await createTestApp({ env });
  contexts.push(ctx);
  return ctx;
}
function dbFile(): string {
  const dir = tempDir();
  dirs.push(dir);
  return join(dir, 'keyward.db');
}
afterEach(async () => {
  for (const ctx of contexts.splice(0)) await ctx.close();
});
afterAll(() => {
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

const as = (token: string) => ({ 'X-API-Key': token });

async function times(n: number, send: () => request.Test, status = 200): Promise<void> {
  for (let i = 0; i < n; i++) {
    const res = await send();
    if (res.status !== status) throw new Error(`expected ${status}, got ${res.status} ${JSON.stringify(res.body)}`);
  }
}

const adminUsage = (ctx: TestContext, userId: number | string, query = '') => request(ctx.app).get(`/admin/users/${userId}/usage${query}`).set(admin);
const usageRows = (ctx: TestContext, userId: number) =>
  ctx.storage.db.selectFrom('usage_daily').selectAll().where('user_id', '=', userId).orderBy('day').orderBy('token_id').execute();

/** The usage body for requests only (no bot time), from per-day, per-token counts. */
function requestsOnly(userId: number, from: string, to: string, days: Record<string, Record<number, number>>) {
  const out = Object.entries(days)
    .sort(([a], [b]) => (a < b ? -1 : 1))
    .map(([day, tokens]) => {
      const list = Object.entries(tokens)
        .map(([id, requests]) => ({ token_id: Number(id), requests }))
        .sort((a, b) => a.token_id - b.token_id);
      return { day, requests: list.reduce((a, t) => a + t.requests, 0), bot_minutes: 0, tokens: list };
    });
  return { user_id: userId, from, to, totals: { requests: out.reduce((a, d) => a + d.requests, 0), bot_minutes: 0 }, days: out };
}

describe('usage: requests per token and UTC day', () => {
  test('counts each token\'s requests per day, the same before the flush, after it, and after a restart', async () => {
    const path = dbFile();
    const ctx = await app({ DATABASE_PATH: path });
    // Nothing is written behind the test's back: counts stay in memory until it flushes.
    await ctx.app.usage.stop();
    const user = await createUser(ctx);
    const a = await mintToken(ctx, user.id);
    const b = await mintToken(ctx, user.id);
    const range = `?from=${D1}&to=${D2}`;

    await times(3, () => request(ctx.app).get('/v1/me').set(as(a.token)));
    await times(1, () => request(ctx.app).get('/auth/verify').set(as(a.token))); // forward auth counts too
    await times(2, () => request(ctx.app).get('/v1/me').set({ Authorization: `Bearer ${b.token}` }));
    await times(1, () => request(ctx.app).get('/v1/me').set(as(`${b.token.slice(0, -1)}${b.token.endsWith('x') ? 'y' : 'x'}`)), 401); // not a request of b
    ctx.clock.advance(DAY);
    await times(1, () => request(ctx.app).get('/v1/me').set(as(a.token)));
    await times(3, () => request(ctx.app).get('/auth/verify').set(as(b.token)));

    const expected = requestsOnly(user.id, D1, D2, { [D1]: { [a.id]: 4, [b.id]: 2 }, [D2]: { [a.id]: 1, [b.id]: 3 } });
    expect(await usageRows(ctx, user.id)).toEqual([]);
    const pending = await adminUsage(ctx, user.id, range);
    expect(pending.status).toBe(200);
    expect(pending.body).toEqual(expected);

    await ctx.app.usage.flush();
    expect(await usageRows(ctx, user.id)).toEqual([
      { day: D1, user_id: user.id, token_id: a.id, requests: 4, bot_seconds: 0 },
      { day: D1, user_id: user.id, token_id: b.id, requests: 2, bot_seconds: 0 },
      { day: D2, user_id: user.id, token_id: a.id, requests: 1, bot_seconds: 0 },
      { day: D2, user_id: user.id, token_id: b.id, requests: 3, bot_seconds: 0 },
    ]);
    expect((await adminUsage(ctx, user.id, range)).body).toEqual(expected);
    await ctx.app.usage.flush(); // nothing pending: nothing added
    expect((await adminUsage(ctx, user.id, range)).body).toEqual(expected);

    // Part flushed, part pending for the same token and day: added, not one instead of the other.
    await times(2, () => request(ctx.app).get('/v1/me').set(as(a.token)));
    const mixed = requestsOnly(user.id, D1, D2, { [D1]: { [a.id]: 4, [b.id]: 2 }, [D2]: { [a.id]: 3, [b.id]: 3 } });
    expect((await adminUsage(ctx, user.id, range)).body).toEqual(mixed);
    await ctx.app.usage.flush();
    expect((await usageRows(ctx, user.id)).find((r) => r.day === D2 && r.token_id === a.id)?.requests).toBe(3);
    expect((await adminUsage(ctx, user.id, range)).body).toEqual(mixed);

    // What is pending at shutdown is written before the database closes.
    await times(1, () => request(ctx.app).get('/v1/me').set(as(b.token)));
    await ctx.close();
    contexts.splice(contexts.indexOf(ctx), 1);
    const restarted = await app({ DATABASE_PATH: path });
    expect((await adminUsage(restarted, user.id, range)).body).toEqual(
      requestsOnly(user.id, D1, D2, { [D1]: { [a.id]: 4, [b.id]: 2 }, [D2]: { [a.id]: 3, [b.id]: 4 } }),
    );
  });

  test('GET /v1/usage shows the caller\'s own user only (the call itself included)', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    const other = await createUser(ctx);
    const a = await mintToken(ctx, user.id, { scopes: ['bots:read'] });
    const b = await mintToken(ctx, user.id, { scopes: ['tokens:read'] });
    const c = await mintToken(ctx, other.id);
    await times(2, () => request(ctx.app).get('/v1/me').set(as(a.token)));
    await times(5, () => request(ctx.app).get('/v1/me').set(as(c.token)));
    ctx.clock.advance(DAY);
    await times(1, () => request(ctx.app).get('/v1/me').set(as(b.token)));
    await ctx.app.usage.flush();
    await times(1, () => request(ctx.app).get('/v1/me').set(as(a.token)));

    const mine = await request(ctx.app).get(`/v1/usage?from=${D1}&to=${D2}`).set(as(b.token));
    expect(mine.status).toBe(200);
    // Needs no scope; the call is counted before it is answered.
    expect(mine.body).toEqual(requestsOnly(user.id, D1, D2, { [D1]: { [a.id]: 2 }, [D2]: { [a.id]: 1, [b.id]: 2 } }));

    const theirs = await request(ctx.app).get(`/v1/usage?from=${D1}&to=${D2}`).set(as(c.token));
    expect(theirs.body).toEqual(requestsOnly(other.id, D1, D2, { [D1]: { [c.id]: 5 }, [D2]: { [c.id]: 1 } }));
    // There is no way to ask for someone else's.
    expectError(await request(ctx.app).get(`/v1/usage?user_id=${user.id}`).set(as(c.token)), 400, 'VALIDATION_ERROR');
    expectError(await request(ctx.app).get(`/v1/usage`).set(admin), 401, 'AUTHENTICATION_REQUIRED');
    expectError(await request(ctx.app).get(`/v1/usage`), 401, 'AUTHENTICATION_REQUIRED');
    // The admin sees the same numbers.
    const adminView = (await adminUsage(ctx, user.id, `?from=${D1}&to=${D2}`)).body;
    expect(adminView.totals.requests).toBe(5);
  });

  test('from defaults to 29 days before to, to defaults to today (UTC); bad ranges and dates are 400', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    const { token } = await mintToken(ctx, user.id);
    ctx.clock.advance(DAY + 3600 * 23); // 2026-01-02T23:00Z
    const range = async (query: string) => {
      const res = await adminUsage(ctx, user.id, query);
      expect(res.status).toBe(200);
      return { from: res.body.from, to: res.body.to };
    };
    expect(await range('')).toEqual({ from: '2025-12-04', to: D2 });
    expect(await range('?to=2026-03-31')).toEqual({ from: '2026-03-02', to: '2026-03-31' });
    expect(await range('?from=2025-12-20')).toEqual({ from: '2025-12-20', to: D2 });
    expect(await range(`?from=${D2}&to=${D2}`)).toEqual({ from: D2, to: D2 });
    expect(await range('?from=2025-01-01&to=2026-01-02')).toEqual({ from: '2025-01-01', to: '2026-01-02' }); // 366 days
    expect(await range('?from=2024-02-29&to=2025-03-01')).toEqual({ from: '2024-02-29', to: '2025-03-01' }); // 366 days, leap year
    const mine = await request(ctx.app).get('/v1/usage').set(as(token));
    expect({ from: mine.body.from, to: mine.body.to }).toEqual({ from: '2025-12-04', to: D2 });

    const refused = [
      `?from=${D2}&to=${D1}`,
      '?from=2026-01-03', // after today
      '?to=2026-01-01&from=2026-01-02',
      '?from=2025-01-01&to=2026-01-03', // 367 days
      '?from=2020-01-01', // far before today
      '?from=January',
      '?from=2026-13-01',
      '?from=2026-02-30',
      '?to=2026-1-5',
      '?to=2026-01-05T00:00:00Z',
      '?from=',
      '?from=2026-01-01&from=2026-01-02',
    ];
    for (const query of refused) {
      const res = await adminUsage(ctx, user.id, query);
      expect({ query, status: res.status, code: res.body?.error?.code }).toEqual({ query, status: 400, code: 'VALIDATION_ERROR' });
      expectError(res, 400, 'VALIDATION_ERROR');
      const own = await request(ctx.app).get(`/v1/usage${query}`).set(as(token));
      expect({ query, status: own.status, code: own.body?.error?.code }).toEqual({ query, status: 400, code: 'VALIDATION_ERROR' });
    }
    expect((await adminUsage(ctx, user.id, `?from=${D2}&to=${D1}`)).body.error.details).toEqual([
      { field: 'from', in: 'query', message: expect.any(String) },
    ]);
  });

  test('the admin route: 404 for an unknown or deleted user, 400 for an id that is not one, 401 without the admin key', async () => {
    const ctx = await app();
    expectError(await adminUsage(ctx, 987654), 404, 'NOT_FOUND');
    expectError(await adminUsage(ctx, 'abc'), 400, 'VALIDATION_ERROR');
    const user = await createUser(ctx);
    expect((await request(ctx.app).delete(`/admin/users/${user.id}`).set(admin)).status).toBe(204);
    expectError(await adminUsage(ctx, user.id), 404, 'NOT_FOUND');
    expectError(await request(ctx.app).get(`/admin/users/${user.id}/usage`), 401, 'AUTHENTICATION_REQUIRED');
  });
});

describe('usage: bot minutes', () => {
  test('split across UTC days, counted up to now while active, and kept exactly once after the sweep deletes the bot', async () => {
    const ctx = await app({ BOT_RETENTION: '1h' });
    const user = await createUser(ctx, { max_concurrent_bots: 3 });
    const { token } = await mintToken(ctx, user.id);
    const range = `?from=${D1}&to=${D2}`;
    const minutes = async () => {
      const body = (await adminUsage(ctx, user.id, range)).body as { totals: { bot_minutes: number }; days: Array<{ day: string; bot_minutes: number }> };
      return { total: body.totals.bot_minutes, byDay: Object.fromEntries(body.days.map((d) => [d.day, d.bot_minutes])) };
    };
    const acquire = async (ttl: number) => {
      const res = await request(ctx.app).post('/v1/bots').set(as(token)).send({ ttl_seconds: ttl });
      expect(res.status).toBe(201);
      return res.body.id as number;
    };
    const release = async (id: number) => expect((await request(ctx.app).delete(`/v1/bots/${id}`).set(as(token))).status).toBe(204);

    ctx.clock.advance(23 * 3600 + 15 * 60); // 2026-01-01T23:15Z
    const first = await acquire(7200);
    ctx.clock.advance(30 * 60);
    expect(await minutes()).toEqual({ total: 30, byDay: { [D1]: 30 } });
    ctx.clock.advance(60 * 60); // 00:45 the next day: 90 minutes, 45 on each side of midnight
    await release(first);
    expect(await minutes()).toEqual({ total: 90, byDay: { [D1]: 45, [D2]: 45 } });

    // An active bot counts up to now.
    const second = await acquire(3600);
    ctx.clock.advance(10 * 60);
    expect(await minutes()).toEqual({ total: 100, byDay: { [D1]: 45, [D2]: 55 } });
    ctx.clock.advance(5 * 60);
    await release(second); // 01:00
    // A lease that runs out counts until it ran out, not until now.
    const third = await acquire(600);
    ctx.clock.advance(20 * 60); // 01:20: ran out at 01:10
    expect(await minutes()).toEqual({ total: 115, byDay: { [D1]: 45, [D2]: 70 } });
    ctx.clock.advance(30 * 60);
    expect(await minutes()).toEqual({ total: 115, byDay: { [D1]: 45, [D2]: 70 } });
    expect(await usageRows(ctx, user.id)).toEqual([]);

    // 02:05: the first two ended (00:45, 01:00) over an hour (BOT_RETENTION) ago, the third (01:10) not yet.
    ctx.clock.advance(15 * 60);
    await ctx.app.bots.sweep();
    const left = await ctx.storage.db.selectFrom('bots').select(['id', 'status']).where('user_id', '=', user.id).execute();
    expect(left).toEqual([{ id: third, status: 'expired' }]);
    expect((await usageRows(ctx, user.id)).filter((r) => r.token_id === 0)).toEqual([
      { day: D1, user_id: user.id, token_id: 0, requests: 0, bot_seconds: 45 * 60 },
      { day: D2, user_id: user.id, token_id: 0, requests: 0, bot_seconds: 60 * 60 },
    ]);
    expect(await minutes()).toEqual({ total: 115, byDay: { [D1]: 45, [D2]: 70 } });

    // The third goes too; a sweep with nothing left to delete adds nothing.
    ctx.clock.advance(3600);
    await ctx.app.bots.sweep();
    await ctx.app.bots.sweep();
    expect(await ctx.storage.db.selectFrom('bots').select('id').where('user_id', '=', user.id).execute()).toEqual([]);
    expect((await usageRows(ctx, user.id)).filter((r) => r.token_id === 0)).toEqual([
      { day: D1, user_id: user.id, token_id: 0, requests: 0, bot_seconds: 45 * 60 },
      { day: D2, user_id: user.id, token_id: 0, requests: 0, bot_seconds: 70 * 60 },
    ]);
    expect(await minutes()).toEqual({ total: 115, byDay: { [D1]: 45, [D2]: 70 } });
    await ctx.app.usage.flush();
    expect(await minutes()).toEqual({ total: 115, byDay: { [D1]: 45, [D2]: 70 } });

    // The user sees the same on /v1/usage.
    const own = await request(ctx.app).get(`/v1/usage${range}`).set(as(token));
    expect(own.body.totals.bot_minutes).toBe(115);
    expect(own.body.days.map((d: { day: string; bot_minutes: number }) => [d.day, d.bot_minutes])).toEqual([
      [D1, 45],
      [D2, 70],
    ]);
  });

  test('a sweep by another process between the reads of one usage request neither loses nor doubles minutes', async () => {
    // Several processes may share the database file. One answers GET /admin/users/{id}/usage while
    // another's sweep folds bots into usage_daily and deletes them, in one transaction. The plugin
    // below runs that sweep right after the reading process has read usage_daily: the read must still
    // see one consistent state (all in the rows, or all in the table).
    const path = dbFile();
    const ctx = await app({ DATABASE_PATH: path, BOT_RETENTION: '1h' });
    const user = await createUser(ctx);
    const { token } = await mintToken(ctx, user.id);
    ctx.clock.advance(3600);
    const bot = await request(ctx.app).post('/v1/bots').set(as(token)).send({ ttl_seconds: 7200 });
    expect(bot.status).toBe(201);
    ctx.clock.advance(90 * 60);
    expect((await request(ctx.app).delete(`/v1/bots/${bot.body.id}`).set(as(token))).status).toBe(204);
    ctx.clock.advance(2 * 3600); // old enough to be swept
    expect((await adminUsage(ctx, user.id)).body.totals.bot_minutes).toBe(90);

    const other = openSqlite(path);
    const otherApp = createApp({ config: ctx.config, db: other.db, clock: ctx.clock, logger: createLogger('silent') });
    const usageReads = new Set<QueryId>();
    let armed = true;
    const sweepAfterUsageRead: KyselyPlugin = {
      transformQuery: (args) => {
        if (args.node.kind === 'SelectQueryNode' && JSON.stringify(args.node).includes('"usage_daily"')) usageReads.add(args.queryId);
        return args.node;
      },
      transformResult: async (args) => {
        if (armed && usageReads.has(args.queryId)) {
          armed = false;
          await otherApp.bots.sweep();
        }
        return args.result;
      },
    };
    const reader = createApp({ config: ctx.config, db: ctx.storage.db.withPlugin(sweepAfterUsageRead), clock: ctx.clock, logger: createLogger('silent') });
    try {
      const res = await request(reader).get(`/admin/users/${user.id}/usage?from=${D1}&to=${D1}`).set(admin);
      expect(armed).toBe(false); // the sweep did run in between
      expect(await ctx.storage.db.selectFrom('bots').select('id').where('user_id', '=', user.id).execute()).toEqual([]);
      expect(res.status).toBe(200);
      expect(res.body.totals.bot_minutes).toBe(90);
    } finally {
      await reader.stopBackground();
      await otherApp.stopBackground();
      await other.close();
    }
    expect((await adminUsage(ctx, user.id)).body.totals.bot_minutes).toBe(90);
  });

  test('a range that starts or ends inside a bot\'s lease counts only its days in the range', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    const { token } = await mintToken(ctx, user.id);
    ctx.clock.advance(23 * 3600); // 23:00
    const res = await request(ctx.app).post('/v1/bots').set(as(token)).send({ ttl_seconds: 7200 });
    expect(res.status).toBe(201);
    ctx.clock.advance(7200); // ran out at 01:00
    const minutesOn = async (query: string) => (await adminUsage(ctx, user.id, query)).body.totals.bot_minutes;
    expect(await minutesOn(`?from=${D1}&to=${D1}`)).toBe(60);
    expect(await minutesOn(`?from=${D2}&to=${D2}`)).toBe(60);
    expect(await minutesOn(`?from=${D1}&to=${D2}`)).toBe(120);
    expect(await minutesOn('?from=2026-01-03&to=2026-01-03')).toBe(0);
  });
});

describe('credits', () => {
  const credits = async (ctx: TestContext, userId: number) =>
    (await ctx.storage.db.selectFrom('users').select('credits').where('id', '=', userId).executeTakeFirstOrThrow()).credits;
  const botCount = async (ctx: TestContext, userId: number) => (await ctx.storage.db.selectFrom('bots').select('id').where('user_id', '=', userId).execute()).length;

  test('the admin sets a balance on create and with PATCH (absolute, not added); GET /v1/credits shows it', async () => {
    const ctx = await app({ CREDITS_PER_BOT: '2' });
    const created = await request(ctx.app).post('/admin/users').set(admin).send({ email: 'payer@example.com', credits: 5 });
    expect(created.status).toBe(201);
    expect(created.body.credits).toBe(5);
    const id = created.body.id as number;
    expect(await credits(ctx, id)).toBe(5);
    const patched = await request(ctx.app).patch(`/admin/users/${id}`).set(admin).send({ credits: 7 });
    expect(patched.status).toBe(200);
    expect(patched.body.credits).toBe(7);
    expect((await request(ctx.app).get(`/admin/users/${id}`).set(admin)).body.credits).toBe(7);
    expect(await credits(ctx, id)).toBe(7);

    // No scope is needed to read one's balance.
    const { token } = await mintToken(ctx, id, { scopes: ['tokens:read'] });
    const mine = await request(ctx.app).get('/v1/credits').set(as(token));
    expect(mine.status).toBe(200);
    expect(mine.body).toEqual({ credits: 7, credits_per_bot: 2 });
    expect((await request(ctx.app).patch(`/admin/users/${id}`).set(admin).send({ credits: 0 })).body.credits).toBe(0);
    expect((await request(ctx.app).get('/v1/credits').set(as(token))).body).toEqual({ credits: 0, credits_per_bot: 2 });
    expectError(await request(ctx.app).get('/v1/credits'), 401, 'AUTHENTICATION_REQUIRED');
    // Without CREDITS_PER_BOT, a new user has 0 and bots are free.
    const free = await app();
    const user = await createUser(free);
    expect((await request(free.app).get('/v1/credits').set(as((await mintToken(free, user.id)).token))).body).toEqual({ credits: 0, credits_per_bot: 0 });
  });

  test('a balance that is negative, fractional, not a number or too large is 400, and the balance is kept', async () => {
    const ctx = await app({ CREDITS_PER_BOT: '2' });
    const user = await createUser(ctx, { credits: 3 });
    for (const value of [-1, 1.5, '4', null, true, 1_000_000_000_001, [], {}]) {
      const res = await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ credits: value });
      expect({ value, status: res.status }).toEqual({ value, status: 400 });
      const error = expectError(res, 400, 'VALIDATION_ERROR');
      expect(JSON.stringify(error.details)).toContain('credits');
    }
    expect(await credits(ctx, user.id)).toBe(3);
    for (const value of [-5, 0.5]) {
      expectError(await request(ctx.app).post('/admin/users').set(admin).send({ email: `bad${String(value).replace('.', '')}@example.com`, credits: value }), 400, 'VALIDATION_ERROR');
    }
    const max = await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ credits: 1_000_000_000_000 });
    expect(max.status).toBe(200);
    expect(await credits(ctx, user.id)).toBe(1_000_000_000_000);
  });

  test('with CREDITS_PER_BOT=2 each bot start spends 2; when short, 402 INSUFFICIENT_CREDITS, no bot and the balance kept', async () => {
    const ctx = await app({ CREDITS_PER_BOT: '2' });
    const user = await createUser(ctx, { credits: 5, max_concurrent_bots: 10 });
    const { token } = await mintToken(ctx, user.id);
    const start = () => request(ctx.app).post('/v1/bots').set(as(token));

    const first = await start();
    expect(first.status).toBe(201);
    expect(await credits(ctx, user.id)).toBe(3);
    expect((await start()).status).toBe(201);
    expect(await credits(ctx, user.id)).toBe(1);
    expect((await request(ctx.app).get('/v1/credits').set(as(token))).body).toEqual({ credits: 1, credits_per_bot: 2 });

    const short = await start();
    const error = expectError(short, 402, 'INSUFFICIENT_CREDITS');
    expect(error.details).toEqual({ credits: 1, required: 2 });
    expect(await credits(ctx, user.id)).toBe(1);
    expect(await botCount(ctx, user.id)).toBe(2);

    // Releasing does not give credits back; a new balance lets bots start again.
    expect((await request(ctx.app).delete(`/v1/bots/${first.body.id}`).set(as(token))).status).toBe(204);
    expect(await credits(ctx, user.id)).toBe(1);
    expectError(await start(), 402, 'INSUFFICIENT_CREDITS');
    await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ credits: 2 });
    expect((await start()).status).toBe(201);
    expect(await credits(ctx, user.id)).toBe(0);
    expect(await botCount(ctx, user.id)).toBe(3);
  });

  test('a start refused for the concurrency limit or a taken meeting spends nothing', async () => {
    const ctx = await app({ CREDITS_PER_BOT: '2' });
    const user = await createUser(ctx, { credits: 10, max_concurrent_bots: 2 });
    const { token } = await mintToken(ctx, user.id);
    const start = (body: Record<string, unknown> = {}) => request(ctx.app).post('/v1/bots').set(as(token)).send(body);
    expect((await start({ platform: 'zoom', native_meeting_id: 'm-1' })).status).toBe(201);
    expect(await credits(ctx, user.id)).toBe(8);
    expectError(await start({ platform: 'zoom', native_meeting_id: 'm-1' }), 409, 'CONFLICT');
    expect(await credits(ctx, user.id)).toBe(8);
    expect((await start()).status).toBe(201);
    expect(await credits(ctx, user.id)).toBe(6);
    expectError(await start(), 429, 'CONCURRENCY_LIMIT_EXCEEDED');
    expectError(await start(), 429, 'CONCURRENCY_LIMIT_EXCEEDED');
    expect(await credits(ctx, user.id)).toBe(6);
    expect(await botCount(ctx, user.id)).toBe(2);
    // At the limit and short of credits at once: the limit is what the caller hears, and nothing is spent.
    await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ credits: 1 });
    expectError(await start(), 429, 'CONCURRENCY_LIMIT_EXCEEDED');
    expect(await credits(ctx, user.id)).toBe(1);
  });

  test('with CREDITS_PER_BOT=0 (the default) bots are free, whatever the balance', async () => {
    const ctx = await app();
    const broke = await createUser(ctx, { max_concurrent_bots: 5 });
    const rich = await createUser(ctx, { max_concurrent_bots: 5, credits: 4 });
    for (const u of [broke, rich]) {
      const { token } = await mintToken(ctx, u.id);
      await times(3, () => request(ctx.app).post('/v1/bots').set(as(token)), 201);
    }
    expect(await credits(ctx, broke.id)).toBe(0);
    expect(await credits(ctx, rich.id)).toBe(4);
    expect(await botCount(ctx, broke.id)).toBe(3);
  });

  test('20 starts at once with credits for exactly 3: 3 succeed, 17 are 402, and the balance ends at 0, never below', async () => {
    const ctx = await app({ DATABASE_PATH: dbFile(), CREDITS_PER_BOT: '2', AUTH_FAILURES_PER_MINUTE: '10000000' });
    const user = await createUser(ctx, { credits: 6, max_concurrent_bots: 1000, rate_limit_per_minute: 1_000_000 });
    // Keys this app has never verified (at most 7 requests each, under the 10 wrong-secret checks a key
    // may take): each key's requests wait on one bcrypt check off the event loop, come back together,
    // and their admission steps interleave. A warm key would be served one request after another.
    const keys: string[] = [];
    for (let i = 0; i < 3; i++) keys.push((await mintToken(ctx, user.id, { scopes: ['bots:write'] })).token);
    const responses = await Promise.all(Array.from({ length: 20 }, (_, i) => request(ctx.app).post('/v1/bots').set(as(keys[i % 3]!))));
    const tally: Record<string, number> = {};
    for (const r of responses) {
      const key = r.status < 400 ? String(r.status) : `${r.status} ${r.body?.error?.code}`;
      tally[key] = (tally[key] ?? 0) + 1;
    }
    expect(tally).toEqual({ '201': 3, '402 INSUFFICIENT_CREDITS': 17 });
    for (const r of responses.filter((x) => x.status === 402)) expect(r.body.error.details).toEqual({ credits: 0, required: 2 });
    expect(await credits(ctx, user.id)).toBe(0);
    expect(await botCount(ctx, user.id)).toBe(3);
  });
});
