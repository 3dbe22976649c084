import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import request from 'supertest';
import { migrateToLatest, openSqlite, type Storage } from '../../db/database';
import { createApp, type KeywardApp } from '../../src/app';
import type { Clock } from '../../src/clock';
import type { Lifecycle } from '../../src/health/health.routes';
import { loadConfig, type Config } from '../../src/config';
import { createLogger } from '../../src/logger';
import type { SecretHasher } from '../../src/tokens/secret-hasher';

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

/** The real app on a fresh SQLite database, migrated by the real migrations. */
export async function createTestApp(
  options: { env?: Record<string, string>; hasher?: SecretHasher; logDestination?: NodeJS.WritableStream; lifecycle?: Lifecycle } = {},
): Promise<TestContext> {
  const config = testConfig(options.env);
  const storage = openSqlite(config.databasePath);
  await migrateToLatest(storage.db);
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
): Promise<{ id: number; token: string; masked: string; scopes: string[]; expires_at: string | null }> {
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
