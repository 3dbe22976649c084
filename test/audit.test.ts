import { createHash } from 'node:crypto';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { type KyselyPlugin, sql } from 'kysely';
import request from 'supertest';
import { openSqlite } from '../db/database';
import { createApp } from '../src/app';
import { adminFingerprint } from '../src/audit/audit';
import { createLogger } from '../src/logger';
import { AUTH_FAILURE_ADDRESSES_PER_FLUSH } from '../src/audit/audit.service';
import { generateToken } from '../src/tokens/token-format';
import { ADMIN_KEY, admin, allowWrites, createTestApp, createUser, expectError, mintToken, refuseWrites, tempDir, type TestContext } from './helpers/app';

/**
 * The audit log: one entry per change, written in the change's own transaction, naming who did it,
 * from where and in which request, and never a secret. Then reading it (filters, keyset pages, one
 * user's history), what the database refuses (changing an entry), retention, and how failed
 * authentication is counted per address instead of written per attempt.
 */

const T0 = Date.parse('2026-01-01T00:00:00.000Z');
/** The ISO time `s` seconds after the fake clock's start. */
const at = (s: number) => new Date(T0 + s * 1000).toISOString();

// supertest dials 127.0.0.1; the app may see it as ::ffff:127.0.0.1, which must be recorded as 127.0.0.1.
const LOCAL = '127.0.0.1';
const TRUSTED = { SSO_TRUSTED_PROXIES: '127.0.0.1, ::1' };
const CSRF = { 'X-Keyward-CSRF': '1' };
const ALICE = { email: 'alice@example.com', subject: 'idp|alice', username: 'alice' };
const ssoHeaders = (person: { email: string; subject: string; username?: string } = ALICE): Record<string, string> => ({
  'X-Forwarded-Email': person.email,
  'X-Forwarded-User': person.subject,
  ...(person.username === undefined ? {} : { 'X-Forwarded-Preferred-Username': person.username }),
});
const as = (token: string) => ({ 'X-API-Key': token });

