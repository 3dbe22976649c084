import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Client } from 'pg';
import { POSTGRES_URL } from './helpers/app';
import { assertBuilt, makeTempDir, REPO_ROOT, removeTempDirs, runBash, startServer, stopAllServers } from './helpers/server-process';

/**
 * `keyward migrate-data --from <sqlite file> --to <postgres url>` moves a real deployment: a SQLite
 * file filled by a real server (users, rotated tokens, bots, audit entries, usage, credits) goes into
 * an empty PostgreSQL schema, and a server started on PostgreSQL serves the same keys. Runs under
 * `npm run test:postgres` only (jest.config.js leaves it out of `npm test`, which needs only Node; `npm run test:system` runs it).
 */
if (!POSTGRES_URL) throw new Error('migrate-data.test.ts runs under `npm run test:postgres` (KEYWARD_TEST_POSTGRES_URL)');
const CLI = join(REPO_ROOT, 'dist', 'src', 'cli.js');

describe('keyward migrate-data', () => {
  const schema = `kw_migrate_${randomBytes(5).toString('hex')}`;
  const url = () => `${POSTGRES_URL}?options=-c%20search_path%3D${schema}`;
  const adminKey = randomBytes(32).toString('hex');
  const admin = { 'X-Admin-API-Key': adminKey, 'Content-Type': 'application/json' };
  let dir: string;
  let sqlitePath: string;
  let pg: Client;

  const cli = (args: string) => runBash(`node ${CLI} ${args}`, { cwd: dir });

  beforeAll(async () => {
    assertBuilt();
    pg = new Client({ connectionString: POSTGRES_URL });
    await pg.connect();
    await pg.query(`create schema ${schema}`);
    dir = makeTempDir('migrate-data');
    sqlitePath = join(dir, 'keyward.db');
  });
  afterAll(async () => {
    await stopAllServers();
    await pg.query(`drop schema if exists ${schema} cascade`);
    await pg.end();
    removeTempDirs();
  });

  test('moves every row, keeps ids, and a server on PostgreSQL serves the same keys', async () => {
    const sqliteServer = await startServer({ env: { ADMIN_API_TOKEN: adminKey, DATABASE_PATH: sqlitePath, BCRYPT_ROUNDS: '4', PORT: '0', HOST: '127.0.0.1' }, cwd: dir });
    const call = async (base: string, method: string, path: string, headers: Record<string, string>, body?: unknown) => {
      const res = await fetch(base + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
      const text = await res.text();
      return { status: res.status, body: text === '' ? null : JSON.parse(text) };
    };
    const s = sqliteServer.baseUrl;
    const ada = await call(s, 'POST', '/admin/users', admin, { email: 'ada@example.com', name: 'Ada', credits: 7, data: { team: 'x' } });
    const bob = await call(s, 'POST', '/admin/users', admin, { email: 'bob@example.com' });
    const first = await call(s, 'POST', `/admin/users/${ada.body.id}/tokens`, admin, { name: 'laptop', scopes: ['bots:read', 'bots:write', 'tokens:read'] });
    // A rotation: the old token points at a successor minted after it.
    const rotated = await call(s, 'POST', `/admin/tokens/${first.body.id}/rotate`, admin, { grace_period_seconds: 3600 });
    const revoked = await call(s, 'POST', `/admin/users/${bob.body.id}/tokens`, admin, {});
    await call(s, 'DELETE', `/admin/tokens/${revoked.body.id}`, admin);
    const key = { 'X-API-Key': rotated.body.token, 'Content-Type': 'application/json' };
    const bot = await call(s, 'POST', '/v1/bots', key, { platform: 'meet', native_meeting_id: 'abc' });
    expect(bot.status).toBe(201);
    expect((await call(s, 'GET', '/v1/me', key)).status).toBe(200);
    await sqliteServer.stop();

    const run = await cli(`migrate-data --from ${sqlitePath} --to '${url()}'`);
    expect({ code: run.code, stderr: run.stderr }).toEqual({ code: 0, stderr: '' });
    expect(run.stdout).toMatch(/^migrated .* to PostgreSQL: 2 users, 3 tokens, 1 bots, \d+ audit_events, \d+ usage_daily; every row checked\n$/);
    // The URL may hold a password: it is never printed.
    expect(run.stdout).not.toContain(POSTGRES_URL!);

    const pgServer = await startServer({ env: { ADMIN_API_TOKEN: adminKey, DATABASE_URL: url(), BCRYPT_ROUNDS: '4', PORT: '0', HOST: '127.0.0.1' }, cwd: dir });
    const p = pgServer.baseUrl;
    const me = await call(p, 'GET', '/v1/me', key);
    expect(me.status).toBe(200);
    expect(me.body.user).toMatchObject({ id: ada.body.id, email: 'ada@example.com' });
    expect((await call(p, 'GET', '/v1/me', { 'X-API-Key': first.body.token })).status).toBe(200); // still in its grace period
    expect((await call(p, 'GET', '/v1/me', { 'X-API-Key': revoked.body.token })).body.error.code).toBe('API_KEY_REVOKED');
    const oldToken = await call(p, 'GET', `/admin/tokens/${first.body.id}`, admin);
    expect(oldToken.body).toMatchObject({ rotated_to: rotated.body.id, name: 'laptop' });
    expect((await call(p, 'GET', `/admin/users/${ada.body.id}`, admin)).body).toMatchObject({ credits: 7, data: { team: 'x' }, active_bots: 1 });
    expect((await call(p, 'GET', '/admin/audit?action=token.*', admin)).body.data.map((e: { action: string }) => e.action)).toEqual([
      'token.revoked',
      'token.minted',
      'token.rotated',
      'token.minted',
    ]);
    // New rows continue after the copied ids.
    const carol = await call(p, 'POST', '/admin/users', admin, { email: 'carol@example.com' });
    expect(carol.body.id).toBe(bob.body.id + 1);
    const next = await call(p, 'POST', `/admin/users/${carol.body.id}/tokens`, admin, {});
    expect(next.body.id).toBe(revoked.body.id + 1);
    await pgServer.stop();
  });

  test('a PostgreSQL database that already holds keyward data is refused, and nothing changes', async () => {
    const before = (await pg.query(`select count(*)::int as n from ${schema}.users`)).rows[0].n;
    const run = await cli(`migrate-data --from ${sqlitePath} --to '${url()}'`);
    expect(run.code).toBe(1);
    expect(run.stderr).toMatch(/^keyward migrate-data: the PostgreSQL database already holds keyward data \(\d+ rows in users\); migrate into an empty one\n$/);
    expect((await pg.query(`select count(*)::int as n from ${schema}.users`)).rows[0].n).toBe(before);
  });

  test('a missing file, a file that is not SQLite, and missing options are clear errors', async () => {
    const missing = await cli(`migrate-data --from ${join(dir, 'nope.db')} --to '${url()}'`);
    expect({ code: missing.code, stderr: missing.stderr }).toEqual({ code: 1, stderr: `keyward migrate-data: no SQLite database at ${join(dir, 'nope.db')}\n` });
    const junk = join(dir, 'junk.db');
    writeFileSync(junk, 'not a database at all, just text '.repeat(200));
    const notSqlite = await cli(`migrate-data --from ${junk} --to '${url()}'`);
    expect(notSqlite.code).toBe(1);
    expect(notSqlite.stderr).toMatch(/^keyward migrate-data: .*not (a SQLite|a keyward) database/);
    const usage = await cli(`migrate-data --from ${sqlitePath}`);
    expect(usage.code).toBe(2);
    expect(usage.stderr).toMatch(/needs --from <sqlite file> and --to <postgres url>/);
    // The SQLite file is only read.
    expect(readFileSync(sqlitePath).subarray(0, 16).toString('latin1')).toBe('SQLite format 3\0');
  });
});
