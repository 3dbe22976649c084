import request from 'supertest';
import { admin, createTestApp, createUser, expectError, mintToken, type TestContext } from './helpers/app';

// The bots API: leases on a user's max_concurrent_bots slots. Admission under concurrent load is
// covered elsewhere; this file specifies every other behaviour and every error path, one request at a
// time, against the fake clock (which starts at T0 and only moves when a test moves it).

let ctx: TestContext;
beforeEach(async () => {
  ctx = await createTestApp();
});
afterEach(async () => {
  await ctx.close();
});

const T0 = Date.parse('2026-01-01T00:00:00.000Z');
/** The ISO time `s` seconds after the fake clock's start. */
const at = (s: number) => new Date(T0 + s * 1000).toISOString();
const as = (token: string) => ({ 'X-API-Key': token });
const BOTH = ['bots:read', 'bots:write'];

type Key = Awaited<ReturnType<typeof mintToken>>;
type User = Awaited<ReturnType<typeof createUser>>;

/** A user with a key holding both bot scopes. */
async function runner(userBody: Record<string, unknown> = {}): Promise<{ user: User; key: Key }> {
  const user = await createUser(ctx, { max_concurrent_bots: 3, ...userBody });
  const key = await mintToken(ctx, user.id, { scopes: BOTH });
  return { user, key };
}

const acquire = (key: Key, body?: unknown) => {
  const req = request(ctx.app).post('/v1/bots').set(as(key.token));
  return body === undefined ? req : req.send(body as object);
};

/** Acquires and insists it worked, for tests about what comes after. */
async function acquired(key: Key, body: Record<string, unknown> = {}): Promise<BotBody> {
  const res = await acquire(key, body);
  if (res.status !== 201) throw new Error(`acquire: ${res.status} ${JSON.stringify(res.body)}`);
  return res.body as BotBody;
}

const heartbeat = (key: Key, id: number, body?: unknown) => {
  const req = request(ctx.app).post(`/v1/bots/${id}/heartbeat`).set(as(key.token));
  return body === undefined ? req : req.send(body as object);
};
const release = (key: Key, id: number) => request(ctx.app).delete(`/v1/bots/${id}`).set(as(key.token));
const getMine = (key: Key, id: number) => request(ctx.app).get(`/v1/bots/${id}`).set(as(key.token));
const listMine = (key: Key, query = '') => request(ctx.app).get(`/v1/bots${query}`).set(as(key.token));
const forceRelease = (id: number) => request(ctx.app).delete(`/admin/bots/${id}`).set(admin);
const adminGet = (id: number) => request(ctx.app).get(`/admin/bots/${id}`).set(admin);

const botRow = (id: number) => ctx.storage.db.selectFrom('bots').selectAll().where('id', '=', id).executeTakeFirst();
const allBotRows = () => ctx.storage.db.selectFrom('bots').selectAll().orderBy('id').execute();

interface BotBody {
  id: number;
  user_id: number;
  token_id: number | null;
  platform: string | null;
  native_meeting_id: string | null;
  label: string | null;
  metadata: Record<string, unknown> | null;
  status: 'active' | 'released' | 'expired';
  ttl_seconds: number;
  created_at: string;
  heartbeat_at: string;
  expires_at: string;
  ended_at: string | null;
  ended_by: 'user' | 'admin' | 'expiry' | null;
}

/** The whole response body of a bot acquired at T0 with defaults, with `fields` changed. */
function expectedBot(fields: Partial<BotBody> & Pick<BotBody, 'id' | 'user_id' | 'token_id'>): BotBody {
  return {
    platform: null,
    native_meeting_id: null,
    label: null,
    metadata: null,
    status: 'active',
    ttl_seconds: 300,
    created_at: at(0),
    heartbeat_at: at(0),
    expires_at: at(300),
    ended_at: null,
    ended_by: null,
    ...fields,
  };
}

const ids = (res: request.Response) => (res.body.data as BotBody[]).map((b) => b.id);