const contexts: TestContext[] = [];
async function app(env: Record<string, string> = {}): Promise<TestContext> {
  const ctx = await createTestApp({ env });
  contexts.push(ctx);
  return ctx;
}
const dirs: string[] = [];
/** A temporary directory, removed after the test (once its databases are closed). */
function scratchDir(): string {
  const dir = tempDir();
  dirs.push(dir);
  return dir;
}
afterEach(async () => {
  for (const ctx of contexts.splice(0)) await ctx.close();
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

interface Entry {
  id: number;
  at: string;
  action: string;
  actor: { type: string; id: string; user_id: number | null; token_id: number | null; email: string | null };
  target: { type: string; id: string; user_id: number | null } | null;
  ip: string | null;
  request_id: string | null;
  details: Record<string, unknown> | null;
}

type Key = Awaited<ReturnType<typeof mintToken>>;

const auditRows = (ctx: TestContext) => ctx.storage.db.selectFrom('audit_events').selectAll().orderBy('id').execute();
const tokenRow = (ctx: TestContext, id: number) => ctx.storage.db.selectFrom('tokens').selectAll().where('id', '=', id).executeTakeFirstOrThrow();
const allTokens = (ctx: TestContext) => ctx.storage.db.selectFrom('tokens').selectAll().orderBy('id').execute();
const userRow = (ctx: TestContext, id: number) => ctx.storage.db.selectFrom('users').selectAll().where('id', '=', id).executeTakeFirstOrThrow();
const allUsers = (ctx: TestContext) => ctx.storage.db.selectFrom('users').selectAll().orderBy('id').execute();
const botRow = (ctx: TestContext, id: number) => ctx.storage.db.selectFrom('bots').selectAll().where('id', '=', id).executeTakeFirstOrThrow();

/** The id of the newest entry (0 if none): what a test compares "after" against. */
async function mark(ctx: TestContext): Promise<number> {
  const row = await ctx.storage.db.selectFrom('audit_events').select((eb) => eb.fn.max('id').as('max')).executeTakeFirst();
  return Number(row?.max ?? 0);
}

/** Every entry the API shows for `query`, walking all pages, newest first. */
async function listAll(ctx: TestContext, path = '/admin/audit', query: Record<string, string> = {}): Promise<Entry[]> {
  const out: Entry[] = [];
  let cursor: string | null = null;
  for (;;) {
    const res = await request(ctx.app)
      .get(path)
      .set(admin)
      .query({ ...query, limit: '100', ...(cursor === null ? {} : { cursor }) });
    if (res.status !== 200) throw new Error(`list ${path}: ${res.status} ${JSON.stringify(res.body)}`);
    out.push(...(res.body.data as Entry[]));
    cursor = res.body.meta.next_cursor;
    if (cursor === null) return out;
  }
}

/** The entries written after `since` (a mark), oldest first, as the API shows them. */
async function entriesAfter(ctx: TestContext, since: number): Promise<Entry[]> {
  return (await listAll(ctx)).filter((e) => e.id > since).reverse();
}

const adminActor = (ctx: TestContext) => ({
  type: 'admin',
  id: `admin:${adminFingerprint(ctx.config.adminKeyDigest)}`,
  user_id: null,
  token_id: null,
  email: null,
  name: null,
});
const keyActor = (key: { id: number; user_id?: number }, userId: number) => ({ type: 'key', id: `token:${key.id}`, user_id: userId, token_id: key.id, email: null, name: null });
const ssoActor = (userId: number, person = ALICE) => ({ type: 'sso', id: `sso:${person.subject}`, user_id: userId, token_id: null, email: person.email, name: null });
const ANONYMOUS = { type: 'anonymous', id: 'anonymous', user_id: null, token_id: null, email: null, name: null };
const userTarget = (id: number) => ({ type: 'user', id: String(id), user_id: id });
const tokenTarget = (id: number, userId: number) => ({ type: 'token', id: String(id), user_id: userId });

/** What a minted token's entry says about it: what it may do, never its secret. */
const mintedFacts = (fields: { name?: string | null; scopes?: string[]; expires_at?: string | null; allowed_ips?: string[] | null; environment?: string; rotated_from?: number | null } = {}) => ({
  name: null,
  scopes: ['bots:read', 'bots:write'],
  expires_at: null,
  allowed_ips: null,
  metadata: null,
  rate_limit_per_minute: null,
  environment: 'live',
  rotated_from: null,
  ...fields,
});

/** Exactly one entry since `since`, equal to `expected`, with the request's id and address. */
async function expectOneEntry(ctx: TestContext, since: number, res: request.Response, expected: Omit<Entry, 'id' | 'ip' | 'request_id'> & { ip?: string }): Promise<Entry> {
  const entries = await entriesAfter(ctx, since);
  expect(entries).toEqual([{ id: expect.any(Number), ip: LOCAL, request_id: res.headers['x-request-id'], ...expected }]);
  return entries[0]!;
}

async function expectNoEntry(ctx: TestContext, since: number): Promise<void> {
  expect(await entriesAfter(ctx, since)).toEqual([]);
}

async function acquireBot(ctx: TestContext, key: Key, body: Record<string, unknown> = {}): Promise<{ id: number; user_id: number; token_id: number; created_at: string }> {
  const res = await request(ctx.app).post('/v1/bots').set(as(key.token)).send(body);
  if (res.status !== 201) throw new Error(`acquire: ${res.status} ${JSON.stringify(res.body)}`);
  return res.body;
}

/** A user Alice's SSO identity is already linked to (linked in the database, so no entry is written for it). */
async function linkedAlice(ctx: TestContext): Promise<{ id: number; email: string }> {
  const user = await createUser(ctx, { email: ALICE.email });
  await ctx.storage.db.updateTable('users').set({ sso_subject: ALICE.subject }).where('id', '=', user.id).execute();
  return user;
}

describe('every change writes exactly one entry', () => {
  test('user.created by the admin records every field set, the admin, the address and the request id', async () => {
    const ctx = await app();
    const res = await request(ctx.app)
      .post('/admin/users')
      .set(admin)
      .set('X-Request-Id', 'create-ann-1')
      .send({ email: 'Ann@Example.com', name: 'Ann', max_concurrent_bots: 2, rate_limit_per_minute: 30, credits: 5, data: { team: 'red' } });
    expect(res.status).toBe(201);
    expect(res.headers['x-request-id']).toBe('create-ann-1');
    await expectOneEntry(ctx, 0, res, {
      at: at(0),
      action: 'user.created',
      actor: adminActor(ctx),
      target: userTarget(res.body.id),
      details: {
        email: 'Ann@Example.com',
        name: 'Ann',
        max_concurrent_bots: 2,
        rate_limit_per_minute: 30,
        credits: 5,
        external_id: null,
        sso_subject: null,
        data: { team: 'red' },
        disabled: false,
      },
    });
  });

  test('user.updated records old → new for each field a PATCH changed, one entry per PATCH', async () => {
    const ctx = await app();
    const user = await createUser(ctx, { email: 'bo@example.com' });
    const patches: Array<[Record<string, unknown>, Record<string, { old: unknown; new: unknown }>]> = [
      [{ name: 'Bo' }, { name: { old: null, new: 'Bo' } }],
      [{ max_concurrent_bots: 7 }, { max_concurrent_bots: { old: 3, new: 7 } }],
      [{ rate_limit_per_minute: 90 }, { rate_limit_per_minute: { old: 600, new: 90 } }],
      [{ credits: 25 }, { credits: { old: 0, new: 25 } }],
      [{ data: { plan: 'pro', seats: 2 } }, { data: { old: null, new: { plan: 'pro', seats: 2 } } }],
      [{ data: { plan: 'team', seats: 2 } }, { data: { old: { plan: 'pro', seats: 2 }, new: { plan: 'team', seats: 2 } } }],
      // Several fields at once are one change, one entry; the unchanged one is not listed.
      [
        { name: 'Bo B.', max_concurrent_bots: 0, credits: 25 },
        { name: { old: 'Bo', new: 'Bo B.' }, max_concurrent_bots: { old: 7, new: 0 } },
      ],
      [{ name: null }, { name: { old: 'Bo B.', new: null } }],
    ];
    for (const [body, details] of patches) {
      const before = await mark(ctx);
      ctx.clock.advance(60);
      const res = await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send(body);
      expect(res.status).toBe(200);
      await expectOneEntry(ctx, before, res, {
        at: ctx.clock.now().toISOString(),
        action: 'user.updated',
        actor: adminActor(ctx),
        target: userTarget(user.id),
        details,
      });
    }
  });

  test('a PATCH that changes nothing writes no entry', async () => {
    const ctx = await app();
    const user = await createUser(ctx, { email: 'cy@example.com', name: 'Cy', data: { a: 1 } });
    const before = await mark(ctx);
    for (const body of [{ name: 'Cy' }, { max_concurrent_bots: 3, rate_limit_per_minute: 600, credits: 0 }, { data: { a: 1 } }, { disabled: false }]) {
      expect((await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send(body)).status).toBe(200);
    }
    await expectNoEntry(ctx, before);
  });

  test('disabling and enabling are user.disabled and user.enabled; disabling a disabled user again writes nothing', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    let before = await mark(ctx);
    const off = await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: true });
    expect(off.status).toBe(200);
    await expectOneEntry(ctx, before, off, {
      at: at(0),
      action: 'user.disabled',
      actor: adminActor(ctx),
      target: userTarget(user.id),
      details: { disabled: { old: false, new: true } },
    });

    before = await mark(ctx);
    expect((await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: true })).status).toBe(200);
    await expectNoEntry(ctx, before);

    ctx.clock.advance(30);
    const on = await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: false, credits: 3 });
    expect(on.status).toBe(200);
    await expectOneEntry(ctx, before, on, {
      at: at(30),
      action: 'user.enabled',
      actor: adminActor(ctx),
      target: userTarget(user.id),
      details: { disabled: { old: true, new: false }, credits: { old: 0, new: 3 } },
    });
  });

  test('user.deleted counts the tokens it revoked and the bots it released', async () => {
    const ctx = await app();
    const user = await createUser(ctx, { email: 'dee@example.com' });
    const runner = await mintToken(ctx, user.id);
    await mintToken(ctx, user.id, { name: 'spare' });
    const gone = await mintToken(ctx, user.id, { name: 'gone' });
    expect((await request(ctx.app).delete(`/admin/tokens/${gone.id}`).set(admin)).status).toBe(204);
    await acquireBot(ctx, runner);
    const done = await acquireBot(ctx, runner);
    expect((await request(ctx.app).delete(`/v1/bots/${done.id}`).set(as(runner.token))).status).toBe(204);

    const before = await mark(ctx);
    ctx.clock.advance(10);
    const res = await request(ctx.app).delete(`/admin/users/${user.id}`).set(admin);
    expect(res.status).toBe(204);
    await expectOneEntry(ctx, before, res, {
      at: at(10),
      action: 'user.deleted',
      actor: adminActor(ctx),
      target: userTarget(user.id),
      details: { email: 'dee@example.com', tokens_revoked: 2, bots_released: 1 },
    });
  });

  test('a first SSO sign-in that links a user is user.sso_linked by the signed-in person; later sign-ins write nothing', async () => {
    const ctx = await app(TRUSTED);
    const user = await createUser(ctx, { email: 'Alice@Example.com' });
    const before = await mark(ctx);
    const res = await request(ctx.app).get('/sso/me').set(ssoHeaders());
    expect(res.status).toBe(200);
    await expectOneEntry(ctx, before, res, {
      at: at(0),
      action: 'user.sso_linked',
      actor: ssoActor(user.id),
      target: userTarget(user.id),
      details: { sso_subject: { old: null, new: ALICE.subject } },
    });

    const again = await mark(ctx);
    expect((await request(ctx.app).get('/sso/me').set(ssoHeaders())).status).toBe(200);
    await expectNoEntry(ctx, again);
  });

  test('SSO auto-provisioning is user.created by the signed-in person, marked auto_provisioned', async () => {
    const ctx = await app({ ...TRUSTED, SSO_AUTO_PROVISION: 'on', SSO_DEFAULT_MAX_CONCURRENT_BOTS: '7', RATE_LIMIT_PER_MINUTE: '42' });
    const res = await request(ctx.app).get('/sso/me').set(ssoHeaders());
    expect(res.status).toBe(200);
    const id = res.body.user.id as number;
    await expectOneEntry(ctx, 0, res, {
      at: at(0),
      action: 'user.created',
      actor: ssoActor(id),
      target: userTarget(id),
      details: { email: ALICE.email, name: 'alice', max_concurrent_bots: 7, rate_limit_per_minute: 42, sso_subject: ALICE.subject, auto_provisioned: true },
    });
    const again = await mark(ctx);
    expect((await request(ctx.app).get('/sso/me').set(ssoHeaders())).status).toBe(200);
    await expectNoEntry(ctx, again);
  });

  test('the admin mints, updates, rotates and revokes: one entry each; a no-op PATCH and a second revoke write nothing', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    let before = await mark(ctx);

    const minted = await request(ctx.app).post(`/admin/users/${user.id}/tokens`).set(admin).send({ name: 'ci', scopes: ['bots:read'], expires_in: 3600 });
    expect(minted.status).toBe(201);
    const id = minted.body.id as number;
    await expectOneEntry(ctx, before, minted, {
      at: at(0),
      action: 'token.minted',
      actor: adminActor(ctx),
      target: tokenTarget(id, user.id),
      details: mintedFacts({ name: 'ci', scopes: ['bots:read'], expires_at: at(3600) }),
    });

    before = await mark(ctx);
    ctx.clock.advance(60);
    const updated = await request(ctx.app)
      .patch(`/admin/tokens/${id}`)
      .set(admin)
      .send({ name: 'ci-2', scopes: ['bots:read', 'tokens:read'], allowed_ips: ['10.1.2.3/8'], expires_at: at(1800) });
    expect(updated.status).toBe(200);
    await expectOneEntry(ctx, before, updated, {
      at: at(60),
      action: 'token.updated',
      actor: adminActor(ctx),
      target: tokenTarget(id, user.id),
      details: {
        name: { old: 'ci', new: 'ci-2' },
        scopes: { old: ['bots:read'], new: ['bots:read', 'tokens:read'] },
        allowed_ips: { old: null, new: ['10.0.0.0/8'] },
        expires_at: { old: at(3600), new: at(1800) },
      },
    });

    before = await mark(ctx);
    const same = await request(ctx.app).patch(`/admin/tokens/${id}`).set(admin).send({ name: 'ci-2', allowed_ips: ['10.0.0.0/8'] });
    expect(same.status).toBe(200);
    await expectNoEntry(ctx, before);

    ctx.clock.advance(60);
    const rotated = await request(ctx.app).post(`/admin/tokens/${id}/rotate`).set(admin).send({ grace_period_seconds: 300 });
    expect(rotated.status).toBe(201);
    const successor = rotated.body.id as number;
    await expectOneEntry(ctx, before, rotated, {
      at: at(120),
      action: 'token.rotated',
      actor: adminActor(ctx),
      target: tokenTarget(id, user.id),
      details: {
        successor_id: successor,
        grace_period_seconds: 300,
        expires_at: { old: at(1800), new: at(420) },
        // The successor gets the old token's lifetime (created at 0, expiring at 1800) counted from now.
        successor: mintedFacts({ name: 'ci-2', scopes: ['bots:read', 'tokens:read'], allowed_ips: ['10.0.0.0/8'], expires_at: at(120 + 1800), rotated_from: id }),
      },
    });

    before = await mark(ctx);
    const revoked = await request(ctx.app).delete(`/admin/tokens/${successor}`).set(admin);
    expect(revoked.status).toBe(204);
    await expectOneEntry(ctx, before, revoked, {
      at: at(120),
      action: 'token.revoked',
      actor: adminActor(ctx),
      target: tokenTarget(successor, user.id),
      details: null,
    });

    before = await mark(ctx);
    ctx.clock.advance(5);
    expect((await request(ctx.app).delete(`/admin/tokens/${successor}`).set(admin)).status).toBe(204);
    await expectNoEntry(ctx, before);
    expect((await tokenRow(ctx, successor)).revoked_at).toBe(at(120));
  });

  test('the admin is named by a 16-hex fingerprint: the same for the same key, another for another key, never the key', async () => {
    const ctx = await app();
    const second = await app();
    const other = await app({ ADMIN_API_TOKEN: 'kw-admin-another-key-zyxwvutsrqponmlkjihgfedcba' });
    for (const c of [ctx, second]) await createUser(c);
    const user = await createUser(ctx);
    await mintToken(ctx, user.id);
    expect((await request(other.app).post('/admin/users').set('X-Admin-API-Key', 'kw-admin-another-key-zyxwvutsrqponmlkjihgfedcba').send({ email: 'o@example.com' })).status).toBe(201);

    const ids = (await auditRows(ctx)).map((r) => r.actor_id);
    expect(ids).toHaveLength(3);
    expect(ids[0]).toMatch(/^admin:[0-9a-f]{16}$/);
    expect(new Set(ids)).toEqual(new Set([ids[0]]));
    expect((await auditRows(second)).map((r) => r.actor_id)).toEqual([ids[0]]);
    const otherId = (await auditRows(other))[0]!.actor_id;
    expect(otherId).toMatch(/^admin:[0-9a-f]{16}$/);
    expect(otherId).not.toBe(ids[0]);
    // Not a slice of the key or of its plain SHA-256 (which would let anyone holding a guess confirm it).
    const fingerprint = ids[0]!.slice('admin:'.length);
    expect(ADMIN_KEY).not.toContain(fingerprint);
    expect(createHash('sha256').update(ADMIN_KEY).digest('hex')).not.toContain(fingerprint);
  });

  test('a user key mints, rotates and revokes via /v1/tokens: the actor is token:<id> with its user', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    const key = await mintToken(ctx, user.id, { scopes: ['bots:read', 'tokens:read', 'tokens:write'] });
    let before = await mark(ctx);

    const minted = await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ name: 'child', scopes: ['bots:read'] });
    expect(minted.status).toBe(201);
    const child = minted.body.id as number;
    await expectOneEntry(ctx, before, minted, {
      at: at(0),
      action: 'token.minted',
      actor: keyActor(key, user.id),
      target: tokenTarget(child, user.id),
      details: mintedFacts({ name: 'child', scopes: ['bots:read'] }),
    });

    before = await mark(ctx);
    const rotated = await request(ctx.app).post(`/v1/tokens/${child}/rotate`).set(as(key.token)).send({ grace_period_seconds: 0 });
    expect(rotated.status).toBe(201);
    const successor = rotated.body.id as number;
    await expectOneEntry(ctx, before, rotated, {
      at: at(0),
      action: 'token.rotated',
      actor: keyActor(key, user.id),
      target: tokenTarget(child, user.id),
      details: {
        successor_id: successor,
        grace_period_seconds: 0,
        expires_at: { old: null, new: at(0) },
        successor: mintedFacts({ name: 'child', scopes: ['bots:read'], rotated_from: child }),
      },
    });

    before = await mark(ctx);
    const revoked = await request(ctx.app).delete(`/v1/tokens/${successor}`).set(as(key.token));
    expect(revoked.status).toBe(204);
    await expectOneEntry(ctx, before, revoked, {
      at: at(0),
      action: 'token.revoked',
      actor: keyActor(key, user.id),
      target: tokenTarget(successor, user.id),
      details: null,
    });
    before = await mark(ctx);
    expect((await request(ctx.app).delete(`/v1/tokens/${successor}`).set(as(key.token))).status).toBe(204);
    await expectNoEntry(ctx, before);
  });

  test('a signed-in person mints, rotates and revokes via /sso/tokens: the actor is sso:<subject> with email and user', async () => {
    const ctx = await app(TRUSTED);
    const user = await linkedAlice(ctx);
    let before = await mark(ctx);

    const minted = await request(ctx.app).post('/sso/tokens').set(ssoHeaders()).set(CSRF).send({ name: 'laptop' });
    expect(minted.status).toBe(201);
    const id = minted.body.id as number;
    await expectOneEntry(ctx, before, minted, {
      at: at(0),
      action: 'token.minted',
      actor: ssoActor(user.id),
      target: tokenTarget(id, user.id),
      details: mintedFacts({ name: 'laptop' }),
    });

    before = await mark(ctx);
    const rotated = await request(ctx.app).post(`/sso/tokens/${id}/rotate`).set(ssoHeaders()).set(CSRF).send({});
    expect(rotated.status).toBe(201);
    const successor = rotated.body.id as number;
    await expectOneEntry(ctx, before, rotated, {
      at: at(0),
      action: 'token.rotated',
      actor: ssoActor(user.id),
      target: tokenTarget(id, user.id),
      details: {
        successor_id: successor,
        grace_period_seconds: 86_400,
        expires_at: { old: null, new: at(86_400) },
        successor: mintedFacts({ name: 'laptop', rotated_from: id }),
      },
    });

    before = await mark(ctx);
    const revoked = await request(ctx.app).delete(`/sso/tokens/${id}`).set(ssoHeaders()).set(CSRF);
    expect(revoked.status).toBe(204);
    await expectOneEntry(ctx, before, revoked, {
      at: at(0),
      action: 'token.revoked',
      actor: ssoActor(user.id),
      target: tokenTarget(id, user.id),
      details: null,
    });
  });

  test('bot.force_released by the admin; not when the user releases their own bot, nor for a bot already ended', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    const key = await mintToken(ctx, user.id);
    const bot = await acquireBot(ctx, key, { platform: 'zoom', native_meeting_id: 'm-1', label: 'standup' });
    const own = await acquireBot(ctx, key);

    let before = await mark(ctx);
    ctx.clock.advance(20);
    const res = await request(ctx.app).delete(`/admin/bots/${bot.id}`).set(admin);
    expect(res.status).toBe(204);
    await expectOneEntry(ctx, before, res, {
      at: at(20),
      action: 'bot.force_released',
      actor: adminActor(ctx),
      target: { type: 'bot', id: String(bot.id), user_id: user.id },
      details: { platform: 'zoom', native_meeting_id: 'm-1', label: 'standup', token_id: key.id, created_at: at(0) },
    });

    before = await mark(ctx);
    expect((await request(ctx.app).delete(`/admin/bots/${bot.id}`).set(admin)).status).toBe(204);
    expect((await request(ctx.app).delete(`/v1/bots/${own.id}`).set(as(key.token))).status).toBe(204);
    expect((await botRow(ctx, own.id)).ended_by).toBe('user');
    // Already released by the user: the admin's release ends nothing and records nothing.
    expect((await request(ctx.app).delete(`/admin/bots/${own.id}`).set(admin)).status).toBe(204);
    await expectNoEntry(ctx, before);
  });

  test('backup.downloaded: handing out the database is an entry with its size and schema version', async () => {
    const ctx = await app();
    await createUser(ctx);
    const before = await mark(ctx);
    const res = await request(ctx.app).post('/admin/backup').set(admin).buffer(true);
    if (ctx.storage.dialect === 'postgres') {
      // POST /admin/backup copies a SQLite file; on PostgreSQL pg_dump does that job, so nothing is
      // handed out and nothing is recorded.
      expectError(res, 404, 'NOT_FOUND');
      await expectNoEntry(ctx, before);
      return;
    }
    expect(res.status).toBe(200);
    await expectOneEntry(ctx, before, res, {
      at: at(0),
      action: 'backup.downloaded',
      actor: adminActor(ctx),
      target: null,
      details: { bytes: Number(res.headers['content-length']), schema_version: res.headers['x-keyward-schema-version'] },
    });
  });

  test('with TRUST_PROXY, the entry records the client address the proxy forwarded', async () => {
    const ctx = await app({ TRUST_PROXY: 'loopback' });
    const res = await request(ctx.app).post('/admin/users').set(admin).set('X-Forwarded-For', '198.51.100.23').send({ email: 'fwd@example.com' });
    expect(res.status).toBe(201);
    const [entry] = await entriesAfter(ctx, 0);
    expect(entry!.ip).toBe('198.51.100.23');
  });

  test('a refused change writes nothing', async () => {
    const ctx = await app();
    const user = await createUser(ctx, { email: 'taken@example.com' });
    const before = await mark(ctx);
    expectError(await request(ctx.app).post('/admin/users').set(admin).send({ email: 'TAKEN@example.com' }), 409, 'CONFLICT');
    expectError(await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ max_concurrent_bots: -1 }), 400, 'VALIDATION_ERROR');
    expectError(await request(ctx.app).patch(`/admin/users/${user.id}`).set('X-Admin-API-Key', 'wrong').send({ name: 'x' }), 401, 'INVALID_ADMIN_KEY');
    expectError(await request(ctx.app).delete('/admin/tokens/999').set(admin), 404, 'NOT_FOUND');
    await expectNoEntry(ctx, before);
  });
});

