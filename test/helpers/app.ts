import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import request from 'supertest';
import { randomBytes } from 'node:crypto';
import { sql } from 'kysely';
import { migrateToLatest, openPostgres, openSqlite, type Storage } from '../../db/database';
import { createApp, type KeywardApp } from '../../src/app';
import type { Clock } from '../../src/clock';
import type { Lifecycle } from '../../src/health/health.routes';
import { loadConfig, type Config } from '../../src/config';
import { createLogger } from '../../src/logger';
import { bcryptHasher, type SecretHasher } from '../../src/tokens/secret-hasher';

/** The real bcrypt, counted: a fake would prove nothing about what the request path calls. */
export class CountingHasher implements SecretHasher {
  private readonly real = bcryptHasher(4, 2);
  verifyCalls = 0;
  hash(secret: string) {
    return this.real.hash(secret);
  }
  verify(secret: string, hash: string) {
    this.verifyCalls++;
    return this.real.verify(secret, hash);
  }
}

export const ADMIN_KEY = 'kw-admin-0123456789abcdefghijklmnopqrstuvwxyz';

export function testConfig(env: Record<string, string> = {}): Config {
  return loadConfig({
    ADMIN_API_TOKEN: ADMIN_KEY,
    DATABASE_PATH: ':memory:',
    BCRYPT_ROUNDS: '4',
    LOG_LEVEL: 'silent',
    ...env,
  });
}

/** A clock that only moves when a test moves it. */
export class FakeClock implements Clock {
  constructor(private ms = Date.parse('2026-01-01T00:00:00.000Z')) {}
  now(): Date {
    return new Date(this.ms);
  }
  advance(seconds: number): void {
    this.ms += seconds * 1000;
  }
}

export function tempDir(): string {
  return mkdtempSync(join(tmpdir(), 'keyward-test-'));
}

export interface TestContext {
  app: KeywardApp;
  storage: Storage;
  config: Config;
  clock: FakeClock;
  /** supertest bound to the app, with nothing preset. */
  http: () => request.Agent;
  close: () => Promise<void>;
}

/**
 * `npm run test:postgres` sets this: every app a test creates in memory gets a fresh schema of its own
 * in that PostgreSQL database instead (dropped when the test closes it). Apps on a named SQLite file
 * stay on SQLite: those tests are about the file.
 */
export const POSTGRES_URL = process.env.KEYWARD_TEST_POSTGRES_URL || undefined;

function openTestStorage(config: Config): Storage {
  if (!POSTGRES_URL || config.databasePath !== ':memory:') return openSqlite(config.databasePath);
  const schema = `kw_test_${process.pid}_${randomBytes(6).toString('hex')}`;
  const storage = openPostgres(POSTGRES_URL, { schema, poolSize: 5 });
  return {
    ...storage,
    close: async () => {
      await sql`drop schema ${sql.id(schema)} cascade`.execute(storage.db).catch(() => undefined);
      await storage.close();
    },
  };
}

/** The real app on a fresh database (SQLite in memory, or PostgreSQL under test:postgres), migrated by the real migrations. */
export async function createTestApp(
  options: { env?: Record<string, string>; hasher?: SecretHasher; logDestination?: NodeJS.WritableStream; lifecycle?: Lifecycle } = {},
): Promise<TestContext> {
  const config = testConfig(options.env);
  const storage = openTestStorage(config);
  try {
    await migrateToLatest(storage.db);
  } catch (err) {
    // Nothing will close this storage otherwise (and on PostgreSQL its schema would stay behind).
    await storage.close();
    throw err;
  }
  const clock = new FakeClock();
  const logger = options.logDestination ? createLogger('info', options.logDestination) : createLogger('silent');
  const app = createApp({ config, db: storage.db, clock, hasher: options.hasher, logger, lifecycle: options.lifecycle });
  return {
    app,
    storage,
    config,
    clock,
    http: () => request.agent(app),
    close: async () => {
      await app.stopBackground();
      await storage.close();
    },
  };
}

/** For test files that make apps as they go: each test's apps are closed after it. */
export function appsClosedAfterEach(): (env?: Record<string, string>, hasher?: SecretHasher) => Promise<TestContext> {
  const contexts: TestContext[] = [];
  afterEach(async () => {
    for (const ctx of contexts.splice(0)) await ctx.close();
  });
  return async (env = {}, hasher) => {
    const ctx = await createTestApp({ env, hasher });
    contexts.push(ctx);
    return ctx;
  };
}

export const admin = { 'X-Admin-API-Key': ADMIN_KEY };

export async function createUser(ctx: TestContext, body: Record<string, unknown> = {}): Promise<{ id: number; email: string }> {
  const res = await request(ctx.app)
    .post('/admin/users')
    .set(admin)
    .send({ email: `user${Math.random().toString(36).slice(2)}@example.com`, ...body });
  if (res.status !== 201) throw new Error(`createUser: ${res.status} ${JSON.stringify(res.body)}`);
  return res.body;
}

export async function mintToken(
  ctx: TestContext,
  userId: number,
  body?: Record<string, unknown>,
): Promise<{ id: number; token: string; masked: string; scopes: string[]; expires_at: string | null; metadata: Record<string, unknown> | null; rate_limit_per_minute: number | null }> {
  const req = request(ctx.app).post(`/admin/users/${userId}/tokens`).set(admin);
  const res = body === undefined ? await req : await req.send(body);
  if (res.status !== 201) throw new Error(`mintToken: ${res.status} ${JSON.stringify(res.body)}`);
  return res.body;
}

/** Asserts the one error envelope and returns it. */
export function expectError(res: request.Response, status: number, code: string): { message: string; details: unknown } {
  expect({ status: res.status, code: res.body?.error?.code }).toEqual({ status, code });
  expect(Object.keys(res.body).sort()).toEqual(['error']);
  expect(Object.keys(res.body.error).sort()).toEqual(['code', 'details', 'message', 'request_id']);
  expect(typeof res.body.error.message).toBe('string');
  expect(res.body.error.request_id).toBe(res.headers['x-request-id']);
  expect(res.headers['content-type']).toMatch(/^application\/json/);
  return res.body.error;
}

/**
 * A trigger that makes one kind of write fail, for tests that prove a step is all or nothing; the
 * same on SQLite and PostgreSQL. `event` is e.g. "insert", "update of revoked_at, name"; `when` a
 * condition on `new`.
 */
export async function refuseWrites(
  ctx: TestContext,
  name: string,
  spec: { timing?: 'before' | 'after'; event: string; table: string; when?: string; message?: string },
): Promise<void> {
  const timing = spec.timing ?? 'before';
  const message = (spec.message ?? 'refused by test').replace(/'/g, "''");
  if (ctx.storage.dialect === 'postgres') {
    await sql.raw(`create or replace function ${name}_fn() returns trigger language plpgsql as $$ begin raise exception '${message}'; end $$`).execute(ctx.storage.db);
    await sql.raw(`create trigger ${name} ${timing} ${spec.event} on ${spec.table} for each row ${spec.when ? `when (${spec.when})` : ''} execute function ${name}_fn()`).execute(ctx.storage.db);
  } else {
    await sql.raw(`create trigger ${name} ${timing} ${spec.event} on ${spec.table} ${spec.when ? `when ${spec.when}` : ''} begin select raise(abort, '${message}'); end`).execute(ctx.storage.db);
  }
}

export async function allowWrites(ctx: TestContext, name: string, table: string): Promise<void> {
  await sql.raw(ctx.storage.dialect === 'postgres' ? `drop trigger ${name} on ${table}` : `drop trigger ${name}`).execute(ctx.storage.db);
}