describe('POST /v1/bots (acquire)', () => {
  test('with no body at all: 201, Location, every field with its default, and the row stored as shown', async () => {
    const { user, key } = await runner();
    const res = await acquire(key);
    expect(res.status).toBe(201);
    expect(res.headers.location).toBe(`/v1/bots/${res.body.id}`);
    expect(res.body).toEqual(expectedBot({ id: res.body.id, user_id: user.id, token_id: key.id }));
    expect(await botRow(res.body.id)).toEqual({
      id: res.body.id,
      user_id: user.id,
      token_id: key.id,
      platform: null,
      native_meeting_id: null,
      label: null,
      metadata: null,
      status: 'active',
      ttl_seconds: 300,
      created_at: at(0),
      heartbeat_at: at(0),
      expires_at: at(300),
      ended_at: null,
      ended_by: null,
    });
  });

  test('an empty JSON object is the same as no body', async () => {
    const { user, key } = await runner();
    const res = await acquire(key, {});
    expect(res.status).toBe(201);
    expect(res.body).toEqual(expectedBot({ id: res.body.id, user_id: user.id, token_id: key.id }));
  });

  test('keeps every given field, and the lease ends ttl_seconds after now', async () => {
    const { user, key } = await runner();
    ctx.clock.advance(42);
    const metadata = { job: 'standup', attempt: 2, tags: ['a', 'b'], nested: { ok: true, none: null } };
    const res = await acquire(key, { platform: 'google_meet', native_meeting_id: 'abc-defg-hij', label: 'standup', ttl_seconds: 120, metadata });
    expect(res.status).toBe(201);
    expect(res.body).toEqual(
      expectedBot({
        id: res.body.id, user_id: user.id, token_id: key.id, platform: 'google_meet', native_meeting_id: 'abc-defg-hij',
        label: 'standup', metadata, ttl_seconds: 120, created_at: at(42), heartbeat_at: at(42), expires_at: at(162),
      }),
    );
    const row = await botRow(res.body.id);
    expect(row).toMatchObject({ platform: 'google_meet', native_meeting_id: 'abc-defg-hij', label: 'standup', ttl_seconds: 120, expires_at: at(162) });
    expect(JSON.parse(row!.metadata!)).toEqual(metadata);
  });

  test('metadata null is stored as NULL', async () => {
    const { key } = await runner();
    const res = await acquire(key, { metadata: null });
    expect(res.status).toBe(201);
    expect(res.body.metadata).toBeNull();
    expect((await botRow(res.body.id))!.metadata).toBeNull();
  });

  test.each([
    ['the shortest ttl', { ttl_seconds: 10 }, { ttl_seconds: 10, expires_at: at(10) }],
    ['the longest ttl', { ttl_seconds: 86400 }, { ttl_seconds: 86400, expires_at: at(86400) }],
    ['a 64-character platform', { platform: 'p'.repeat(64) }, { platform: 'p'.repeat(64) }],
    ['a 256-character meeting id', { native_meeting_id: 'm'.repeat(256) }, { native_meeting_id: 'm'.repeat(256) }],
    ['a 200-character label', { label: 'l'.repeat(200) }, { label: 'l'.repeat(200) }],
    ['one-character strings', { platform: 'p', native_meeting_id: 'm', label: 'l' }, { platform: 'p', native_meeting_id: 'm', label: 'l' }],
  ])('accepts %s (a bound, inclusive)', async (_what, body, shown) => {
    const { key } = await runner();
    const res = await acquire(key, body);
    expect(res.status).toBe(201);
    expect(res.body).toMatchObject(shown);
  });

  test.each([
    ['a ttl of 9', { ttl_seconds: 9 }, 'ttl_seconds', 'must be >= 10'],
    ['a ttl of 86401', { ttl_seconds: 86401 }, 'ttl_seconds', 'must be <= 86400'],
    ['a ttl of 0', { ttl_seconds: 0 }, 'ttl_seconds', 'must be >= 10'],
    ['a negative ttl', { ttl_seconds: -300 }, 'ttl_seconds', 'must be >= 10'],
    ['a fractional ttl', { ttl_seconds: 30.5 }, 'ttl_seconds', 'must be integer'],
    ['a ttl as a string', { ttl_seconds: '300' }, 'ttl_seconds', 'must be integer'],
    ['a null ttl', { ttl_seconds: null }, 'ttl_seconds', 'must be integer'],
    ['an unknown field', { meeting_url: 'https://meet.example/x' }, 'meeting_url', 'is not a known field'],
    ['a status sent by the client', { status: 'released' }, 'status', 'is not a known field'],
    ['an empty platform', { platform: '' }, 'platform', 'must NOT have fewer than 1 characters'],
    ['a 65-character platform', { platform: 'p'.repeat(65) }, 'platform', 'must NOT have more than 64 characters'],
    ['a platform that is not a string', { platform: 7 }, 'platform', 'must be string'],
    ['a null platform', { platform: null }, 'platform', 'must be string'],
    ['an empty meeting id', { native_meeting_id: '' }, 'native_meeting_id', 'must NOT have fewer than 1 characters'],
    ['a 257-character meeting id', { native_meeting_id: 'm'.repeat(257) }, 'native_meeting_id', 'must NOT have more than 256 characters'],
    ['a numeric meeting id', { native_meeting_id: 12345 }, 'native_meeting_id', 'must be string'],
    ['an empty label', { label: '' }, 'label', 'must NOT have fewer than 1 characters'],
    ['a 201-character label', { label: 'l'.repeat(201) }, 'label', 'must NOT have more than 200 characters'],
    ['metadata that is an array', { metadata: [1, 2] }, 'metadata', 'must be object,null'],
    ['metadata that is a string', { metadata: '{"a":1}' }, 'metadata', 'must be object,null'],
  ])('refuses %s with 400 naming the field, and stores nothing', async (_what, body, field, message) => {
    const { key } = await runner();
    const error = expectError(await acquire(key, body), 400, 'VALIDATION_ERROR');
    expect(error.details).toContainEqual({ field, in: 'body', message });
    expect(await allBotRows()).toEqual([]);
  });

  test('lists every bad field at once', async () => {
    const { key } = await runner();
    const error = expectError(await acquire(key, { ttl_seconds: 5, label: '', extra: 1 }), 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual(
      expect.arrayContaining([
        { field: 'ttl_seconds', in: 'body', message: 'must be >= 10' },
        { field: 'label', in: 'body', message: 'must NOT have fewer than 1 characters' },
        { field: 'extra', in: 'body', message: 'is not a known field' },
      ]),
    );
  });

  describe('metadata bounds: 4 KiB as JSON, 8 levels deep', () => {
    // `{"k":""}` is 8 bytes, so a value of n ASCII characters makes n + 8 bytes of JSON.
    const ofBytes = (n: number) => ({ k: 'x'.repeat(n - 8) });
    /** `levels` nested objects, counting metadata itself as the first. */
    const nested = (levels: number): Record<string, unknown> => (levels === 1 ? { leaf: 1 } : { a: nested(levels - 1) });

    test('exactly 4096 bytes is accepted and stored byte for byte', async () => {
      const { key } = await runner();
      const res = await acquire(key, { metadata: ofBytes(4096) });
      expect(res.status).toBe(201);
      expect(Buffer.byteLength((await botRow(res.body.id))!.metadata!)).toBe(4096);
    });

    test('4097 bytes is 400 on metadata, and nothing is stored', async () => {
      const { key } = await runner();
      const error = expectError(await acquire(key, { metadata: ofBytes(4097) }), 400, 'VALIDATION_ERROR');
      expect(error.details).toEqual([{ field: 'metadata', in: 'body', message: 'must be at most 4096 bytes as JSON' }]);
      expect(await allBotRows()).toEqual([]);
    });

    test('the bound is in bytes, not characters: 2045 two-byte characters are too many', async () => {
      const { key } = await runner();
      // 2044 × "é" is 4088 bytes + 8 = 4096: fits. One more is 4098 bytes but only 2053 characters.
      expect((await acquire(key, { metadata: { k: 'é'.repeat(2044) } })).status).toBe(201);
      const error = expectError(await acquire(key, { metadata: { k: 'é'.repeat(2045) } }), 400, 'VALIDATION_ERROR');
      expect(error.details).toEqual([{ field: 'metadata', in: 'body', message: 'must be at most 4096 bytes as JSON' }]);
    });

    test('8 levels of nesting are accepted', async () => {
      const { key } = await runner();
      const res = await acquire(key, { metadata: nested(8) });
      expect(res.status).toBe(201);
      expect(res.body.metadata).toEqual(nested(8));
    });

    test('9 levels are 400 on metadata, arrays counting as levels too', async () => {
      const { key } = await runner();
      for (const metadata of [nested(9), { a: [[[[[[[{ deep: true }]]]]]]] }]) {
        const error = expectError(await acquire(key, { metadata }), 400, 'VALIDATION_ERROR');
        expect(error.details).toEqual([{ field: 'metadata', in: 'body', message: 'must not nest deeper than 8 levels' }]);
      }
      expect(await allBotRows()).toEqual([]);
    });

    test('a "__proto__" key is kept as plain data and pollutes nothing', async () => {
      const { key } = await runner();
      const body = '{"metadata":{"__proto__":{"polluted":true},"ok":1}}';
      const res = await request(ctx.app).post('/v1/bots').set(as(key.token)).set('Content-Type', 'application/json').send(body);
      expect(res.status).toBe(201);
      expect(JSON.stringify(res.body.metadata)).toBe('{"__proto__":{"polluted":true},"ok":1}');
      expect(({} as Record<string, unknown>).polluted).toBeUndefined();
      expect(JSON.parse((await botRow(res.body.id))!.metadata!)).toEqual(JSON.parse('{"__proto__":{"polluted":true},"ok":1}'));
    });

    test('a deeply nested hostile body is a 400, not a crash', async () => {
      const { key } = await runner();
      const body = `{"metadata":${'['.repeat(5000)}${']'.repeat(5000)}}`;
      const res = await request(ctx.app).post('/v1/bots').set(as(key.token)).set('Content-Type', 'application/json').send(body);
      expectError(res, 400, 'VALIDATION_ERROR');
      expect(await allBotRows()).toEqual([]);
    });
  });

  describe('bodies that are not a JSON object', () => {
    test('malformed JSON is 400 INVALID_JSON', async () => {
      const { key } = await runner();
      const res = await request(ctx.app).post('/v1/bots').set(as(key.token)).set('Content-Type', 'application/json').send('{"label": ');
      expectError(res, 400, 'INVALID_JSON');
      expect(await allBotRows()).toEqual([]);
    });

    test('a non-JSON body is 415', async () => {
      const { key } = await runner();
      const res = await request(ctx.app).post('/v1/bots').set(as(key.token)).set('Content-Type', 'text/plain').send('label=x');
      expectError(res, 415, 'UNSUPPORTED_MEDIA_TYPE');
      expect(await allBotRows()).toEqual([]);
    });

    test('a body over 64 KiB is 413', async () => {
      const { key } = await runner();
      const res = await acquire(key, { label: 'x'.repeat(70 * 1024) });
      expectError(res, 413, 'PAYLOAD_TOO_LARGE');
      expect(await allBotRows()).toEqual([]);
    });

    test.each([
      ['an array', '[]', 'VALIDATION_ERROR'],
      ['null', 'null', 'INVALID_JSON'],
      ['a number', '5', 'INVALID_JSON'],
    ])('%s as the body is 400', async (_what, body, code) => {
      const { key } = await runner();
      const res = await request(ctx.app).post('/v1/bots').set(as(key.token)).set('Content-Type', 'application/json').send(body);
      expectError(res, 400, code);
      expect(await allBotRows()).toEqual([]);
    });
  });

  describe('the concurrency limit (one request at a time)', () => {
    test('at the limit: 429 CONCURRENCY_LIMIT_EXCEEDED with {limit, active} and Retry-After until the earliest lease ends', async () => {
      const { user, key } = await runner({ max_concurrent_bots: 2 });
      await acquired(key, { ttl_seconds: 600 });
      ctx.clock.advance(10);
      await acquired(key, { ttl_seconds: 120 }); // ends at 130 s: the earliest
      ctx.clock.advance(20);

      const res = await acquire(key, { label: 'third' });
      const error = expectError(res, 429, 'CONCURRENCY_LIMIT_EXCEEDED');
      expect(error.details).toEqual({ limit: 2, active: 2 });
      expect(error.message).toBe('This user already runs 2 of 2 bots; release one or wait for a lease to end.');
      expect(res.headers['retry-after']).toBe('100');
      expect(await ctx.storage.db.selectFrom('bots').select('id').where('user_id', '=', user.id).execute()).toHaveLength(2);
    });

    test('Retry-After rounds a part second up and is never 0', async () => {
      const { key } = await runner({ max_concurrent_bots: 1 });
      await acquired(key, { ttl_seconds: 10 });
      ctx.clock.advance(0.5); // 9.5 s left: waiting 9 s would be too early
      let res = await acquire(key);
      expectError(res, 429, 'CONCURRENCY_LIMIT_EXCEEDED');
      expect(res.headers['retry-after']).toBe('10');
      ctx.clock.advance(9.499); // 1 ms left
      res = await acquire(key);
      expectError(res, 429, 'CONCURRENCY_LIMIT_EXCEEDED');
      expect(res.headers['retry-after']).toBe('1');
    });

    test('a limit of 0: 429 at once, Retry-After 60 and a message that says why', async () => {
      const { key } = await runner({ max_concurrent_bots: 0 });
      const res = await acquire(key);
      const error = expectError(res, 429, 'CONCURRENCY_LIMIT_EXCEEDED');
      expect(error.details).toEqual({ limit: 0, active: 0 });
      expect(error.message).toMatch(/max_concurrent_bots is 0/);
      expect(res.headers['retry-after']).toBe('60');
      expect(await allBotRows()).toEqual([]);
    });

    test('releasing one frees its slot at once', async () => {
      const { key } = await runner({ max_concurrent_bots: 1 });
      const first = await acquired(key);
      expectError(await acquire(key), 429, 'CONCURRENCY_LIMIT_EXCEEDED');
      expect((await release(key, first.id)).status).toBe(204);
      expect((await acquire(key)).status).toBe(201);
    });

    test('a lease that ran out frees its slot without any sweep, and admission marks it expired in the database', async () => {
      const { key } = await runner({ max_concurrent_bots: 1 });
      const first = await acquired(key, { ttl_seconds: 60 });
      ctx.clock.advance(59);
      expectError(await acquire(key), 429, 'CONCURRENCY_LIMIT_EXCEEDED');
      ctx.clock.advance(1); // now exactly at expires_at: the lease is over
      const second = await acquire(key);
      expect(second.status).toBe(201);
      expect(await botRow(first.id)).toMatchObject({ status: 'expired', ended_at: at(60), ended_by: 'expiry' });
    });

    test('lowering the limit below the running bots stops new admissions and leaves the running ones alone', async () => {
      const { user, key } = await runner({ max_concurrent_bots: 3 });
      const running = [await acquired(key), await acquired(key)];
      await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ max_concurrent_bots: 1 }).expect(200);

      const error = expectError(await acquire(key), 429, 'CONCURRENCY_LIMIT_EXCEEDED');
      expect(error.details).toEqual({ limit: 1, active: 2 });
      for (const bot of running) expect((await heartbeat(key, bot.id)).status).toBe(200);
      const list = await listMine(key);
      expect(list.body.concurrency).toEqual({ limit: 1, active: 2 });
    });

    test("one user's bots do not use another user's slots", async () => {
      const a = await runner({ max_concurrent_bots: 1 });
      const b = await runner({ max_concurrent_bots: 1 });
      await acquired(a.key);
      expect((await acquire(b.key)).status).toBe(201);
    });

    test('every key of a user shares the same slots', async () => {
      const { user, key } = await runner({ max_concurrent_bots: 1 });
      const other = await mintToken(ctx, user.id, { scopes: BOTH });
      await acquired(key);
      expectError(await acquire(other), 429, 'CONCURRENCY_LIMIT_EXCEEDED');
    });
  });

  describe('one active bot per meeting', () => {
    test('a second one for the same platform and meeting is 409 CONFLICT naming the existing bot, and nothing is stored', async () => {
      const { key } = await runner();
      const first = await acquired(key, { platform: 'zoom', native_meeting_id: '123' });
      const error = expectError(await acquire(key, { platform: 'zoom', native_meeting_id: '123', label: 'again' }), 409, 'CONFLICT');
      expect(error.details).toEqual({ existing_id: first.id });
      expect((await allBotRows()).map((r) => r.id)).toEqual([first.id]);
    });

    test('another key of the same user is refused the same way', async () => {
      const { user, key } = await runner();
      const other = await mintToken(ctx, user.id, { scopes: BOTH });
      const first = await acquired(key, { platform: 'zoom', native_meeting_id: '123' });
      expect(expectError(await acquire(other, { platform: 'zoom', native_meeting_id: '123' }), 409, 'CONFLICT').details).toEqual({ existing_id: first.id });
    });

    test('no platform, the same meeting id twice: the same meeting', async () => {
      const { key } = await runner();
      const first = await acquired(key, { native_meeting_id: 'job-7' });
      expect(expectError(await acquire(key, { native_meeting_id: 'job-7' }), 409, 'CONFLICT').details).toEqual({ existing_id: first.id });
    });

    test.each([
      ['a different platform', { platform: 'teams', native_meeting_id: '123' }],
      ['no platform (a platform and none are different meetings)', { native_meeting_id: '123' }],
      ['a different meeting id', { platform: 'zoom', native_meeting_id: '124' }],
      ['a meeting id differing only in case', { platform: 'zoom', native_meeting_id: 'ABC' }],
    ])('%s is another meeting', async (_what, body) => {
      const { key } = await runner();
      await acquired(key, { platform: 'zoom', native_meeting_id: body.native_meeting_id === 'ABC' ? 'abc' : '123' });
      expect((await acquire(key, body)).status).toBe(201);
    });

    test('bots without a meeting id never conflict', async () => {
      const { key } = await runner();
      await acquired(key, { platform: 'zoom' });
      expect((await acquire(key, { platform: 'zoom' })).status).toBe(201);
    });

    test('another user may run a bot in the same meeting', async () => {
      const a = await runner();
      const b = await runner();
      await acquired(a.key, { platform: 'zoom', native_meeting_id: '123' });
      expect((await acquire(b.key, { platform: 'zoom', native_meeting_id: '123' })).status).toBe(201);
    });

    test('after the first is released, by the user or the admin, the meeting is free again', async () => {
      const { key } = await runner();
      const first = await acquired(key, { platform: 'zoom', native_meeting_id: '123' });
      await release(key, first.id).expect(204);
      const second = await acquired(key, { platform: 'zoom', native_meeting_id: '123' });
      await forceRelease(second.id).expect(204);
      expect((await acquire(key, { platform: 'zoom', native_meeting_id: '123' })).status).toBe(201);
    });

    test("after the first's lease ran out (no sweep yet), the meeting is free again", async () => {
      const { key } = await runner();
      const first = await acquired(key, { native_meeting_id: 'job-7', ttl_seconds: 30 });
      ctx.clock.advance(30);
      const second = await acquire(key, { native_meeting_id: 'job-7' });
      expect(second.status).toBe(201);
      expect(await botRow(first.id)).toMatchObject({ status: 'expired', ended_by: 'expiry', ended_at: at(30) });
    });

    // The duplicate is the lasting reason this request cannot succeed; the limit is a passing one.
    // A runner told 429 retries after Retry-After (and again and again while the meeting's bot
    // heartbeats) instead of learning, from existing_id, that its bot is already there.
    test('a duplicate meeting is 409 with existing_id even when the user is at the limit', async () => {
      const { key } = await runner({ max_concurrent_bots: 1 });
      const first = await acquired(key, { platform: 'zoom', native_meeting_id: '123' });
      const error = expectError(await acquire(key, { platform: 'zoom', native_meeting_id: '123' }), 409, 'CONFLICT');
      expect(error.details).toEqual({ existing_id: first.id });
    });
  });
});