describe('no secret in the audit log', () => {
  test('after minting and rotating everywhere, no row holds a token, its secret, its hash or the admin key', async () => {
    const ctx = await app(TRUSTED);
    const user = await linkedAlice(ctx);
    const byAdmin = await mintToken(ctx, user.id, { scopes: ['bots:read', 'tokens:read', 'tokens:write'] });
    const rotatedByAdmin = await request(ctx.app).post(`/admin/tokens/${byAdmin.id}/rotate`).set(admin).send({});
    const byKey = await request(ctx.app).post('/v1/tokens').set(as(byAdmin.token)).send({ scopes: ['bots:read'] });
    const rotatedByKey = await request(ctx.app).post(`/v1/tokens/${byKey.body.id}/rotate`).set(as(byAdmin.token)).send({});
    const bySso = await request(ctx.app).post('/sso/tokens').set(ssoHeaders()).set(CSRF).send({});
    const rotatedBySso = await request(ctx.app).post(`/sso/tokens/${bySso.body.id}/rotate`).set(ssoHeaders()).set(CSRF).send({});
    const responses = [rotatedByAdmin, byKey, rotatedByKey, bySso, rotatedBySso];
    expect(responses.map((r) => r.status)).toEqual([201, 201, 201, 201, 201]);
    // Near misses of real credentials are secrets too: a typo of the admin key is almost the admin key.
    const typo = `${ADMIN_KEY.slice(0, -1)}X`;
    expectError(await request(ctx.app).get('/admin/users').set('X-Admin-API-Key', typo), 401, 'INVALID_ADMIN_KEY');
    const mangled = `${byAdmin.token.slice(0, -1)}${byAdmin.token.endsWith('a') ? 'b' : 'a'}`;
    expectError(await request(ctx.app).get('/v1/me').set(as(mangled)), 401, 'INVALID_API_KEY');
    await ctx.app.audit.flushFailures();

    const tokens = [byAdmin.token, ...responses.map((r) => r.body.token as string)];
    expect(new Set(tokens).size).toBe(6);
    const secrets = tokens.map((t) => t.split('_')[3]!.slice(0, 32));
    const hashes = (await allTokens(ctx)).map((t) => t.secret_hash);
    expect(hashes).toHaveLength(6);
    const forbidden = [...tokens, ...secrets, ...hashes, ADMIN_KEY, typo, mangled, mangled.split('_')[3]!.slice(0, 32)];

    const rows = await auditRows(ctx);
    expect(rows.map((r) => r.action).sort()).toEqual([
      'auth.failed',
      'token.minted',
      'token.minted',
      'token.minted',
      'token.rotated',
      'token.rotated',
      'token.rotated',
      'user.created',
    ]);
    for (const row of rows) {
      for (const [column, value] of Object.entries(row)) {
        if (value === null) continue;
        for (const secret of forbidden) {
          if (String(value).includes(secret)) throw new Error(`audit_events.${column} of entry ${row.id} (${row.action}) holds a secret`);
        }
      }
    }
  });
});