describe('POST /v1/bots/{id}/heartbeat', () => {
  test("extends the lease to now + the bot's own ttl and shows the renewed lease", async () => {
    const { user, key } = await runner();
    const bot = await acquired(key, { ttl_seconds: 60, label: 'hb' });
    ctx.clock.advance(45);
    const res = await heartbeat(key, bot.id);
    expect(res.status).toBe(200);
    expect(res.body).toEqual(
      expectedBot({ id: bot.id, user_id: user.id, token_id: key.id, label: 'hb', ttl_seconds: 60, heartbeat_at: at(45), expires_at: at(105) }),
    );
    expect(await botRow(bot.id)).toMatchObject({ status: 'active', heartbeat_at: at(45), expires_at: at(105), ttl_seconds: 60, created_at: at(0) });
  });

  test('an empty JSON object is the same as no body', async () => {
    const { key } = await runner();
    const bot = await acquired(key, { ttl_seconds: 60 });
    ctx.clock.advance(10);
    const res = await heartbeat(key, bot.id, {});
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ expires_at: at(70), ttl_seconds: 60 });
  });

  test("a given ttl becomes the bot's ttl_seconds, and later heartbeats use it", async () => {
    const { key } = await runner();
    const bot = await acquired(key, { ttl_seconds: 60 });
    ctx.clock.advance(30);
    const res = await heartbeat(key, bot.id, { ttl_seconds: 600 });
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ ttl_seconds: 600, heartbeat_at: at(30), expires_at: at(630) });
    expect(await botRow(bot.id)).toMatchObject({ ttl_seconds: 600, expires_at: at(630) });

    ctx.clock.advance(500);
    expect((await heartbeat(key, bot.id)).body).toMatchObject({ ttl_seconds: 600, heartbeat_at: at(530), expires_at: at(1130) });
  });

  test('a shorter ttl shortens the lease (the lease ends ttl from now, whatever was left)', async () => {
    const { key } = await runner();
    const bot = await acquired(key, { ttl_seconds: 3600 });
    ctx.clock.advance(5);
    expect((await heartbeat(key, bot.id, { ttl_seconds: 10 })).body).toMatchObject({ ttl_seconds: 10, expires_at: at(15) });
  });

  test('heartbeats keep a bot alive far past its first expiry', async () => {
    const { key } = await runner({ max_concurrent_bots: 1 });
    const bot = await acquired(key, { ttl_seconds: 60 });
    for (let i = 0; i < 5; i++) {
      ctx.clock.advance(50);
      expect((await heartbeat(key, bot.id)).status).toBe(200);
    }
    ctx.clock.advance(50); // 300 s after acquiring, well past the first 60 s
    expect((await getMine(key, bot.id)).body).toMatchObject({ status: 'active', expires_at: at(310) });
    expect(ids(await listMine(key))).toEqual([bot.id]);
    expectError(await acquire(key), 429, 'CONCURRENCY_LIMIT_EXCEEDED');
  });

  test("any key of the bot's user may renew it; token_id stays the acquiring key", async () => {
    const { user, key } = await runner();
    const other = await mintToken(ctx, user.id, { scopes: ['bots:write'] });
    const bot = await acquired(key);
    const res = await heartbeat(other, bot.id);
    expect(res.status).toBe(200);
    expect(res.body.token_id).toBe(key.id);
  });

  test('one second before the lease ends it can still be renewed', async () => {
    const { key } = await runner();
    const bot = await acquired(key, { ttl_seconds: 60 });
    ctx.clock.advance(59);
    expect((await heartbeat(key, bot.id)).body).toMatchObject({ status: 'active', expires_at: at(119) });
  });

  test('at expires_at the lease is over: 409 with details.status "expired", and the row is not extended', async () => {
    const { key } = await runner();
    const bot = await acquired(key, { ttl_seconds: 60 });
    ctx.clock.advance(60);
    const error = expectError(await heartbeat(key, bot.id), 409, 'CONFLICT');
    expect(error.details).toEqual({ status: 'expired' });
    expect(error.message).toMatch(/expired/);
    expect(await botRow(bot.id)).toMatchObject({ expires_at: at(60), heartbeat_at: at(0), ttl_seconds: 60 });
  });

  test('a run-out lease already marked by the sweep is 409 "expired" too', async () => {
    const { key } = await runner();
    const bot = await acquired(key, { ttl_seconds: 60 });
    ctx.clock.advance(120);
    await ctx.app.bots.sweep();
    expect(expectError(await heartbeat(key, bot.id, { ttl_seconds: 600 }), 409, 'CONFLICT').details).toEqual({ status: 'expired' });
    expect(await botRow(bot.id)).toMatchObject({ status: 'expired', ttl_seconds: 60, expires_at: at(60) });
  });

  test('a released lease is 409 with details.status "released", and stays released', async () => {
    const { key } = await runner();
    const bot = await acquired(key);
    ctx.clock.advance(5);
    await release(key, bot.id).expect(204);
    ctx.clock.advance(5);
    const error = expectError(await heartbeat(key, bot.id), 409, 'CONFLICT');
    expect(error.details).toEqual({ status: 'released' });
    expect(error.message).toMatch(/released/);
    expect(await botRow(bot.id)).toMatchObject({ status: 'released', ended_at: at(5), ended_by: 'user', expires_at: at(300), heartbeat_at: at(0) });
  });

  test("another user's bot is 404, exactly like one that does not exist, and is not renewed", async () => {
    const owner = await runner();
    const stranger = await runner();
    const bot = await acquired(owner.key, { ttl_seconds: 60 });
    ctx.clock.advance(30);
    const foreign = expectError(await heartbeat(stranger.key, bot.id, { ttl_seconds: 3600 }), 404, 'NOT_FOUND');
    const missing = expectError(await heartbeat(stranger.key, 999999), 404, 'NOT_FOUND');
    expect(foreign.message).toBe(missing.message);
    expect(await botRow(bot.id)).toMatchObject({ expires_at: at(60), ttl_seconds: 60, heartbeat_at: at(0) });
  });

  test.each([
    ['a ttl of 9', { ttl_seconds: 9 }, 'ttl_seconds', 'must be >= 10'],
    ['a ttl of 86401', { ttl_seconds: 86401 }, 'ttl_seconds', 'must be <= 86400'],
    ['a ttl as a string', { ttl_seconds: '60' }, 'ttl_seconds', 'must be integer'],
    ['an unknown field', { status: 'active' }, 'status', 'is not a known field'],
  ])('refuses %s with 400, and the lease is unchanged', async (_what, body, field, message) => {
    const { key } = await runner();
    const bot = await acquired(key);
    ctx.clock.advance(10);
    expect(expectError(await heartbeat(key, bot.id, body), 400, 'VALIDATION_ERROR').details).toContainEqual({ field, in: 'body', message });
    expect(await botRow(bot.id)).toMatchObject({ expires_at: at(300), heartbeat_at: at(0), ttl_seconds: 300 });
  });

  test('accepts the ttl bounds 10 and 86400', async () => {
    const { key } = await runner();
    const bot = await acquired(key);
    expect((await heartbeat(key, bot.id, { ttl_seconds: 10 })).body).toMatchObject({ ttl_seconds: 10, expires_at: at(10) });
    expect((await heartbeat(key, bot.id, { ttl_seconds: 86400 })).body).toMatchObject({ ttl_seconds: 86400, expires_at: at(86400) });
  });

  test('a non-JSON body is 415 and malformed JSON 400', async () => {
    const { key } = await runner();
    const bot = await acquired(key);
    expectError(await request(ctx.app).post(`/v1/bots/${bot.id}/heartbeat`).set(as(key.token)).set('Content-Type', 'text/plain').send('ttl=60'), 415, 'UNSUPPORTED_MEDIA_TYPE');
    expectError(await request(ctx.app).post(`/v1/bots/${bot.id}/heartbeat`).set(as(key.token)).set('Content-Type', 'application/json').send('{'), 400, 'INVALID_JSON');
  });
});