describe('GET /admin/audit filters', () => {
  /**
   * A log with every kind of actor, action and target, spread over time:
   * t=0 admin creates Uma and Ned; t=60 admin mints Uma a key; t=120 Uma's key mints a child;
   * t=180 Alice signs in (linking Ali); t=240 Alice mints; t=300 admin force-releases Uma's bot;
   * t=360 admin revokes the child; t=420 failed authentication is flushed.
   */
  async function spreadLog() {
    const ctx = await app(TRUSTED);
    const uma = await createUser(ctx, { email: 'uma@example.com' });
    const ned = await createUser(ctx, { email: 'ned@example.com' });
    const ali = await createUser(ctx, { email: ALICE.email });
    ctx.clock.advance(60);
    const key = await mintToken(ctx, uma.id, { scopes: ['bots:read', 'bots:write', 'tokens:write'] });
    ctx.clock.advance(60);
    const child = (await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['bots:read'] })).body.id as number;
    ctx.clock.advance(60);
    expect((await request(ctx.app).get('/sso/me').set(ssoHeaders())).status).toBe(200);
    ctx.clock.advance(60);
    const aliceKey = (await request(ctx.app).post('/sso/tokens').set(ssoHeaders()).set(CSRF).send({})).body.id as number;
    const bot = await acquireBot(ctx, key);
    ctx.clock.advance(60);
    expect((await request(ctx.app).delete(`/admin/bots/${bot.id}`).set(admin)).status).toBe(204);
    ctx.clock.advance(60);
    expect((await request(ctx.app).delete(`/admin/tokens/${child}`).set(admin)).status).toBe(204);
    ctx.clock.advance(60);
    expect((await request(ctx.app).get('/v1/me').set(as('kw_live_nope'))).status).toBe(401);
    await ctx.app.audit.flushFailures();
    const rows = await auditRows(ctx);
    expect(rows.map((r) => [r.action, r.at])).toEqual([
      ['user.created', at(0)],
      ['user.created', at(0)],
      ['user.created', at(0)],
      ['token.minted', at(60)],
      ['token.minted', at(120)],
      ['user.sso_linked', at(180)],
      ['token.minted', at(240)],
      ['bot.force_released', at(300)],
      ['token.revoked', at(360)],
      ['auth.failed', at(420)],
    ]);
    return { ctx, uma, ned, ali, key, child, aliceKey, bot, rows };
  }

  type Row = Awaited<ReturnType<typeof auditRows>>[number];

  test('actor, action, target, since and until each select exactly the matching entries, newest first', async () => {
    const { ctx, uma, ned, ali, key, child, aliceKey, bot, rows } = await spreadLog();
    const adminId = adminActor(ctx).id;
    const cases: Array<[Record<string, string>, (r: Row) => boolean]> = [
      [{ actor: 'admin' }, (r) => r.actor_type === 'admin'],
      [{ actor: adminId }, (r) => r.actor_type === 'admin'],
      [{ actor: 'key' }, (r) => r.actor_type === 'key'],
      [{ actor: 'sso' }, (r) => r.actor_type === 'sso'],
      [{ actor: 'anonymous' }, (r) => r.action === 'auth.failed'],
      [{ actor: 'system' }, () => false],
      [{ actor: `user:${uma.id}` }, (r) => r.actor_type === 'key'],
      [{ actor: `user:${ali.id}` }, (r) => r.actor_type === 'sso'],
      [{ actor: `user:${ned.id}` }, () => false],
      [{ actor: `token:${key.id}` }, (r) => r.actor_type === 'key'],
      [{ actor: `token:${child}` }, () => false],
      [{ actor: `sso:${ALICE.subject}` }, (r) => r.actor_type === 'sso'],
      [{ actor: 'admin:0000000000000000' }, () => false],
      [{ action: 'token.minted' }, (r) => r.action === 'token.minted'],
      [{ action: 'token.*' }, (r) => r.action.startsWith('token.')],
      [{ action: 'user.*' }, (r) => r.action.startsWith('user.')],
      [{ action: 'bot.*' }, (r) => r.action === 'bot.force_released'],
      [{ action: 'token.rotated' }, () => false],
      [{ target: `user:${uma.id}` }, (r) => r.target_type === 'user' && r.target_id === String(uma.id)],
      [{ target: `user:${ali.id}` }, (r) => r.target_type === 'user' && r.target_id === String(ali.id)],
      [{ target: `token:${child}` }, (r) => r.target_type === 'token' && r.target_id === String(child)],
      [{ target: `token:${aliceKey}` }, (r) => r.target_type === 'token' && r.target_id === String(aliceKey)],
      [{ target: `bot:${bot.id}` }, (r) => r.action === 'bot.force_released'],
      [{ target: `bot:${bot.id + 1}` }, () => false],
      // since is inclusive, until exclusive.
      [{ since: at(120) }, (r) => r.at >= at(120)],
      [{ until: at(120) }, (r) => r.at < at(120)],
      [{ since: at(120), until: at(300) }, (r) => r.at >= at(120) && r.at < at(300)],
      [{ since: '2026-01-01T01:04:00+01:00' }, (r) => r.at >= at(240)],
      [{ since: at(500) }, () => false],
      [{ actor: 'admin', action: 'token.*' }, (r) => r.actor_type === 'admin' && r.action.startsWith('token.')],
      [{ actor: 'admin', action: 'user.*', target: `user:${ned.id}` }, (r) => r.actor_type === 'admin' && r.target_id === String(ned.id) && r.target_type === 'user'],
      [{ action: 'token.minted', since: at(100), until: at(240) }, (r) => r.action === 'token.minted' && r.at >= at(100) && r.at < at(240)],
      [{ actor: `user:${uma.id}`, target: `token:${child}` }, (r) => r.actor_type === 'key'],
      [{ actor: 'sso', action: 'token.*' }, (r) => r.actor_type === 'sso' && r.action === 'token.minted'],
    ];
    for (const [query, matches] of cases) {
      const expected = rows.filter(matches).map((r) => r.id).reverse();
      const got = (await listAll(ctx, '/admin/audit', query)).map((e) => e.id);
      expect({ query, ids: got }).toEqual({ query, ids: expected });
    }
    // Spot-check that the predicates are not vacuous.
    expect(rows.filter((r) => r.actor_type === 'key')).toHaveLength(1);
    expect(rows.filter((r) => r.actor_type === 'sso')).toHaveLength(2);
  });

  test('the response body is the documented AuditEvent list', async () => {
    const { ctx, uma, key } = await spreadLog();
    const res = await request(ctx.app).get('/admin/audit').set(admin).query({ actor: `token:${key.id}` });
    expect(res.status).toBe(200);
    expect(res.body).toEqual({
      data: [
        {
          id: 5,
          at: at(120),
          action: 'token.minted',
          actor: keyActor(key, uma.id),
          target: tokenTarget(key.id + 1, uma.id),
          ip: LOCAL,
          request_id: expect.stringMatching(/^[0-9a-f-]{36}$/),
          details: mintedFacts({ scopes: ['bots:read'] }),
        },
      ],
      meta: { limit: 50, next_cursor: null },
    });
  });

  test('invalid filter values are 400 VALIDATION_ERROR naming the parameter', async () => {
    const ctx = await app();
    await createUser(ctx);
    const bad: Array<[Record<string, string>, string]> = [
      [{ target: 'user:abc' }, 'target'],
      [{ target: 'user:0' }, 'target'],
      [{ target: 'group:1' }, 'target'],
      [{ target: 'user' }, 'target'],
      [{ target: 'token:1:2' }, 'target'],
      [{ action: 'token' }, 'action'],
      [{ action: 'token.*.*' }, 'action'],
      [{ action: 'Token.minted' }, 'action'],
      [{ action: '*' }, 'action'],
      [{ action: "token.minted' or 1=1" }, 'action'],
      [{ since: 'yesterday' }, 'since'],
      [{ since: '2026-01-01' }, 'since'],
      [{ until: '2026-13-01T00:00:00Z' }, 'until'],
      [{ until: '2026-01-01T00:00:00' }, 'until'],
      [{ actor: '' }, 'actor'],
      [{ limit: '0' }, 'limit'],
      [{ limit: '101' }, 'limit'],
      [{ user_id: '1' }, 'user_id'],
      [{ actor_type: 'admin' }, 'actor_type'],
    ];
    for (const [query, field] of bad) {
      const res = await request(ctx.app).get('/admin/audit').set(admin).query(query);
      const error = expectError(res, 400, 'VALIDATION_ERROR');
      expect({ query, fields: (error.details as Array<{ field: string; in: string }>).map((d) => [d.field, d.in]) }).toEqual({ query, fields: [[field, 'query']] });
    }
  });

  test('a leap second the date-time format accepts is 400 VALIDATION_ERROR, not a 500', async () => {
    const ctx = await app();
    await createUser(ctx);
    for (const query of [{ since: '2026-12-31T23:59:60Z' }, { until: '2026-12-31T23:59:60Z' }]) {
      const res = await request(ctx.app).get('/admin/audit').set(admin).query(query);
      expectError(res, 400, 'VALIDATION_ERROR');
    }
    const user = await createUser(ctx);
    expectError(await request(ctx.app).get(`/admin/users/${user.id}/audit`).set(admin).query({ since: '2026-12-31T23:59:60Z' }), 400, 'VALIDATION_ERROR');
  });

  test('without the admin key it is 401 and shows nothing; a user key does not open it', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    const key = await mintToken(ctx, user.id);
    expectError(await request(ctx.app).get('/admin/audit'), 401, 'AUTHENTICATION_REQUIRED');
    expectError(await request(ctx.app).get('/admin/audit').set(as(key.token)), 401, 'AUTHENTICATION_REQUIRED');
    expectError(await request(ctx.app).get('/admin/audit').set('X-Admin-API-Key', 'not-the-key'), 401, 'INVALID_ADMIN_KEY');
    expectError(await request(ctx.app).get(`/admin/users/${user.id}/audit`), 401, 'AUTHENTICATION_REQUIRED');
    expectError(await request(ctx.app).get(`/admin/users/${user.id}/audit`).set('X-Admin-API-Key', 'not-the-key'), 401, 'INVALID_ADMIN_KEY');
  });
});

test('an actor filter naming a user id no database can hold matches nothing (it was a 500 on PostgreSQL)', async () => {
  const ctx = await app();
  await createUser(ctx);
  for (const actor of ['user:2147483648', 'user:99999999999999999999']) {
    const res = await request(ctx.app).get('/admin/audit').query({ actor }).set(admin);
    expect({ actor, status: res.status, data: res.body.data }).toEqual({ actor, status: 200, data: [] });
  }
});

describe('keyset pagination, newest first', () => {
  async function createUsers(ctx: TestContext, n: number): Promise<void> {
    for (let i = 0; i < n; i++) {
      ctx.clock.advance(1);
      await createUser(ctx);
    }
  }

  async function page(ctx: TestContext, query: Record<string, string>): Promise<{ ids: number[]; next: string | null; body: { meta: unknown } }> {
    const res = await request(ctx.app).get('/admin/audit').set(admin).query(query);
    expect(res.status).toBe(200);
    return { ids: (res.body.data as Entry[]).map((e) => e.id), next: res.body.meta.next_cursor, body: res.body };
  }

  test('limit=2 walks every entry once, ids strictly descending, and the last page says there is no next one', async () => {
    const ctx = await app();
    await createUsers(ctx, 7);
    const all = (await auditRows(ctx)).map((r) => r.id).reverse();
    expect(all).toHaveLength(7);

    const seen: number[] = [];
    const sizes: number[] = [];
    let cursor: string | null = null;
    for (let guard = 0; guard < 10; guard++) {
      const p = await page(ctx, cursor === null ? { limit: '2' } : { limit: '2', cursor });
      expect((p.body.meta as { limit: number }).limit).toBe(2);
      seen.push(...p.ids);
      sizes.push(p.ids.length);
      cursor = p.next;
      if (cursor === null) break;
    }
    expect(sizes).toEqual([2, 2, 2, 1]);
    expect(seen).toEqual(all);
    expect(new Set(seen).size).toBe(seen.length);
    for (let i = 1; i < seen.length; i++) expect(seen[i]!).toBeLessThan(seen[i - 1]!);

    // Exactly a multiple of the page size: the last full page has no cursor, not an empty page after it.
    const even = await app();
    await createUsers(even, 4);
    const first = await page(even, { limit: '2' });
    const second = await page(even, { limit: '2', cursor: first.next! });
    expect(second.ids).toHaveLength(2);
    expect(second.next).toBeNull();
  });

  test('entries written between pages neither shift nor repeat what follows', async () => {
    const ctx = await app();
    await createUsers(ctx, 6);
    const original = (await auditRows(ctx)).map((r) => r.id).reverse();

    const first = await page(ctx, { limit: '2' });
    await createUsers(ctx, 3);
    const second = await page(ctx, { limit: '2', cursor: first.next! });
    await createUsers(ctx, 2);
    const third = await page(ctx, { limit: '2', cursor: second.next! });

    expect([...first.ids, ...second.ids, ...third.ids]).toEqual(original);
    expect(third.next).toBeNull();
    // A new walk starts at the newest.
    expect((await page(ctx, { limit: '2' })).ids).toEqual((await auditRows(ctx)).map((r) => r.id).reverse().slice(0, 2));
  });

  test('cursors combine with filters', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    for (let i = 0; i < 5; i++) {
      await mintToken(ctx, user.id);
      await createUser(ctx);
    }
    const minted = (await auditRows(ctx)).filter((r) => r.action === 'token.minted').map((r) => r.id).reverse();
    const walked: number[] = [];
    let cursor: string | null = null;
    do {
      const p = await page(ctx, { action: 'token.minted', limit: '2', ...(cursor === null ? {} : { cursor }) });
      walked.push(...p.ids);
      cursor = p.next;
    } while (cursor !== null);
    expect(walked).toEqual(minted);
  });

  test('a forged cursor is 400 VALIDATION_ERROR', async () => {
    const ctx = await app();
    await createUsers(ctx, 3);
    const b64 = (text: string) => Buffer.from(text).toString('base64url');
    for (const cursor of ['garbage!', b64('id:abc'), b64('offset:2'), b64('id:-1'), b64('id:1 or 1=1'), b64(`id:${'9'.repeat(20)}`)]) {
      const res = await request(ctx.app).get('/admin/audit').set(admin).query({ limit: '2', cursor });
      const error = expectError(res, 400, 'VALIDATION_ERROR');
      expect(error.details).toEqual([{ field: 'cursor', in: 'query', message: expect.any(String) }]);
    }
  });
});

describe('GET /admin/users/{id}/audit', () => {
  test("returns what was done to the user and what the user's keys and sign-in did, not other users' entries", async () => {
    const ctx = await app(TRUSTED);
    const uma = await createUser(ctx, { email: ALICE.email });
    const ned = await createUser(ctx, { email: 'ned@example.com' });
    const umaKey = await mintToken(ctx, uma.id, { scopes: ['bots:read', 'bots:write', 'tokens:write'] });
    const nedKey = await mintToken(ctx, ned.id, { scopes: ['bots:read', 'bots:write', 'tokens:write'] });
    expect((await request(ctx.app).patch(`/admin/users/${uma.id}`).set(admin).send({ name: 'Uma' })).status).toBe(200);
    expect((await request(ctx.app).patch(`/admin/users/${ned.id}`).set(admin).send({ name: 'Ned' })).status).toBe(200);
    expect((await request(ctx.app).post('/v1/tokens').set(as(umaKey.token)).send({ scopes: ['bots:read'] })).status).toBe(201);
    expect((await request(ctx.app).post('/v1/tokens').set(as(nedKey.token)).send({ scopes: ['bots:read'] })).status).toBe(201);
    // Uma signs in through SSO (Alice's identity maps to her email): the link is by her.
    expect((await request(ctx.app).get('/sso/me').set(ssoHeaders())).status).toBe(200);
    const umaBot = await acquireBot(ctx, umaKey);
    const nedBot = await acquireBot(ctx, nedKey);
    expect((await request(ctx.app).delete(`/admin/bots/${umaBot.id}`).set(admin)).status).toBe(204);
    expect((await request(ctx.app).delete(`/admin/bots/${nedBot.id}`).set(admin)).status).toBe(204);
    if (ctx.storage.dialect === 'sqlite') expect((await request(ctx.app).post('/admin/backup').set(admin).buffer(true)).status).toBe(200);

    const rows = await auditRows(ctx);
    const about = (id: number) => rows.filter((r) => r.target_user_id === id || r.actor_user_id === id).map((r) => r.id).reverse();
    const umaEntries = await listAll(ctx, `/admin/users/${uma.id}/audit`);
    expect(umaEntries.map((e) => e.id)).toEqual(about(uma.id));
    expect(umaEntries.map((e) => e.action).reverse()).toEqual([
      'user.created',
      'token.minted',
      'user.updated',
      'token.minted',
      'user.sso_linked',
      'bot.force_released',
    ]);
    expect(umaEntries.every((e) => e.target?.user_id === uma.id && (e.actor.user_id === null || e.actor.user_id === uma.id))).toBe(true);
    expect((await listAll(ctx, `/admin/users/${ned.id}/audit`)).map((e) => e.id)).toEqual(about(ned.id));

    // The filters narrow a user's history too.
    expect((await listAll(ctx, `/admin/users/${uma.id}/audit`, { actor: 'admin' })).map((e) => e.action).reverse()).toEqual([
      'user.created',
      'token.minted',
      'user.updated',
      'bot.force_released',
    ]);
    expect((await listAll(ctx, `/admin/users/${uma.id}/audit`, { action: 'token.*' })).map((e) => e.actor.type).reverse()).toEqual(['admin', 'key']);
  });

  test("a deleted user's history stays readable, with the deletion last", async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    await mintToken(ctx, user.id);
    const before = (await listAll(ctx, `/admin/users/${user.id}/audit`)).map((e) => e.id);
    expect(before).toHaveLength(2);
    expect((await request(ctx.app).delete(`/admin/users/${user.id}`).set(admin)).status).toBe(204);
    expectError(await request(ctx.app).get(`/admin/users/${user.id}`).set(admin), 404, 'NOT_FOUND');

    const res = await request(ctx.app).get(`/admin/users/${user.id}/audit`).set(admin);
    expect(res.status).toBe(200);
    expect((res.body.data as Entry[]).map((e) => e.action)).toEqual(['user.deleted', 'token.minted', 'user.created']);
    expect((res.body.data as Entry[]).slice(1).map((e) => e.id)).toEqual(before);
  });

  test('an id with no history is an empty list, not a 404', async () => {
    const ctx = await app();
    await createUser(ctx);
    const res = await request(ctx.app).get('/admin/users/424242/audit').set(admin);
    expect(res.status).toBe(200);
    expect(res.body).toEqual({ data: [], meta: { limit: 50, next_cursor: null } });
  });
});