describe('DELETE /v1/bots/{id} (release)', () => {
  test('204 with no body; the row says released, when and by whom; the slot is free', async () => {
    const { user, key } = await runner({ max_concurrent_bots: 1 });
    const bot = await acquired(key, { platform: 'zoom', native_meeting_id: '1' });
    ctx.clock.advance(90);
    const res = await release(key, bot.id);
    expect(res.status).toBe(204);
    expect(res.text).toBe('');
    expect(await botRow(bot.id)).toMatchObject({ status: 'released', ended_at: at(90), ended_by: 'user', expires_at: at(300) });
    expect((await getMine(key, bot.id)).body).toEqual(
      expectedBot({ id: bot.id, user_id: user.id, token_id: key.id, platform: 'zoom', native_meeting_id: '1', status: 'released', ended_at: at(90), ended_by: 'user' }),
    );
    expect((await listMine(key)).body.concurrency).toEqual({ limit: 1, active: 0 });
  });

  test('releasing again is 204 and changes nothing (idempotent)', async () => {
    const { key } = await runner();
    const bot = await acquired(key);
    ctx.clock.advance(10);
    await release(key, bot.id).expect(204);
    const after = await botRow(bot.id);
    ctx.clock.advance(10);
    expect((await release(key, bot.id)).status).toBe(204);
    expect(await botRow(bot.id)).toEqual(after);
    expect(after).toMatchObject({ ended_at: at(10), ended_by: 'user' });
  });

  test('releasing a run-out lease is 204 and it shows expired, ended when it ran out, by expiry', async () => {
    const { user, key } = await runner();
    const bot = await acquired(key, { ttl_seconds: 60 });
    ctx.clock.advance(100);
    expect((await release(key, bot.id)).status).toBe(204);
    expect((await getMine(key, bot.id)).body).toEqual(
      expectedBot({ id: bot.id, user_id: user.id, token_id: key.id, ttl_seconds: 60, expires_at: at(60), status: 'expired', ended_at: at(60), ended_by: 'expiry' }),
    );
    await ctx.app.bots.sweep();
    expect(await botRow(bot.id)).toMatchObject({ status: 'expired', ended_at: at(60), ended_by: 'expiry' });
  });

  test('releasing a bot the admin force-released is 204 and it stays released by the admin', async () => {
    const { key } = await runner();
    const bot = await acquired(key);
    ctx.clock.advance(10);
    await forceRelease(bot.id).expect(204);
    ctx.clock.advance(10);
    expect((await release(key, bot.id)).status).toBe(204);
    expect(await botRow(bot.id)).toMatchObject({ status: 'released', ended_by: 'admin', ended_at: at(10) });
  });

  test("another user's bot is 404, like an unknown one, and keeps running", async () => {
    const owner = await runner();
    const stranger = await runner();
    const bot = await acquired(owner.key);
    const foreign = expectError(await release(stranger.key, bot.id), 404, 'NOT_FOUND');
    const missing = expectError(await release(stranger.key, 424242), 404, 'NOT_FOUND');
    expect(foreign.message).toBe(missing.message);
    expect(await botRow(bot.id)).toMatchObject({ status: 'active', ended_at: null, ended_by: null });
    expect((await heartbeat(owner.key, bot.id)).status).toBe(200);
  });

  test('a body is refused: the operation takes none', async () => {
    const { key } = await runner();
    const bot = await acquired(key);
    const res = await request(ctx.app).delete(`/v1/bots/${bot.id}`).set(as(key.token)).send({ reason: 'done' });
    expect(expectError(res, 400, 'VALIDATION_ERROR').details).toEqual([{ field: 'body', in: 'body', message: 'this operation takes no request body' }]);
    expect((await botRow(bot.id))!.status).toBe('active');
  });
});

describe('GET /v1/bots', () => {
  test("lists only the caller's active bots, oldest first, with concurrency and the list envelope", async () => {
    const { user, key } = await runner({ max_concurrent_bots: 5 });
    const stranger = await runner();
    const a = await acquired(key, { label: 'a', ttl_seconds: 3600 });
    const released = await acquired(key, { label: 'released' });
    const runOut = await acquired(key, { label: 'run-out', ttl_seconds: 10 });
    const forced = await acquired(key, { label: 'forced' });
    await acquired(stranger.key, { label: 'not yours' });
    const b = await acquired(key, { label: 'b', ttl_seconds: 3600 });
    await release(key, released.id).expect(204);
    await forceRelease(forced.id).expect(204);
    ctx.clock.advance(20); // runOut has run out; nothing has swept it

    const res = await listMine(key);
    expect(res.status).toBe(200);
    expect(Object.keys(res.body).sort()).toEqual(['concurrency', 'data', 'meta']);
    expect(res.body.meta).toEqual({ limit: 50, next_cursor: null });
    expect(res.body.concurrency).toEqual({ limit: 5, active: 2 });
    expect(res.body.data).toEqual([
      expectedBot({ id: a.id, user_id: user.id, token_id: key.id, label: 'a', ttl_seconds: 3600, expires_at: at(3600) }),
      expectedBot({ id: b.id, user_id: user.id, token_id: key.id, label: 'b', ttl_seconds: 3600, expires_at: at(3600) }),
    ]);
    expect(ids(res)).not.toContain(runOut.id);
  });

  test('an empty list still shows the concurrency', async () => {
    const { key } = await runner({ max_concurrent_bots: 4 });
    const res = await listMine(key);
    expect(res.status).toBe(200);
    expect(res.body).toEqual({ data: [], meta: { limit: 50, next_cursor: null }, concurrency: { limit: 4, active: 0 } });
  });

  test('pages with limit and cursor; concurrency counts every active bot, not the page', async () => {
    const { key } = await runner({ max_concurrent_bots: 5 });
    const made = [];
    for (let i = 0; i < 5; i++) made.push((await acquired(key)).id);
    const first = await listMine(key, '?limit=2');
    expect(ids(first)).toEqual(made.slice(0, 2));
    expect(first.body.meta).toEqual({ limit: 2, next_cursor: expect.any(String) });
    expect(first.body.concurrency).toEqual({ limit: 5, active: 5 });
    const second = await listMine(key, `?limit=2&cursor=${first.body.meta.next_cursor}`);
    expect(ids(second)).toEqual(made.slice(2, 4));
    const third = await listMine(key, `?limit=2&cursor=${second.body.meta.next_cursor}`);
    expect(ids(third)).toEqual(made.slice(4));
    expect(third.body.meta).toEqual({ limit: 2, next_cursor: null });
  });

  test.each([
    ['limit=0', 'limit', 'must be >= 1'],
    ['limit=101', 'limit', 'must be <= 100'],
    ['limit=ten', 'limit', 'must be integer'],
    ['status=released', 'status', 'is not a known field'],
  ])('?%s is 400 in the query', async (query, field, message) => {
    const { key } = await runner();
    expect(expectError(await listMine(key, `?${query}`), 400, 'VALIDATION_ERROR').details).toContainEqual({ field, in: 'query', message });
  });

  test('a cursor this server did not issue is 400', async () => {
    const { key } = await runner();
    expect(expectError(await listMine(key, '?cursor=bm9wZQ'), 400, 'VALIDATION_ERROR').details).toEqual([
      { field: 'cursor', in: 'query', message: 'is not a cursor this server issued' },
    ]);
  });
});

describe('GET /v1/bots/{id}', () => {
  test('shows an active bot exactly', async () => {
    const { user, key } = await runner();
    const bot = await acquired(key, { platform: 'meet', native_meeting_id: 'x', label: 'L', metadata: { a: 1 } });
    const res = await getMine(key, bot.id);
    expect(res.status).toBe(200);
    expect(res.body).toEqual(
      expectedBot({ id: bot.id, user_id: user.id, token_id: key.id, platform: 'meet', native_meeting_id: 'x', label: 'L', metadata: { a: 1 } }),
    );
  });

  test('a run-out lease shows expired, ended at its expires_at by expiry, before any sweep (the row still says active)', async () => {
    const { user, key } = await runner();
    const bot = await acquired(key, { ttl_seconds: 30 });
    ctx.clock.advance(30);
    expect((await getMine(key, bot.id)).body).toEqual(
      expectedBot({ id: bot.id, user_id: user.id, token_id: key.id, ttl_seconds: 30, expires_at: at(30), status: 'expired', ended_at: at(30), ended_by: 'expiry' }),
    );
    expect(await botRow(bot.id)).toMatchObject({ status: 'active', ended_at: null });
    // Marking the row must not change what the client was already told.
    await ctx.app.bots.sweep();
    expect((await getMine(key, bot.id)).body).toMatchObject({ status: 'expired', ended_at: at(30), ended_by: 'expiry' });
  });

  test("another user's bot is 404, like an unknown one", async () => {
    const owner = await runner();
    const stranger = await runner();
    const bot = await acquired(owner.key);
    const foreign = expectError(await getMine(stranger.key, bot.id), 404, 'NOT_FOUND');
    const missing = expectError(await getMine(stranger.key, 99999), 404, 'NOT_FOUND');
    expect({ message: foreign.message, details: foreign.details }).toEqual({ message: missing.message, details: missing.details });
  });

  test.each([
    ['0', 'must be >= 1'],
    ['-1', 'must be >= 1'],
    ['abc', 'must be integer'],
    ['1.5', 'must be integer'],
    ['2147483648', 'must be <= 2147483647'],
  ])('an id of %s is 400 in the path, on every bot route', async (id, message) => {
    const { key } = await runner();
    const problem = { field: 'id', in: 'path', message };
    const responses = [
      await request(ctx.app).get(`/v1/bots/${id}`).set(as(key.token)),
      await request(ctx.app).delete(`/v1/bots/${id}`).set(as(key.token)),
      await request(ctx.app).post(`/v1/bots/${id}/heartbeat`).set(as(key.token)),
      await request(ctx.app).get(`/admin/bots/${id}`).set(admin),
      await request(ctx.app).delete(`/admin/bots/${id}`).set(admin),
    ];
    for (const res of responses) expect(expectError(res, 400, 'VALIDATION_ERROR').details).toContainEqual(problem);
  });
});