describe('an entry and its change commit together or not at all', () => {
  const failAudit = (ctx: TestContext) => refuseWrites(ctx, 'fail_audit', { event: 'insert', table: 'audit_events', message: 'audit down' });
  const healAudit = (ctx: TestContext) => allowWrites(ctx, 'fail_audit', 'audit_events');

  /** Runs `send` with the audit insert failing (5xx, `unchanged` checks the state), then with it working (one entry). */
  async function refusedThenDone(ctx: TestContext, send: () => request.Test, ok: number, unchanged: () => Promise<void>, action: string): Promise<void> {
    const before = await mark(ctx);
    await failAudit(ctx);
    expectError(await send(), 500, 'INTERNAL_ERROR');
    await unchanged();
    expect(await mark(ctx)).toBe(before);
    await healAudit(ctx);
    const res = await send();
    expect({ action, status: res.status }).toEqual({ action, status: ok });
    expect((await entriesAfter(ctx, before)).map((e) => [e.action, e.request_id])).toEqual([[action, res.headers['x-request-id']]]);
  }

  test('when the audit insert fails, nothing the request would change has changed', async () => {
    const ctx = await app(TRUSTED);
    const user = await createUser(ctx, { email: 'eve@example.com', name: 'Eve' });
    const key = await mintToken(ctx, user.id, { scopes: ['bots:read', 'bots:write', 'tokens:write'] });
    const victim = await mintToken(ctx, user.id, { name: 'victim' });
    const bot = await acquireBot(ctx, key);

    const usersBefore = await allUsers(ctx);
    const sameUsers = async () => expect(await allUsers(ctx)).toEqual(usersBefore);

    await refusedThenDone(ctx, () => request(ctx.app).post('/admin/users').set(admin).send({ email: 'new@example.com' }), 201, sameUsers, 'user.created');
    ctx.clock.advance(1);
    let users = await allUsers(ctx);
    await refusedThenDone(
      ctx,
      () => request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ name: 'Eve 2', credits: 9 }),
      200,
      async () => expect(await allUsers(ctx)).toEqual(users),
      'user.updated',
    );
    users = await allUsers(ctx);
    await refusedThenDone(
      ctx,
      () => request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: true }),
      200,
      async () => expect(await allUsers(ctx)).toEqual(users),
      'user.disabled',
    );
    expect((await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: false })).status).toBe(200);

    let tokens = await allTokens(ctx);
    await refusedThenDone(ctx, () => request(ctx.app).post(`/admin/users/${user.id}/tokens`).set(admin).send({}), 201, async () => expect(await allTokens(ctx)).toEqual(tokens), 'token.minted');
    tokens = await allTokens(ctx);
    await refusedThenDone(ctx, () => request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['bots:read'] }), 201, async () => expect(await allTokens(ctx)).toEqual(tokens), 'token.minted');
    tokens = await allTokens(ctx);
    await refusedThenDone(
      ctx,
      () => request(ctx.app).patch(`/admin/tokens/${victim.id}`).set(admin).send({ name: 'renamed' }),
      200,
      async () => expect(await allTokens(ctx)).toEqual(tokens),
      'token.updated',
    );
    tokens = await allTokens(ctx);
    await refusedThenDone(
      ctx,
      () => request(ctx.app).post(`/admin/tokens/${victim.id}/rotate`).set(admin).send({ grace_period_seconds: 60 }),
      201,
      async () => expect(await allTokens(ctx)).toEqual(tokens),
      'token.rotated',
    );
    tokens = await allTokens(ctx);
    await refusedThenDone(ctx, () => request(ctx.app).delete(`/admin/tokens/${victim.id}`).set(admin), 204, async () => expect(await allTokens(ctx)).toEqual(tokens), 'token.revoked');
    expect((await tokenRow(ctx, victim.id)).revoked_at).not.toBeNull();

    await refusedThenDone(
      ctx,
      () => request(ctx.app).delete(`/admin/bots/${bot.id}`).set(admin),
      204,
      async () => expect(await botRow(ctx, bot.id)).toMatchObject({ status: 'active', ended_at: null, ended_by: null }),
      'bot.force_released',
    );

    // A first SSO sign-in: the link is not made without its entry.
    const alice = await createUser(ctx, { email: ALICE.email });
    await refusedThenDone(ctx, () => request(ctx.app).get('/sso/me').set(ssoHeaders()), 200, async () => expect((await userRow(ctx, alice.id)).sso_subject).toBeNull(), 'user.sso_linked');

    // The database is not handed out unrecorded.
    if (ctx.storage.dialect === 'sqlite') {
      const backup = await mark(ctx);
      await failAudit(ctx);
      const refused = await request(ctx.app).post('/admin/backup').set(admin).buffer(true);
      expectError(refused, 500, 'INTERNAL_ERROR');
      expect(refused.headers['content-disposition']).toBeUndefined();
      await healAudit(ctx);
      expect(await mark(ctx)).toBe(backup);
    }

    // Deleting last: it revokes the tokens and releases the bots of the user.
    const other = await acquireBot(ctx, key);
    tokens = await allTokens(ctx);
    users = await allUsers(ctx);
    await refusedThenDone(
      ctx,
      () => request(ctx.app).delete(`/admin/users/${user.id}`).set(admin),
      204,
      async () => {
        expect(await allUsers(ctx)).toEqual(users);
        expect(await allTokens(ctx)).toEqual(tokens);
        expect(await botRow(ctx, other.id)).toMatchObject({ status: 'active', ended_at: null });
      },
      'user.deleted',
    );
    expect((await userRow(ctx, user.id)).deleted_at).not.toBeNull();
    expect(await botRow(ctx, other.id)).toMatchObject({ status: 'released', ended_by: 'admin' });
  });

  test('an SSO auto-provisioned user is not created without its entry', async () => {
    const ctx = await app({ ...TRUSTED, SSO_AUTO_PROVISION: 'on' });
    await refusedThenDone(ctx, () => request(ctx.app).get('/sso/me').set(ssoHeaders()), 200, async () => expect(await allUsers(ctx)).toEqual([]), 'user.created');
    expect(await allUsers(ctx)).toHaveLength(1);
  });

  /** A trigger that refuses one kind of write: the change fails where its entry would already be written. */
  async function refuse(ctx: TestContext, name: string, on: string): Promise<void> {
    const [, event, table] = /^(.*) on (\w+)$/.exec(on)!;
    await refuseWrites(ctx, name, { event: event!, table: table! });
  }

  test('when the change fails, no entry is left behind', async () => {
    const ctx = await app();
    const user = await createUser(ctx, { email: 'fay@example.com' });
    const key = await mintToken(ctx, user.id, { scopes: ['bots:read', 'bots:write', 'tokens:write'] });
    const victim = await mintToken(ctx, user.id);
    const bot = await acquireBot(ctx, key);
    const before = await mark(ctx);
    const tokensBefore = await allTokens(ctx);
    const usersBefore = await allUsers(ctx);

    await refuse(ctx, 'no_token_inserts', 'insert on tokens');
    expectError(await request(ctx.app).post(`/admin/users/${user.id}/tokens`).set(admin).send({}), 500, 'INTERNAL_ERROR');
    expectError(await request(ctx.app).post('/v1/tokens').set(as(key.token)).send({ scopes: ['bots:read'] }), 500, 'INTERNAL_ERROR');
    expectError(await request(ctx.app).post(`/admin/tokens/${victim.id}/rotate`).set(admin).send({}), 500, 'INTERNAL_ERROR');
    await allowWrites(ctx, 'no_token_inserts', 'tokens');

    // Rotation inserts the successor first, then marks the old token: failing the second step
    // must take the successor and the entry with it.
    await refuse(ctx, 'no_token_updates', 'update of revoked_at, rotated_to, name on tokens');
    expectError(await request(ctx.app).post(`/admin/tokens/${victim.id}/rotate`).set(admin).send({}), 500, 'INTERNAL_ERROR');
    expectError(await request(ctx.app).delete(`/admin/tokens/${victim.id}`).set(admin), 500, 'INTERNAL_ERROR');
    expectError(await request(ctx.app).delete(`/v1/tokens/${victim.id}`).set(as(key.token)), 500, 'INTERNAL_ERROR');
    expectError(await request(ctx.app).patch(`/admin/tokens/${victim.id}`).set(admin).send({ name: 'x' }), 500, 'INTERNAL_ERROR');
    // Deleting the user marks it deleted, then revokes its tokens: the mark is undone too.
    expectError(await request(ctx.app).delete(`/admin/users/${user.id}`).set(admin), 500, 'INTERNAL_ERROR');
    await allowWrites(ctx, 'no_token_updates', 'tokens');

    await refuse(ctx, 'no_user_writes', 'update on users');
    expectError(await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ name: 'x' }), 500, 'INTERNAL_ERROR');
    expectError(await request(ctx.app).delete(`/admin/users/${user.id}`).set(admin), 500, 'INTERNAL_ERROR');
    await allowWrites(ctx, 'no_user_writes', 'users');
    await refuse(ctx, 'no_user_inserts', 'insert on users');
    expectError(await request(ctx.app).post('/admin/users').set(admin).send({ email: 'gus@example.com' }), 500, 'INTERNAL_ERROR');
    await allowWrites(ctx, 'no_user_inserts', 'users');

    await refuse(ctx, 'no_bot_updates', 'update on bots');
    expectError(await request(ctx.app).delete(`/admin/bots/${bot.id}`).set(admin), 500, 'INTERNAL_ERROR');
    await allowWrites(ctx, 'no_bot_updates', 'bots');

    expect(await mark(ctx)).toBe(before);
    expect(await allTokens(ctx)).toEqual(tokensBefore);
    expect(await allUsers(ctx)).toEqual(usersBefore);
    expect(await botRow(ctx, bot.id)).toMatchObject({ status: 'active', ended_at: null });
  });

  test('a failure after the entry was inserted rolls back the entry and the change', async () => {
    const ctx = await app();
    const user = await createUser(ctx);
    const victim = await mintToken(ctx, user.id);
    const before = await mark(ctx);
    // The entry is in the table when this fires; the abort must take it and the revocation back.
    await refuseWrites(ctx, 'late_failure', { timing: 'after', event: 'insert', table: 'audit_events', when: "new.action = 'token.revoked'", message: 'late failure' });
    expectError(await request(ctx.app).delete(`/admin/tokens/${victim.id}`).set(admin), 500, 'INTERNAL_ERROR');
    expect(await mark(ctx)).toBe(before);
    expect((await tokenRow(ctx, victim.id)).revoked_at).toBeNull();
  });
});