describe('authentication and scopes on /v1/bots', () => {
  // Each user operation with the scope it needs; `run` sends it with the given headers.
  const operations: Array<[string, 'bots:read' | 'bots:write', (h: Record<string, string>, botId: number) => request.Test]> = [
    ['GET /v1/bots', 'bots:read', (h) => request(ctx.app).get('/v1/bots').set(h)],
    ['GET /v1/bots/{id}', 'bots:read', (h, id) => request(ctx.app).get(`/v1/bots/${id}`).set(h)],
    ['POST /v1/bots', 'bots:write', (h) => request(ctx.app).post('/v1/bots').set(h).send({ label: 'x' })],
    ['POST /v1/bots/{id}/heartbeat', 'bots:write', (h, id) => request(ctx.app).post(`/v1/bots/${id}/heartbeat`).set(h).send({ ttl_seconds: 3600 })],
    ['DELETE /v1/bots/{id}', 'bots:write', (h, id) => request(ctx.app).delete(`/v1/bots/${id}`).set(h)],
  ];

  /** A user with one running bot, whose row is compared before and after a refused request. */
  async function withBot() {
    const { user, key } = await runner();
    const bot = await acquired(key);
    ctx.clock.advance(10);
    return { user, key, bot, before: await allBotRows() };
  }

  test.each(operations)('%s without a key is 401 AUTHENTICATION_REQUIRED and changes nothing', async (_name, _scope, run) => {
    const { bot, before } = await withBot();
    const res = await run({}, bot.id);
    expectError(res, 401, 'AUTHENTICATION_REQUIRED');
    expect(res.headers['www-authenticate']).toBe('Bearer realm="keyward"');
    expect(await allBotRows()).toEqual(before);
  });

  test.each(operations)('%s with a key lacking its scope is 403 INSUFFICIENT_SCOPE naming it, and changes nothing', async (_name, scope, run) => {
    const { user, bot, before } = await withBot();
    const other = scope === 'bots:read' ? 'bots:write' : 'bots:read';
    const key = await mintToken(ctx, user.id, { scopes: [other, 'tokens:read', 'tokens:write'] });
    expect(expectError(await run(as(key.token), bot.id), 403, 'INSUFFICIENT_SCOPE').details).toEqual({ required: [scope] });
    expect(await allBotRows()).toEqual(before);
  });

  test.each(operations)('%s works with a key holding only its scope', async (_name, scope, run) => {
    const { user, bot } = await withBot();
    const key = await mintToken(ctx, user.id, { scopes: [scope] });
    expect((await run(as(key.token), bot.id)).status).toBeLessThan(300);
  });

  test.each(operations)('%s with the admin key is 401: the admin key never works on /v1', async (_name, _scope, run) => {
    const { bot, before } = await withBot();
    expectError(await run(admin, bot.id), 401, 'AUTHENTICATION_REQUIRED');
    expect(await allBotRows()).toEqual(before);
  });

  test('the scope is checked before the bot is looked up: a read-only key learns nothing about ids', async () => {
    const { user } = await runner();
    const key = await mintToken(ctx, user.id, { scopes: ['bots:read'] });
    expectError(await request(ctx.app).delete('/v1/bots/999').set(as(key.token)), 403, 'INSUFFICIENT_SCOPE');
    expectError(await request(ctx.app).post('/v1/bots/999/heartbeat').set(as(key.token)), 403, 'INSUFFICIENT_SCOPE');
  });

  test('Authorization: Bearer works like X-API-Key', async () => {
    const { user, key } = await runner();
    const res = await request(ctx.app).post('/v1/bots').set('Authorization', `Bearer ${key.token}`).send({});
    expect(res.status).toBe(201);
    expect(res.body).toMatchObject({ user_id: user.id, token_id: key.id });
  });

  test('a wrong key is 401 INVALID_API_KEY and acquires nothing', async () => {
    const { key } = await runner();
    const wrong = key.token.slice(0, -7) + (key.token.at(-7) === 'a' ? 'b' : 'a') + key.token.slice(-6);
    expectError(await request(ctx.app).post('/v1/bots').set(as(wrong)).send({}), 401, 'INVALID_API_KEY');
    expect(await allBotRows()).toEqual([]);
  });

  test("a disabled user's key is 403 USER_DISABLED on every bot route", async () => {
    const { user, bot, key, before } = await withBot();
    await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: true }).expect(200);
    for (const [, , run] of operations) expectError(await run(as(key.token), bot.id), 403, 'USER_DISABLED');
    expect(await allBotRows()).toEqual(before);
  });

  test('a revoked key is refused; the bot it acquired keeps its token_id and another key renews it', async () => {
    const { user, key } = await runner();
    const bot = await acquired(key);
    await request(ctx.app).delete(`/admin/tokens/${key.id}`).set(admin).expect(204);
    expectError(await heartbeat(key, bot.id), 401, 'API_KEY_REVOKED');
    const other = await mintToken(ctx, user.id, { scopes: BOTH });
    const res = await heartbeat(other, bot.id);
    expect(res.status).toBe(200);
    expect(res.body.token_id).toBe(key.id);
  });
});

describe('the sweep (ctx.app.bots.sweep)', () => {
  test('marks run-out leases expired as of when they ran out, and touches nothing else', async () => {
    const { key } = await runner({ max_concurrent_bots: 5 });
    const runOut = await acquired(key, { ttl_seconds: 10 });
    const alive = await acquired(key, { ttl_seconds: 3600 });
    const released = await acquired(key);
    ctx.clock.advance(5);
    await release(key, released.id).expect(204);
    ctx.clock.advance(100);
    const aliveBefore = await botRow(alive.id);
    const releasedBefore = await botRow(released.id);

    await ctx.app.bots.sweep();
    expect(await botRow(runOut.id)).toMatchObject({ status: 'expired', ended_at: at(10), ended_by: 'expiry', expires_at: at(10) });
    expect(await botRow(alive.id)).toEqual(aliveBefore);
    expect(await botRow(released.id)).toEqual(releasedBefore);
  });

  test('sweeping twice changes nothing more', async () => {
    const { key } = await runner();
    await acquired(key, { ttl_seconds: 10 });
    ctx.clock.advance(60);
    await ctx.app.bots.sweep();
    const once = await allBotRows();
    ctx.clock.advance(60);
    await ctx.app.bots.sweep();
    expect(await allBotRows()).toEqual(once);
  });

  describe('retention', () => {
    beforeEach(async () => {
      await ctx.close();
      ctx = await createTestApp({ env: { BOT_RETENTION: '1h' } });
    });

    test('deletes finished bots that ended more than BOT_RETENTION ago; then GET is 404 for the user and the admin', async () => {
      const { key } = await runner({ max_concurrent_bots: 5 });
      const released = await acquired(key);
      const forced = await acquired(key);
      const runOut = await acquired(key, { ttl_seconds: 60 });
      ctx.clock.advance(30);
      await release(key, released.id).expect(204); // ended at 30 s
      await forceRelease(forced.id).expect(204); // ended at 30 s
      ctx.clock.advance(3600 + 31); // 3661 s: all three ended more than an hour ago (run-out at 60 s)

      await ctx.app.bots.sweep();
      expect(await allBotRows()).toEqual([]);
      for (const id of [released.id, forced.id, runOut.id]) {
        expectError(await getMine(key, id), 404, 'NOT_FOUND');
        expectError(await adminGet(id), 404, 'NOT_FOUND');
      }
      // Releasing a bot that is gone is a 404, not a 204: there is nothing left to answer for.
      expectError(await release(key, released.id), 404, 'NOT_FOUND');
    });

    test('keeps bots that ended within the retention, and an active bot however old', async () => {
      const { key } = await runner({ max_concurrent_bots: 5 });
      const longRunning = await acquired(key, { ttl_seconds: 600 });
      const stopped = await acquired(key, { ttl_seconds: 600 });
      const forgotten = await acquired(key, { ttl_seconds: 600 });
      for (let t = 500; t <= 7500; t += 500) {
        ctx.clock.advance(500);
        await heartbeat(key, longRunning.id).expect(200);
        if (t <= 4000) await heartbeat(key, stopped.id).expect(200);
      }
      // now 7500 s. stopped was last renewed at 4000 s and ran out at 4600 s (2900 s ago: kept);
      // forgotten ran out at 600 s (6900 s ago: deleted).
      const recentlyReleased = await acquired(key);
      await release(key, recentlyReleased.id).expect(204);
      await ctx.app.bots.sweep();
      expect((await allBotRows()).map((r) => r.id)).toEqual([longRunning.id, stopped.id, recentlyReleased.id]);
      expect((await getMine(key, longRunning.id)).body).toMatchObject({ status: 'active', created_at: at(0) });
      expect((await getMine(key, stopped.id)).body).toMatchObject({ status: 'expired', ended_at: at(4600) });
      expectError(await getMine(key, forgotten.id), 404, 'NOT_FOUND');
    });

    test('the boundary: a bot that ended exactly BOT_RETENTION ago is kept, one millisecond more and it is gone', async () => {
      const { key } = await runner();
      const bot = await acquired(key);
      ctx.clock.advance(10);
      await release(key, bot.id).expect(204);
      ctx.clock.advance(3600);
      await ctx.app.bots.sweep();
      expect((await getMine(key, bot.id)).body).toMatchObject({ status: 'released', ended_at: at(10) });
      ctx.clock.advance(0.001);
      await ctx.app.bots.sweep();
      expectError(await getMine(key, bot.id), 404, 'NOT_FOUND');
    });
  });

  test('the default retention is 7 days', async () => {
    const { key } = await runner();
    const bot = await acquired(key);
    await release(key, bot.id).expect(204);
    ctx.clock.advance(7 * 86400 - 1);
    await ctx.app.bots.sweep();
    expect((await getMine(key, bot.id)).status).toBe(200);
    ctx.clock.advance(2);
    await ctx.app.bots.sweep();
    expectError(await getMine(key, bot.id), 404, 'NOT_FOUND');
  });
});