describe('old values are the values the change replaced', () => {
  test('a token PATCH that races another records what it really changed (old read in its own transaction)', async () => {
    // Two admins edit the same token. B reads the token, then A renames it and commits, then B sets the
    // old name back. The log must show both changes; with B's "old" read before A's commit, B's change
    // looks like no change at all and goes unrecorded, and the log claims a name the token does not have.
    const path = join(scratchDir(), 'keyward.db');
    const ctx = await app({ DATABASE_PATH: path });
    const user = await createUser(ctx);
    const token = await mintToken(ctx, user.id, { name: 'orig' });

    // B runs in a second app on its own connection, paused right after it has read the token.
    let armed = false;
    let reached!: () => void;
    const reachedB = new Promise<void>((resolve) => (reached = resolve));
    let resume!: () => void;
    const resumeB = new Promise<void>((resolve) => (resume = resolve));
    const tokenReads = new Set<unknown>();
    const pauseAfterTokenRead: KyselyPlugin = {
      transformQuery: (args) => {
        if (args.node.kind === 'SelectQueryNode' && JSON.stringify(args.node).includes('"name":"tokens"')) tokenReads.add(args.queryId);
        return args.node;
      },
      transformResult: async (args) => {
        if (armed && tokenReads.has(args.queryId)) {
          armed = false;
          reached();
          await resumeB;
        }
        return args.result;
      },
    };
    const second = openSqlite(path);
    const appB = createApp({ config: ctx.config, db: second.db.withPlugin(pauseAfterTokenRead), clock: ctx.clock, logger: createLogger('silent') });
    try {
      const before = await mark(ctx);
      armed = true;
      const b = request(appB).patch(`/admin/tokens/${token.id}`).set(admin).send({ name: 'orig' }).then((res) => res);
      await reachedB;
      const a = await request(ctx.app).patch(`/admin/tokens/${token.id}`).set(admin).send({ name: 'renamed' });
      expect(a.status).toBe(200);
      resume();
      expect((await b).status).toBe(200);

      expect((await tokenRow(ctx, token.id)).name).toBe('orig');
      expect((await entriesAfter(ctx, before)).map((e) => [e.action, e.details])).toEqual([
        ['token.updated', { name: { old: 'orig', new: 'renamed' } }],
        ['token.updated', { name: { old: 'renamed', new: 'orig' } }],
      ]);
    } finally {
      resume();
      await appB.stopBackground();
      await second.close();
    }
  });
});

describe('append-only', () => {
  test('the database refuses to change an entry', async () => {
    const ctx = await app();
    await createUser(ctx);
    const rows = await auditRows(ctx);
    expect(rows).toHaveLength(1);
    // Not `rejects.toThrow`: better-sqlite3 builds its errors with the constructor of the first test file
    // that loaded it in this jest worker, which other files' `expect` does not recognise as an Error.
    const refusal = (write: Promise<unknown>) => write.then(() => 'not refused', (err: { message?: string }) => String(err?.message));
    expect(await refusal(sql`update audit_events set action = 'user.renamed'`.execute(ctx.storage.db))).toMatch(/append-only/);
    expect(await refusal(ctx.storage.db.updateTable('audit_events').set({ actor_id: 'system', details: null }).where('id', '=', rows[0]!.id).execute())).toMatch(
      /append-only/,
    );
    expect(await auditRows(ctx)).toEqual(rows);
  });
});

describe('retention', () => {
  test('with AUDIT_RETENTION=1d, prune deletes entries older than a day and keeps the rest', async () => {
    const ctx = await app({ AUDIT_RETENTION: '1d' });
    await createUser(ctx); // t = 0
    ctx.clock.advance(3600);
    await createUser(ctx); // t = 1h
    ctx.clock.advance(11 * 3600);
    await createUser(ctx); // t = 12h
    ctx.clock.advance(13 * 3600); // now 25h: the first entry is older than a day, the second exactly a day
    const rows = await auditRows(ctx);

    expect(await ctx.app.audit.prune()).toBe(1);
    expect(await auditRows(ctx)).toEqual(rows.slice(1));
    expect(await ctx.app.audit.prune()).toBe(0);
    ctx.clock.advance(1);
    expect(await ctx.app.audit.prune()).toBe(1);
    expect(await auditRows(ctx)).toEqual(rows.slice(2));
  });

  test('AUDIT_RETENTION=0 keeps everything', async () => {
    const ctx = await app({ AUDIT_RETENTION: '0' });
    await createUser(ctx);
    ctx.clock.advance(3 * 365 * 86_400);
    await createUser(ctx);
    ctx.clock.advance(20 * 365 * 86_400);
    const rows = await auditRows(ctx);
    expect(await ctx.app.audit.prune()).toBe(0);
    expect(await auditRows(ctx)).toEqual(rows);
    expect(rows).toHaveLength(2);
  });
});

describe('failed authentication is aggregated per address', () => {
  const FLOOD = { TRUST_PROXY: 'loopback', AUTH_FAILURES_PER_MINUTE: '10000000', ADMIN_RATE_LIMIT_PER_MINUTE: '1000000', RATE_LIMIT_PER_MINUTE: '1000000' };
  const from = (ip: string) => ({ 'X-Forwarded-For': ip });

  /** A well-formed token with a valid checksum whose selector this server never issued. */
  const unknownToken = (ctx: TestContext) => generateToken(ctx.config.tokenPrefix, 'live').token;
  const badChecksum = (token: string) => `${token.slice(0, -1)}${token.endsWith('A') ? 'B' : 'A'}`;

  test('one auth.failed entry per address (IPv6 per /64) with the count per error code, by anonymous', async () => {
    const ctx = await app(FLOOD);
    const user = await createUser(ctx);
    const good = await mintToken(ctx, user.id);
    const revoked = await mintToken(ctx, user.id);
    expect((await request(ctx.app).delete(`/admin/tokens/${revoked.id}`).set(admin)).status).toBe(204);
    const before = await mark(ctx);

    const v4 = '203.0.113.10';
    const send = async (ip: string, headers: Record<string, string>, path = '/v1/me') => {
      const res = await request(ctx.app).get(path).set(from(ip)).set(headers);
      expect(res.status).toBeGreaterThanOrEqual(401);
      return res;
    };
    ctx.clock.advance(5);
    for (let i = 0; i < 3; i++) expectError(await send(v4, as(badChecksum(good.token))), 401, 'INVALID_API_KEY');
    for (let i = 0; i < 2; i++) expectError(await send(v4, as(unknownToken(ctx))), 401, 'INVALID_API_KEY');
    expectError(await send(v4, as('not-a-token')), 401, 'INVALID_API_KEY');
    // The gateway's forward-auth endpoint is the same door.
    expectError(await send(v4, as(unknownToken(ctx)), '/auth/verify'), 401, 'INVALID_API_KEY');
    ctx.clock.advance(10);
    for (let i = 0; i < 2; i++) expectError(await send(v4, { 'X-Admin-API-Key': `wrong-${i}` }, '/admin/users'), 401, 'INVALID_ADMIN_KEY');
    expectError(await send(v4, as(revoked.token)), 401, 'API_KEY_REVOKED');

    // Two addresses of the same /64 are one network; another /64 is another.
    expectError(await send('2001:db8:abcd:12::1', as(unknownToken(ctx))), 401, 'INVALID_API_KEY');
    ctx.clock.advance(10);
    expectError(await send('2001:db8:abcd:12:ffff:ffff:ffff:fffe', { 'X-Admin-API-Key': 'nope' }, '/admin/audit'), 401, 'INVALID_ADMIN_KEY');
    expectError(await send('2001:db8:abcd:13::1', as(badChecksum(good.token))), 401, 'INVALID_API_KEY');

    // Not failures: no credential at all, a good key, the admin key.
    expectError(await send(v4, {}), 401, 'AUTHENTICATION_REQUIRED');
    expectError(await send(v4, {}, '/admin/users'), 401, 'AUTHENTICATION_REQUIRED');
    expect((await request(ctx.app).get('/v1/me').set(from(v4)).set(as(good.token))).status).toBe(200);
    expect((await request(ctx.app).get('/admin/users').set(from(v4)).set(admin)).status).toBe(200);

    expect(await entriesAfter(ctx, before)).toEqual([]);
    ctx.clock.advance(30);
    await ctx.app.audit.flushFailures();
    const entries = await entriesAfter(ctx, before);
    const flushedAt = at(55);
    expect(entries).toEqual([
      {
        id: before + 1,
        at: flushedAt,
        action: 'auth.failed',
        actor: ANONYMOUS,
        target: null,
        ip: v4,
        request_id: null,
        details: { count: 10, codes: { INVALID_API_KEY: 7, INVALID_ADMIN_KEY: 2, API_KEY_REVOKED: 1 }, first_at: at(5), last_at: at(15) },
      },
      {
        id: before + 2,
        at: flushedAt,
        action: 'auth.failed',
        actor: ANONYMOUS,
        target: null,
        ip: '2001:db8:abcd:12::/64',
        request_id: null,
        details: { count: 2, codes: { INVALID_API_KEY: 1, INVALID_ADMIN_KEY: 1 }, first_at: at(15), last_at: at(25) },
      },
      {
        id: before + 3,
        at: flushedAt,
        action: 'auth.failed',
        actor: ANONYMOUS,
        target: null,
        ip: '2001:db8:abcd:13::/64',
        request_id: null,
        details: { count: 1, codes: { INVALID_API_KEY: 1 }, first_at: at(25), last_at: at(25) },
      },
    ]);

    // Flushed means forgotten: nothing is written twice, and a successful request adds nothing.
    const after = await mark(ctx);
    expect((await request(ctx.app).get('/v1/me').set(from(v4)).set(as(good.token))).status).toBe(200);
    await ctx.app.audit.flushFailures();
    await expectNoEntry(ctx, after);
    // The anonymous filter finds them.
    expect((await listAll(ctx, '/admin/audit', { actor: 'anonymous', action: 'auth.*' })).map((e) => e.id)).toEqual([before + 3, before + 2, before + 1]);
  });

  test('SSO refusals (403 SSO_ACCESS_DENIED, CSRF_CHECK_FAILED) and a disabled user count too', async () => {
    const ctx = await app({ ...FLOOD, ...TRUSTED });
    const user = await createUser(ctx, { email: 'dis@example.com' });
    const key = await mintToken(ctx, user.id);
    expect((await request(ctx.app).patch(`/admin/users/${user.id}`).set(admin).send({ disabled: true })).status).toBe(200);
    const before = await mark(ctx);
    expectError(await request(ctx.app).get('/sso/me').set(ssoHeaders({ email: 'stranger@example.com', subject: 'idp|x' })), 403, 'SSO_ACCESS_DENIED');
    expectError(await request(ctx.app).post('/sso/tokens').set(ssoHeaders()).send({}), 403, 'CSRF_CHECK_FAILED');
    expectError(await request(ctx.app).get('/v1/me').set(as(key.token)), 403, 'USER_DISABLED');
    await ctx.app.audit.flushFailures();
    expect((await entriesAfter(ctx, before)).map((e) => [e.action, e.ip, e.details])).toEqual([
      ['auth.failed', LOCAL, { count: 3, codes: { SSO_ACCESS_DENIED: 1, CSRF_CHECK_FAILED: 1, USER_DISABLED: 1 }, first_at: at(0), last_at: at(0) }],
    ]);
  });

  test(`from more than AUTH_FAILURE_ADDRESSES_PER_FLUSH addresses: that many entries plus one summary, never a row per attempt`, async () => {
    const ctx = await app(FLOOD);
    const heavy = ['192.0.2.1', '192.0.2.2'];
    const light = Array.from({ length: AUTH_FAILURE_ADDRESSES_PER_FLUSH + 3 }, (_, i) => `10.${Math.floor(i / 250)}.${i % 250}.1`);
    let attempts = 0;
    for (const ip of heavy) {
      for (let i = 0; i < 4; i++) {
        expectError(await request(ctx.app).get('/admin/users').set(from(ip)).set('X-Admin-API-Key', 'guess'), 401, 'INVALID_ADMIN_KEY');
        attempts++;
      }
    }
    ctx.clock.advance(7);
    for (const ip of light) {
      expectError(await request(ctx.app).get('/v1/me').set(from(ip)).set(as('kw_live_guess')), 401, 'INVALID_API_KEY');
      attempts++;
    }
    ctx.clock.advance(3);
    await ctx.app.audit.flushFailures();

    const rows = await auditRows(ctx);
    expect(rows.length).toBe(AUTH_FAILURE_ADDRESSES_PER_FLUSH + 1);
    expect(rows.length).toBeLessThan(attempts);
    expect(rows.every((r) => r.action === 'auth.failed' && r.actor_type === 'anonymous' && r.at === at(10))).toBe(true);
    const details = rows.map((r) => JSON.parse(r.details!) as { count: number; codes: Record<string, number>; addresses?: number });
    expect(details.reduce((sum, d) => sum + d.count, 0)).toBe(attempts);

    const named = rows.filter((r) => r.ip !== null);
    expect(named).toHaveLength(AUTH_FAILURE_ADDRESSES_PER_FLUSH);
    expect(new Set(named.map((r) => r.ip)).size).toBe(AUTH_FAILURE_ADDRESSES_PER_FLUSH);
    // The busiest addresses are the ones named.
    expect(named.slice(0, 2).map((r) => [r.ip, JSON.parse(r.details!)])).toEqual(
      heavy.map((ip) => [ip, { count: 4, codes: { INVALID_ADMIN_KEY: 4 }, first_at: at(0), last_at: at(0) }]),
    );

    const summary = rows.filter((r) => r.ip === null);
    expect(summary).toHaveLength(1);
    expect(JSON.parse(summary[0]!.details!)).toEqual({ count: 5, codes: { INVALID_API_KEY: 5 }, addresses: 5, first_at: at(7), last_at: expect.any(String) });
    expect(summary[0]).toMatchObject({ actor_id: 'anonymous', target_type: null, request_id: null });
  });

  test('an address blocked for wrong keys keeps being counted: its refused attempts are RATE_LIMITED failures', async () => {
    const ctx = await app({ TRUST_PROXY: 'loopback', AUTH_FAILURES_PER_MINUTE: '3' });
    const before = await mark(ctx);
    const ip = '198.51.100.9';
    for (let i = 0; i < 3; i++) expectError(await request(ctx.app).get('/v1/me').set(from(ip)).set(as(unknownToken(ctx))), 401, 'INVALID_API_KEY');
    for (let i = 0; i < 5; i++) expectError(await request(ctx.app).get('/v1/me').set(from(ip)).set(as(unknownToken(ctx))), 429, 'RATE_LIMITED');
    for (let i = 0; i < 2; i++) expectError(await request(ctx.app).get('/admin/users').set(from(ip)).set({ 'X-Admin-API-Key': `wrong-${i}` }), 429, 'RATE_LIMITED');
    await ctx.app.audit.flushFailures();
    const entries = await entriesAfter(ctx, before);
    expect(entries.map((e) => [e.ip, e.details])).toEqual([[ip, expect.objectContaining({ count: 10, codes: { INVALID_API_KEY: 3, RATE_LIMITED: 7 } })]]);
  });

  test('the summary entry says when the last failure it sums happened (last_at), like the per-address entries', async () => {
    const ctx = await app(FLOOD);
    for (let i = 0; i <= AUTH_FAILURE_ADDRESSES_PER_FLUSH; i++) {
      // The first address fails twice so it is named; the summary then holds exactly the last one, failing at t=5.
      if (i === AUTH_FAILURE_ADDRESSES_PER_FLUSH) ctx.clock.advance(5);
      for (let n = i === 0 ? 2 : 1; n > 0; n--) {
        expectError(await request(ctx.app).get('/v1/me').set(from(`10.1.${Math.floor(i / 200)}.${i % 200}`)).set(as('kw_live_guess')), 401, 'INVALID_API_KEY');
      }
    }
    ctx.clock.advance(55); // flushed a minute after the first failure
    await ctx.app.audit.flushFailures();
    const summary = (await auditRows(ctx)).filter((r) => r.ip === null);
    expect(summary.map((r) => [r.at, JSON.parse(r.details!)])).toEqual([
      [at(60), { count: 1, codes: { INVALID_API_KEY: 1 }, addresses: 1, first_at: at(5), last_at: at(5) }],
    ]);
  });

  test('closing the app (stopBackground) writes the failures counted since the last flush', async () => {
    const path = join(scratchDir(), 'keyward.db');
    const ctx = await createTestApp({ env: { ...FLOOD, DATABASE_PATH: path } });
    try {
      for (let i = 0; i < 3; i++) expectError(await request(ctx.app).get('/v1/me').set(from('198.51.100.9')).set(as('kw_live_guess')), 401, 'INVALID_API_KEY');
      expect(await auditRows(ctx)).toEqual([]);
    } finally {
      await ctx.close();
    }
    const db = new Database(path, { readonly: true });
    try {
      const rows = db.prepare('select action, actor_type, ip, details from audit_events').all();
      expect(rows).toEqual([
        { action: 'auth.failed', actor_type: 'anonymous', ip: '198.51.100.9', details: JSON.stringify({ count: 3, codes: { INVALID_API_KEY: 3 }, first_at: at(0), last_at: at(0) }) },
      ]);
    } finally {
      db.close();
    }
  });
});