describe('admin: bots of every user', () => {
  /** Two users with bots in every state; times: acquired at 0, released at 5, run out at 10, now 20. */
  async function fixture() {
    const alice = await runner({ max_concurrent_bots: 5 });
    const bob = await runner({ max_concurrent_bots: 5 });
    const aActive = await acquired(alice.key, { label: 'a-active' });
    const bActive = await acquired(bob.key, { label: 'b-active' });
    const aReleased = await acquired(alice.key, { label: 'a-released' });
    const aRunOut = await acquired(alice.key, { label: 'a-run-out', ttl_seconds: 10 });
    const bForced = await acquired(bob.key, { label: 'b-forced' });
    ctx.clock.advance(5);
    await release(alice.key, aReleased.id).expect(204);
    await forceRelease(bForced.id).expect(204);
    ctx.clock.advance(15);
    return { alice, bob, aActive, bActive, aReleased, aRunOut, bForced };
  }

  describe('GET /admin/users/{id}/bots', () => {
    test('lists every bot of the user, whatever its status, oldest first, as the user would see them', async () => {
      const f = await fixture();
      const res = await request(ctx.app).get(`/admin/users/${f.alice.user.id}/bots`).set(admin);
      expect(res.status).toBe(200);
      const mine = { user_id: f.alice.user.id, token_id: f.alice.key.id };
      expect(res.body).toEqual({
        data: [
          expectedBot({ ...mine, id: f.aActive.id, label: 'a-active' }),
          expectedBot({ ...mine, id: f.aReleased.id, label: 'a-released', status: 'released', ended_at: at(5), ended_by: 'user' }),
          expectedBot({ ...mine, id: f.aRunOut.id, label: 'a-run-out', ttl_seconds: 10, expires_at: at(10), status: 'expired', ended_at: at(10), ended_by: 'expiry' }),
        ],
        meta: { limit: 50, next_cursor: null },
      });
    });

    test.each([
      ['active', (f: Awaited<ReturnType<typeof fixture>>) => [f.aActive.id]],
      ['released', (f: Awaited<ReturnType<typeof fixture>>) => [f.aReleased.id]],
      ['expired', (f: Awaited<ReturnType<typeof fixture>>) => [f.aRunOut.id]],
    ])('?status=%s filters by the status as shown (a run-out lease is expired before any sweep)', async (status, expected) => {
      const f = await fixture();
      const res = await request(ctx.app).get(`/admin/users/${f.alice.user.id}/bots?status=${status}`).set(admin);
      expect(res.status).toBe(200);
      expect(ids(res)).toEqual(expected(f));
      for (const b of res.body.data) expect(b.status).toBe(status);
    });

    test('pages', async () => {
      const f = await fixture();
      const first = await request(ctx.app).get(`/admin/users/${f.alice.user.id}/bots?limit=2`).set(admin);
      expect(ids(first)).toEqual([f.aActive.id, f.aReleased.id]);
      const second = await request(ctx.app).get(`/admin/users/${f.alice.user.id}/bots?limit=2&cursor=${first.body.meta.next_cursor}`).set(admin);
      expect(ids(second)).toEqual([f.aRunOut.id]);
      expect(second.body.meta).toEqual({ limit: 2, next_cursor: null });
    });

    test('an unknown user is 404, a bad status 400 in the query', async () => {
      expectError(await request(ctx.app).get('/admin/users/77/bots').set(admin), 404, 'NOT_FOUND');
      const { user } = await runner();
      expect(expectError(await request(ctx.app).get(`/admin/users/${user.id}/bots?status=running`).set(admin), 400, 'VALIDATION_ERROR').details).toContainEqual(
        expect.objectContaining({ field: 'status', in: 'query' }),
      );
    });

    test('a user with no bots is an empty page', async () => {
      const { user } = await runner();
      expect((await request(ctx.app).get(`/admin/users/${user.id}/bots`).set(admin)).body).toEqual({ data: [], meta: { limit: 50, next_cursor: null } });
    });
  });

  describe('GET /admin/bots', () => {
    test('lists every user\'s bots, oldest first', async () => {
      const f = await fixture();
      const res = await request(ctx.app).get('/admin/bots').set(admin);
      expect(res.status).toBe(200);
      expect(ids(res)).toEqual([f.aActive.id, f.bActive.id, f.aReleased.id, f.aRunOut.id, f.bForced.id]);
      expect(res.body.meta).toEqual({ limit: 50, next_cursor: null });
      expect(res.body.data[4]).toEqual(
        expectedBot({ id: f.bForced.id, user_id: f.bob.user.id, token_id: f.bob.key.id, label: 'b-forced', status: 'released', ended_at: at(5), ended_by: 'admin' }),
      );
    });

    test('status and user_id filter, alone and together', async () => {
      const f = await fixture();
      const get = async (q: string) => ids(await request(ctx.app).get(`/admin/bots?${q}`).set(admin).expect(200));
      expect(await get('status=active')).toEqual([f.aActive.id, f.bActive.id]);
      expect(await get('status=released')).toEqual([f.aReleased.id, f.bForced.id]);
      expect(await get('status=expired')).toEqual([f.aRunOut.id]);
      expect(await get(`user_id=${f.bob.user.id}`)).toEqual([f.bActive.id, f.bForced.id]);
      expect(await get(`user_id=${f.alice.user.id}&status=active`)).toEqual([f.aActive.id]);
      expect(await get(`user_id=${f.bob.user.id}&status=released`)).toEqual([f.bForced.id]);
      expect(await get(`user_id=${f.bob.user.id}&status=expired`)).toEqual([]);
    });

    test('pages across users with a filter', async () => {
      const f = await fixture();
      const first = await request(ctx.app).get('/admin/bots?status=released&limit=1').set(admin);
      expect(ids(first)).toEqual([f.aReleased.id]);
      const second = await request(ctx.app).get(`/admin/bots?status=released&limit=1&cursor=${first.body.meta.next_cursor}`).set(admin);
      expect(ids(second)).toEqual([f.bForced.id]);
      expect(second.body.meta.next_cursor).toBeNull();
    });

    test.each([
      ['status=running', 'status'],
      ['status=', 'status'],
      ['user_id=0', 'user_id'],
      ['user_id=abc', 'user_id'],
      ['owner=1', 'owner'],
    ])('?%s is 400 in the query', async (query, field) => {
      const error = expectError(await request(ctx.app).get(`/admin/bots?${query}`).set(admin), 400, 'VALIDATION_ERROR');
      expect(error.details).toContainEqual(expect.objectContaining({ field, in: 'query' }));
    });

    test('an unknown user_id is 404, not an empty list', async () => {
      await runner();
      expectError(await request(ctx.app).get('/admin/bots?user_id=999').set(admin), 404, 'NOT_FOUND');
      expectError(await request(ctx.app).get('/admin/bots?user_id=999&status=active').set(admin), 404, 'NOT_FOUND');
    });
  });

  describe('GET /admin/bots/{id}', () => {
    test("shows any user's bot exactly; unknown is 404", async () => {
      const f = await fixture();
      const res = await adminGet(f.aRunOut.id);
      expect(res.status).toBe(200);
      expect(res.body).toEqual(
        expectedBot({ id: f.aRunOut.id, user_id: f.alice.user.id, token_id: f.alice.key.id, label: 'a-run-out', ttl_seconds: 10, expires_at: at(10), status: 'expired', ended_at: at(10), ended_by: 'expiry' }),
      );
      expect((await adminGet(f.bActive.id)).body).toEqual(expectedBot({ id: f.bActive.id, user_id: f.bob.user.id, token_id: f.bob.key.id, label: 'b-active' }));
      expectError(await adminGet(31337), 404, 'NOT_FOUND');
    });
  });

  describe('DELETE /admin/bots/{id} (force release)', () => {
    test('204; released by the admin, now; the slot is free at once, so a user at the limit can acquire', async () => {
      const { user, key } = await runner({ max_concurrent_bots: 2 });
      const a = await acquired(key);
      await acquired(key);
      expectError(await acquire(key), 429, 'CONCURRENCY_LIMIT_EXCEEDED');
      ctx.clock.advance(7);

      const res = await forceRelease(a.id);
      expect(res.status).toBe(204);
      expect(res.text).toBe('');
      expect(await botRow(a.id)).toMatchObject({ status: 'released', ended_at: at(7), ended_by: 'admin' });
      expect((await getMine(key, a.id)).body).toEqual(
        expectedBot({ id: a.id, user_id: user.id, token_id: key.id, status: 'released', ended_at: at(7), ended_by: 'admin' }),
      );
      expect((await acquire(key)).status).toBe(201);
    });

    test("the runner's next heartbeat gets 409 released, and its lease is not revived", async () => {
      const { key } = await runner();
      const bot = await acquired(key);
      await forceRelease(bot.id).expect(204);
      expect(expectError(await heartbeat(key, bot.id), 409, 'CONFLICT').details).toEqual({ status: 'released' });
      expect((await botRow(bot.id))!.status).toBe('released');
      expect(ids(await listMine(key))).toEqual([]);
    });

    test('again is 204 and changes nothing; a bot the user released stays released by the user', async () => {
      const { key } = await runner();
      const bot = await acquired(key);
      const byUser = await acquired(key);
      ctx.clock.advance(3);
      await forceRelease(bot.id).expect(204);
      await release(key, byUser.id).expect(204);
      const before = await allBotRows();
      ctx.clock.advance(3);
      expect((await forceRelease(bot.id)).status).toBe(204);
      expect((await forceRelease(byUser.id)).status).toBe(204);
      expect(await allBotRows()).toEqual(before);
      expect(await botRow(byUser.id)).toMatchObject({ ended_by: 'user', ended_at: at(3) });
    });

    test('a run-out lease is 204 and still shows expired, by expiry', async () => {
      const { key } = await runner();
      const bot = await acquired(key, { ttl_seconds: 10 });
      ctx.clock.advance(20);
      expect((await forceRelease(bot.id)).status).toBe(204);
      expect((await adminGet(bot.id)).body).toMatchObject({ status: 'expired', ended_at: at(10), ended_by: 'expiry' });
    });

    test('an unknown bot is 404', async () => {
      expectError(await forceRelease(4040), 404, 'NOT_FOUND');
    });
  });

  test.each([
    ['GET', '/admin/bots'],
    ['GET', '/admin/bots/1'],
    ['DELETE', '/admin/bots/1'],
    ['GET', '/admin/users/1/bots'],
  ])('%s %s needs the admin key: none is 401, a user key is 401, a wrong admin key is 401 INVALID_ADMIN_KEY', async (method, path) => {
    const { key } = await runner();
    const bot = await acquired(key);
    const send = (h: Record<string, string>) => (method === 'GET' ? request(ctx.app).get(path).set(h) : request(ctx.app).delete(path).set(h));
    expectError(await send({}), 401, 'AUTHENTICATION_REQUIRED');
    expectError(await send(as(key.token)), 401, 'AUTHENTICATION_REQUIRED');
    expectError(await send({ 'X-Admin-API-Key': 'x'.repeat(44) }), 401, 'INVALID_ADMIN_KEY');
    expect(await botRow(bot.id)).toMatchObject({ status: 'active' });
  });
});

describe('users show active_bots and rate_limit_per_minute', () => {
  const getUser = (id: number) => request(ctx.app).get(`/admin/users/${id}`).set(admin);

  test('active_bots counts only unexpired active leases, beside max_concurrent_bots', async () => {
    const { user, key } = await runner({ max_concurrent_bots: 4 });
    const a = await acquired(key, { ttl_seconds: 3600 });
    await acquired(key, { ttl_seconds: 3600 });
    await acquired(key, { ttl_seconds: 10 });
    expect((await getUser(user.id)).body).toMatchObject({ max_concurrent_bots: 4, active_bots: 3 });

    ctx.clock.advance(10); // the short lease ran out; nothing swept it
    expect((await getUser(user.id)).body).toMatchObject({ active_bots: 2 });
    await release(key, a.id).expect(204);
    expect((await getUser(user.id)).body).toMatchObject({ active_bots: 1 });
    const patched = await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ name: 'x' });
    expect(patched.body).toMatchObject({ active_bots: 1 });
    expect((await request(ctx.app).get(`/admin/users/email/${encodeURIComponent(user.email)}`).set(admin)).body).toMatchObject({ active_bots: 1 });
  });

  test('the users list shows each user\'s own count', async () => {
    const a = await runner();
    const b = await runner();
    const c = await runner();
    await acquired(a.key);
    await acquired(a.key);
    await acquired(b.key);
    const cRunOut = await acquired(c.key, { ttl_seconds: 10 });
    ctx.clock.advance(10);
    const res = await request(ctx.app).get('/admin/users').set(admin);
    expect(res.status).toBe(200);
    const counts = Object.fromEntries((res.body.data as Array<{ id: number; active_bots: number }>).map((u) => [u.id, u.active_bots]));
    expect(counts).toEqual({ [a.user.id]: 2, [b.user.id]: 1, [c.user.id]: 0 });
    expect(cRunOut.user_id).toBe(c.user.id);
  });

  test('rate_limit_per_minute defaults to 600 and is shown on create, get, list and patch', async () => {
    const created = await request(ctx.app).post('/admin/users').set(admin).send({ email: 'r@example.com' });
    expect(created.body).toMatchObject({ rate_limit_per_minute: 600, active_bots: 0 });
    expect((await getUser(created.body.id)).body.rate_limit_per_minute).toBe(600);
    const patched = await request(ctx.app).patch(`/admin/users/${created.body.id}`).set(admin).send({ rate_limit_per_minute: 0 });
    expect(patched.status).toBe(200);
    expect(patched.body.rate_limit_per_minute).toBe(0);
    expect((await request(ctx.app).get('/admin/users').set(admin)).body.data[0].rate_limit_per_minute).toBe(0);
    const row = await ctx.storage.db.selectFrom('users').select('rate_limit_per_minute').where('id', '=', created.body.id).executeTakeFirstOrThrow();
    expect(row.rate_limit_per_minute).toBe(0);
  });

  test('a rate limit of 0 refuses every bot request before anything happens', async () => {
    const { user, key } = await runner();
    const bot = await acquired(key);
    await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ rate_limit_per_minute: 0 }).expect(200);
    const before = await allBotRows();
    expect(expectError(await acquire(key), 429, 'RATE_LIMITED').details).toMatchObject({ limit: 0 });
    expectError(await heartbeat(key, bot.id), 429, 'RATE_LIMITED');
    expectError(await release(key, bot.id), 429, 'RATE_LIMITED');
    expect(await allBotRows()).toEqual(before);
  });

  test('the default comes from RATE_LIMIT_PER_MINUTE', async () => {
    await ctx.close();
    ctx = await createTestApp({ env: { RATE_LIMIT_PER_MINUTE: '42' } });
    expect((await request(ctx.app).post('/admin/users').set(admin).send({ email: 'r@example.com' })).body.rate_limit_per_minute).toBe(42);
    expect((await request(ctx.app).post('/admin/users').set(admin).send({ email: 's@example.com', rate_limit_per_minute: 7 })).body.rate_limit_per_minute).toBe(7);
  });

  test.each([0, 1000000])('accepts rate_limit_per_minute %d on create', async (value) => {
    const res = await request(ctx.app).post('/admin/users').set(admin).send({ email: 'r@example.com', rate_limit_per_minute: value });
    expect(res.status).toBe(201);
    expect(res.body.rate_limit_per_minute).toBe(value);
  });

  test.each([
    [-1, 'must be >= 0'],
    [1000001, 'must be <= 1000000'],
    [1.5, 'must be integer'],
    ['600', 'must be integer'],
    [null, 'must be integer'],
  ])('refuses rate_limit_per_minute %p on create and patch', async (value, message) => {
    const create = await request(ctx.app).post('/admin/users').set(admin).send({ email: 'r@example.com', rate_limit_per_minute: value });
    expect(expectError(create, 400, 'VALIDATION_ERROR').details).toContainEqual({ field: 'rate_limit_per_minute', in: 'body', message });
    const { user } = await runner();
    const patch = await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ rate_limit_per_minute: value });
    expect(expectError(patch, 400, 'VALIDATION_ERROR').details).toContainEqual({ field: 'rate_limit_per_minute', in: 'body', message });
    expect((await getUser(user.id)).body.rate_limit_per_minute).toBe(600);
  });
});

describe('deleting a user', () => {
  test('releases their active bots in the same step, by the admin, and their keys stop working', async () => {
    const { user, key } = await runner({ max_concurrent_bots: 5 });
    const stranger = await runner();
    const a = await acquired(key, { platform: 'zoom', native_meeting_id: '1' });
    const b = await acquired(key);
    const theirs = await acquired(stranger.key);
    ctx.clock.advance(12);

    expect((await request(ctx.app).delete(`/admin/users/${user.id}`).set(admin)).status).toBe(204);
    for (const bot of [a, b]) {
      expect(await botRow(bot.id)).toMatchObject({ status: 'released', ended_at: at(12), ended_by: 'admin' });
      expect((await adminGet(bot.id)).body).toMatchObject({ status: 'released', ended_at: at(12), ended_by: 'admin' });
    }
    expect(await botRow(theirs.id)).toMatchObject({ status: 'active', ended_at: null });
    expectError(await heartbeat(key, a.id), 401, 'API_KEY_REVOKED');
    expect(ids(await request(ctx.app).get('/admin/bots?status=active').set(admin))).toEqual([theirs.id]);
  });

  test('bots that had already ended keep how they ended', async () => {
    const { user, key } = await runner({ max_concurrent_bots: 5 });
    const released = await acquired(key);
    const runOut = await acquired(key, { ttl_seconds: 10 });
    ctx.clock.advance(5);
    await release(key, released.id).expect(204);
    ctx.clock.advance(20); // runOut ran out at 10 s; nothing has swept it
    expect((await adminGet(runOut.id)).body).toMatchObject({ status: 'expired', ended_at: at(10), ended_by: 'expiry' });

    await request(ctx.app).delete(`/admin/users/${user.id}`).set(admin).expect(204);
    expect(await botRow(released.id)).toMatchObject({ status: 'released', ended_at: at(5), ended_by: 'user' });
    // A lease that ran out before the delete was not running: deleting the user must not rewrite it
    // as released by the admin 15 s after it ended.
    expect((await adminGet(runOut.id)).body).toMatchObject({ status: 'expired', ended_at: at(10), ended_by: 'expiry' });
  });
});
