import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  statSync,
  symlinkSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import Database from 'better-sqlite3';
import { LATEST_MIGRATION } from '../db/migrations';
import { BackupError, backupToTempFile } from '../src/backup/backup';
import {
  REPO_ROOT,
  assertBuilt,
  makeTempDir,
  removeTempDirs,
  runBash,
  startServer,
  stopAllServers,
  type ServerProcess,
} from './helpers/server-process';

/**
 * `keyward backup` and `keyward restore`, run as built (dist/src/cli.js) against databases of real
 * server processes: a backup under a write load, the checks restore makes before it replaces anything,
 * how it finds a running server, and the commands of docs/backup.md as written.
 */

const CLI_JS = join(REPO_ROOT, 'dist', 'src', 'cli.js');
const ADMIN_KEY = randomBytes(24).toString('hex');
const STAMP = /\d{8}T\d{6}Z/;

interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs the CLI with only PATH and `env` in its environment, in `cwd` (a fresh temp dir by default). */
function cli(args: string[], options: { env?: Record<string, string>; cwd?: string } = {}): Promise<CliResult> {
  return new Promise((resolveRun, reject) => {
    const child = spawn(process.execPath, [CLI_JS, ...args], {
      cwd: options.cwd ?? makeTempDir('cli'),
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...options.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`keyward ${args.join(' ')} did not finish within 20 s.\n${stdout}\n${stderr}`));
    }, 20_000);
    child.once('error', reject);
    child.once('close', (code) => {
      clearTimeout(timer);
      resolveRun({ code, stdout, stderr });
    });
  });
}

/** Exit status 1 and exactly one line on stderr, matching `reason`, with no stack trace. */
function expectRefusal(result: CliResult, command: 'backup' | 'restore', reason: RegExp): void {
  expect({ code: result.code, stdout: result.stdout }).toEqual({ code: 1, stdout: '' });
  expect(result.stderr).toMatch(new RegExp(`^keyward ${command}: [^\\n]+\\n$`));
  expect(result.stderr).toMatch(reason);
}

function serverEnv(databasePath: string): Record<string, string> {
  return {
    ADMIN_API_TOKEN: ADMIN_KEY,
    DATABASE_PATH: databasePath,
    PORT: '0',
    HOST: '127.0.0.1',
    BCRYPT_ROUNDS: '4',
    ADMIN_RATE_LIMIT_PER_MINUTE: '1000000',
    MAX_TOKENS_PER_USER: '100000',
  };
}

async function admin(server: ServerProcess, method: string, path: string, body?: unknown): Promise<{ status: number; body: any }> {
  const res = await fetch(`${server.baseUrl}${path}`, {
    method,
    headers: { 'X-Admin-API-Key': ADMIN_KEY, ...(body === undefined ? {} : { 'Content-Type': 'application/json' }) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: text === '' ? null : JSON.parse(text) };
}

async function createUser(server: ServerProcess, email = `u${randomBytes(6).toString('hex')}@example.com`): Promise<number> {
  const res = await admin(server, 'POST', '/admin/users', { email });
  if (res.status !== 201) throw new Error(`create user: ${res.status} ${JSON.stringify(res.body)}`);
  return res.body.id;
}

async function mint(server: ServerProcess, userId: number): Promise<{ id: number; token: string }> {
  const res = await admin(server, 'POST', `/admin/users/${userId}/tokens`);
  if (res.status !== 201) throw new Error(`mint: ${res.status} ${JSON.stringify(res.body)}`);
  return { id: res.body.id, token: res.body.token };
}

async function me(server: ServerProcess, token: string): Promise<{ status: number; body: any }> {
  const res = await fetch(`${server.baseUrl}/v1/me`, { headers: { 'X-API-Key': token } });
  return { status: res.status, body: await res.json() };
}

/** Reads a database without writing anything beside it (the files restore and backup make stand alone). */
function inspect<T>(path: string, read: (db: Database.Database) => T): T {
  const db = new Database(path, { readonly: true, fileMustExist: true });
  try {
    return read(db);
  } finally {
    db.close();
  }
}

/** Opens (or creates) a database, runs `write` on it and closes it. */
function inspectWritable(path: string, write: (db: Database.Database) => void): void {
  const db = new Database(path);
  try {
    write(db);
  } finally {
    db.close();
  }
}

const integrity = (db: Database.Database) => db.pragma('integrity_check', { simple: true });
const tokenIds = (db: Database.Database) => new Set(db.prepare('select id from tokens').pluck().all() as number[]);
const mode = (path: string) => statSync(path).mode & 0o777;

async function waitFor(condition: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** A closed keyward database with one user and two tokens, made by a real server, and a backup of it. */
let fixture: { dir: string; database: string; backup: string };

beforeAll(async () => {
  assertBuilt();
  if (!existsSync(CLI_JS)) throw new Error(`${CLI_JS} does not exist: run \`npm run build\` first.`);
  const dir = makeTempDir('backup-fixture');
  const database = join(dir, 'data', 'keyward.db');
  const server = await startServer({ env: serverEnv(database), cwd: dir });
  const user = await createUser(server);
  await mint(server, user);
  await mint(server, user);
  expect((await server.stop()).code).toBe(0);
  const backup = join(dir, 'fixture-backup.db');
  expect((await cli(['backup', backup, '--database', database])).code).toBe(0);
  fixture = { dir, database, backup };
});

afterAll(async () => {
  await stopAllServers();
  removeTempDirs();
});

describe('keyward backup', () => {
  test('a backup taken under a write load holds every mint acknowledged before it began, while the server keeps answering', async () => {
    const dir = makeTempDir('backup-load');
    const database = join(dir, 'data', 'keyward.db');
    const server = await startServer({ env: serverEnv(database), cwd: dir });
    const clients = 6;
    const users = await Promise.all(Array.from({ length: clients }, () => createUser(server)));

    // Some bulk (about 8 MB), so that the copy has real work to do while the mints go on.
    const writer = new Database(database, { fileMustExist: true, timeout: 5000 });
    const insert = writer.prepare(
      `insert into users (email, email_lower, max_concurrent_bots, data, created_at, updated_at) values (?, ?, 1, ?, ?, ?)`,
    );
    const now = new Date().toISOString();
    writer.transaction(() => {
      for (let i = 0; i < 4000; i++) insert.run(`bulk${i}@example.com`, `bulk${i}@example.com`, JSON.stringify({ pad: 'x'.repeat(2000) }), now, now);
    })();
    writer.close();

    const acked: Array<{ id: number; at: number }> = [];
    const failures: string[] = [];
    let stop = false;
    const load = users.map(async (userId) => {
      while (!stop) {
        const res = await admin(server, 'POST', `/admin/users/${userId}/tokens`);
        if (res.status === 201) acked.push({ id: res.body.id, at: performance.now() });
        else failures.push(`${res.status} ${JSON.stringify(res.body)}`);
      }
    });
    let healthy = 0;
    let probing = true;
    const probe = (async () => {
      while (probing) {
        if ((await fetch(`${server.baseUrl}/healthz`)).status === 200) healthy++;
        await new Promise((r) => setTimeout(r, 5));
      }
    })();

    try {
      await waitFor(() => acked.length >= 50, '50 acknowledged mints');
      const backup = join(dir, 'under-load.db');
      const healthyBefore = healthy;
      const started = performance.now();
      const result = await cli(['backup', backup], { env: { DATABASE_PATH: database } });
      const finished = performance.now();
      const healthyDuring = healthy - healthyBefore;
      await waitFor(() => acked.some((a) => a.at > finished), 'a mint after the backup');

      expect(result).toMatchObject({ code: 0, stderr: '' });
      expect(result.stdout).toMatch(new RegExp(`^backed up ${database} to ${backup}: \\d+ bytes, schema ${LATEST_MIGRATION}\\n$`));
      expect(mode(backup)).toBe(0o600);
      // The server answered throughout: mints were acknowledged while the backup ran, health checks too.
      expect(acked.filter((a) => a.at > started && a.at < finished).length).toBeGreaterThan(0);
      expect(healthyDuring).toBeGreaterThan(0);

      const restored = join(dir, 'restored', 'keyward.db');
      const restore = await cli(['restore', backup, '--database', restored]);
      expect(restore).toMatchObject({ code: 0, stderr: '' });
      const { check, ids, bulk } = inspect(restored, (db) => ({
        check: integrity(db),
        ids: tokenIds(db),
        bulk: db.prepare(`select count(*) from users where email like 'bulk%'`).pluck().get(),
      }));
      expect(check).toBe('ok');
      expect(bulk).toBe(4000);
      const before = acked.filter((a) => a.at < started);
      expect(before.length).toBeGreaterThanOrEqual(50);
      expect(before.filter((a) => !ids.has(a.id))).toEqual([]);
    } finally {
      stop = true;
      probing = false;
      await Promise.all([...load, probe]);
    }
    expect(failures).toEqual([]);
    await server.stop();
  });

  test('refuses to overwrite without --force; with it, replaces the file and the new one is 0600', async () => {
    const dir = makeTempDir('backup-force');
    const target = join(dir, 'nightly.db');
    writeFileSync(target, 'an earlier backup', { mode: 0o644 });
    const env = { DATABASE_PATH: fixture.database };

    expectRefusal(await cli(['backup', target], { env }), 'backup', /nightly\.db already exists; pass --force to overwrite it/);
    expect(readFileSync(target, 'utf8')).toBe('an earlier backup');
    expect(readdirSync(dir)).toEqual(['nightly.db']);

    const forced = await cli(['backup', target, '--force'], { env });
    expect(forced).toMatchObject({ code: 0, stderr: '' });
    expect(mode(target)).toBe(0o600);
    expect(inspect(target, (db) => [integrity(db), tokenIds(db).size])).toEqual(['ok', 2]);
    expect(readdirSync(dir)).toEqual(['nightly.db']);
  });

  test('a missing database is exit 1 with the path, and no file is created at either end', async () => {
    const dir = makeTempDir('backup-missing');
    const missing = join(dir, 'data', 'keyward.db');
    const result = await cli(['backup', join(dir, 'b.db')], { env: { DATABASE_PATH: missing } });
    expectRefusal(result, 'backup', new RegExp(`no database at ${missing}$`, 'm'));
    expect(readdirSync(dir)).toEqual([]);
  });

  test('finds the database in .env without ADMIN_API_TOKEN; the environment wins over .env, and --database over both', async () => {
    const dir = makeTempDir('backup-env');
    mkdirSync(join(dir, 'data'));
    copyFileSync(fixture.database, join(dir, 'data', 'keyward.db'));
    writeFileSync(join(dir, '.env'), 'DATABASE_PATH=./data/keyward.db\n');

    const fromDotEnv = await cli(['backup', 'a.db'], { cwd: dir });
    expect(fromDotEnv).toMatchObject({ code: 0, stderr: '' });
    expect(fromDotEnv.stdout).toMatch(/^backed up \.\/data\/keyward\.db to a\.db: \d+ bytes, schema /);

    const envWins = await cli(['backup', 'b.db'], { cwd: dir, env: { DATABASE_PATH: './elsewhere.db' } });
    expectRefusal(envWins, 'backup', /no database at \.\/elsewhere\.db$/m);

    const flagWins = await cli(['backup', 'c.db', '--database', fixture.database], { cwd: dir, env: { DATABASE_PATH: './elsewhere.db' } });
    expect(flagWins).toMatchObject({ code: 0, stderr: '' });
    expect(readdirSync(dir).sort()).toEqual(['.env', 'a.db', 'c.db', 'data']);
  });

  test('refuses a destination it cannot write, and a source that is not a keyward database', async () => {
    const dir = makeTempDir('backup-bad');
    const env = { DATABASE_PATH: fixture.database };
    expectRefusal(await cli(['backup', join(dir, 'nowhere', 'b.db')], { env }), 'backup', /cannot write .*nowhere\/b\.db: directory .*nowhere does not exist/);
    expectRefusal(await cli(['backup', dir], { env }), 'backup', /is a directory; name the backup file/);
    expectRefusal(await cli(['backup', fixture.database, '--force'], { env }), 'backup', /is the database itself/);

    const text = join(dir, 'notes.txt');
    writeFileSync(text, 'not a database at all, just some text that is long enough to fill a header\n'.repeat(20));
    expectRefusal(await cli(['backup', join(dir, 'b.db'), '--database', text]), 'backup', /notes\.txt is not a SQLite database/);
    const other = join(dir, 'other.db');
    inspectWritable(other, (db) => db.exec('create table notes (body text); insert into notes values (1)'));
    expectRefusal(await cli(['backup', join(dir, 'b.db'), '--database', other]), 'backup', /other\.db is not a keyward database \(no kysely_migration, users, tokens table\)/);
    expect(readdirSync(dir).sort()).toEqual(['notes.txt', 'other.db']);
  });

  test('usage errors are exit 2 with the usage; help is exit 0', async () => {
    for (const args of [['frobnicate'], [], ['backup'], ['backup', 'a.db', 'b.db'], ['restore', 'a.db', '--force'], ['backup', '--bogus', 'a.db']]) {
      const result = await cli(args);
      expect({ args, code: result.code, stdout: result.stdout }).toEqual({ args, code: 2, stdout: '' });
      expect(result.stderr).toMatch(/\n\nusage: keyward <command>/);
    }
    const help = await cli(['help']);
    expect(help).toMatchObject({ code: 0, stderr: '' });
    expect(help.stdout).toMatch(/^usage: keyward <command>/);
  });
});

describe('backupToTempFile (for an HTTP route that streams the file and then removes it)', () => {
  test('from a path or from an open handle, in-memory included: a private file, its schema, and remove()', async () => {
    const parent = makeTempDir('backup-temp');
    const handle = new Database(fixture.database, { fileMustExist: true });
    const inMemory = new Database(readFileSync(fixture.backup));
    try {
      for (const source of [fixture.database, handle, inMemory]) {
        const backup = await backupToTempFile(source, { directory: parent, now: new Date('2026-11-23T03:17:00.456Z') });
        expect(backup).toMatchObject({ schemaVersion: LATEST_MIGRATION, bytes: statSync(backup.path).size });
        expect(backup.path).toMatch(/keyward-backup-\w+\/keyward-20261123T031700Z\.db$/);
        expect([mode(backup.path), mode(join(backup.path, '..'))]).toEqual([0o600, 0o700]);
        expect(inspect(backup.path, (db) => [integrity(db), tokenIds(db).size])).toEqual(['ok', 2]);
        await backup.remove();
        await backup.remove();
        expect(readdirSync(parent)).toEqual([]);
      }
    } finally {
      handle.close();
      inMemory.close();
    }
    await expect(backupToTempFile(join(parent, 'missing.db'), { directory: parent })).rejects.toThrow(BackupError);
    expect(readdirSync(parent)).toEqual([]);
  });

  test('waits for a write transaction open on the handle and copies only what it committed', async () => {
    const parent = makeTempDir('backup-busy');
    const database = join(parent, 'keyward.db');
    copyFileSync(fixture.database, database);
    const handle = new Database(database, { fileMustExist: true });
    try {
      handle.exec('begin immediate');
      handle.prepare(`insert into users (email, max_concurrent_bots, created_at, updated_at) values ('rolled-back@example.com', 1, 'x', 'x')`).run();
      setTimeout(() => {
        handle.exec('rollback');
        handle.prepare(`insert into users (email, max_concurrent_bots, created_at, updated_at) values ('committed@example.com', 1, 'x', 'x')`).run();
      }, 150);
      const backup = await backupToTempFile(handle, { directory: parent });
      const emails = inspect(backup.path, (db) => db.prepare('select email from users').pluck().all());
      expect(emails).toContain('committed@example.com');
      expect(emails).not.toContain('rolled-back@example.com');
      await backup.remove();
    } finally {
      handle.close();
    }
    expect(readdirSync(parent)).toEqual(['keyward.db']);
  });
});

describe('keyward restore', () => {
  /** A fresh copy of the fixture database, as the one in place. */
  function currentDatabase(): { dir: string; database: string } {
    const dir = makeTempDir('restore-current');
    mkdirSync(join(dir, 'data'), { mode: 0o700 });
    const database = join(dir, 'data', 'keyward.db');
    copyFileSync(fixture.database, database);
    return { dir, database };
  }

  function copyOfBackup(dir: string, change?: (db: Database.Database) => void): string {
    const path = join(dir, `copy-${randomBytes(4).toString('hex')}.db`);
    copyFileSync(fixture.backup, path);
    if (change) inspectWritable(path, change);
    return path;
  }

  const refused: Array<[string, (dir: string) => string, RegExp]> = [
    [
      'a copy with a page in the middle overwritten',
      (dir) => {
        const path = copyOfBackup(dir);
        // The tokens table's root page: a b-tree page in the middle of the file, which the check reads.
        const { root, size, pages } = inspect(path, (db) => ({
          root: db.prepare(`select rootpage from sqlite_master where name = 'tokens'`).pluck().get() as number,
          size: db.pragma('page_size', { simple: true }) as number,
          pages: db.pragma('page_count', { simple: true }) as number,
        }));
        expect(root).toBeGreaterThan(1);
        expect(root).toBeLessThan(pages);
        const bytes = readFileSync(path);
        bytes.fill(0xab, (root - 1) * size, root * size);
        writeFileSync(path, bytes);
        return path;
      },
      /copy-\w+\.db is corrupt \(.+\); nothing was changed$/m,
    ],
    [
      'a file that is not SQLite',
      (dir) => {
        const path = join(dir, 'notes.db');
        writeFileSync(path, 'these are not the pages you are looking for\n'.repeat(200));
        return path;
      },
      /notes\.db is not a SQLite database; nothing was changed$/m,
    ],
    [
      'an empty file',
      (dir) => {
        const path = join(dir, 'empty.db');
        writeFileSync(path, '');
        return path;
      },
      /empty\.db is not a keyward backup \(no kysely_migration, users, tokens table\); nothing was changed$/m,
    ],
    [
      "a SQLite database that is not keyward's",
      (dir) => {
        const path = join(dir, 'other.db');
        inspectWritable(path, (db) => db.exec('create table users (id integer primary key); create table notes (body text)'));
        return path;
      },
      /other\.db is not a keyward backup \(no kysely_migration, tokens table\); nothing was changed$/m,
    ],
    [
      'a backup from a newer keyward',
      (dir) =>
        copyOfBackup(dir, (db) =>
          db.prepare('insert into kysely_migration (name, timestamp) values (?, ?)').run('29991231-0001-from-the-future', new Date().toISOString()),
        ),
      new RegExp(`has schema 29991231-0001-from-the-future, newer than this keyward's \\(${LATEST_MIGRATION}\\): upgrade keyward first, then restore; nothing was changed$`, 'm'),
    ],
    [
      'a backup with a migration this keyward never had',
      (dir) =>
        copyOfBackup(dir, (db) =>
          db.prepare('insert into kysely_migration (name, timestamp) values (?, ?)').run('20000101-0001-from-a-fork', new Date().toISOString()),
        ),
      /has migrations this keyward does not know \(20000101-0001-from-a-fork\); nothing was changed$/m,
    ],
    ['a file that does not exist', (dir) => join(dir, 'missing.db'), /no backup at .*missing\.db$/m],
  ];

  test.each(refused)('refuses %s: exit 1, one line, the database untouched', async (_name, make, reason) => {
    const { dir, database } = currentDatabase();
    const backup = make(makeTempDir('restore-input'));
    const backupBytes = existsSync(backup) ? readFileSync(backup) : null;
    const before = readFileSync(database);

    expectRefusal(await cli(['restore', backup], { env: { DATABASE_PATH: database } }), 'restore', reason);

    expect(readFileSync(database).equals(before)).toBe(true);
    expect(readdirSync(join(dir, 'data'))).toEqual(['keyward.db']);
    // Checking a backup does not change it either.
    if (backupBytes) expect(readFileSync(backup).equals(backupBytes)).toBe(true);
  });

  test('replaces the database of a crashed server with the backup exactly, keeps the previous one, and a server serves it', async () => {
    const dir = makeTempDir('restore-good');
    const database = join(dir, 'data', 'keyward.db');
    const first = await startServer({ env: serverEnv(database), cwd: dir });
    const ada = await createUser(first, 'ada@example.com');
    const kept = await mint(first, ada);
    const backup = join(dir, 'nightly.db');
    expect((await cli(['backup', backup], { env: { DATABASE_PATH: database } })).code).toBe(0);

    // After the backup: a user and a token that restoring the backup takes away again.
    const bob = await createUser(first, 'bob@example.com');
    const later = await mint(first, bob);
    // A crash rather than a clean stop: the last writes are only in the -wal. The kept copy must have
    // them, and the restored file must not have them replayed into it.
    await first.stop('SIGKILL');
    expect(existsSync(`${database}-wal`)).toBe(true);

    const result = await cli(['restore', backup], { env: { DATABASE_PATH: database } });
    expect(result).toMatchObject({ code: 0, stderr: '' });
    const match = new RegExp(`^restored ${backup} \\(\\d+ bytes, schema ${LATEST_MIGRATION}\\) to ${database}; the previous database is kept as (\\S+)\\n$`).exec(result.stdout);
    expect(match).not.toBeNull();
    const previous = match![1]!;
    expect(previous).toMatch(new RegExp(`^${database}\\.before-restore-${STAMP.source}$`));
    expect(readdirSync(join(dir, 'data')).sort()).toEqual(['keyward.db', previous.slice(join(dir, 'data').length + 1)]);
    expect([mode(database), mode(previous)]).toEqual([0o600, 0o600]);

    expect(inspect(previous, (db) => [integrity(db), [...tokenIds(db)].sort()])).toEqual(['ok', [kept.id, later.id].sort()]);
    expect(inspect(database, (db) => [integrity(db), [...tokenIds(db)]])).toEqual(['ok', [kept.id]]);

    const second = await startServer({ env: serverEnv(database), cwd: dir });
    const served = await me(second, kept.token);
    expect(served.status).toBe(200);
    expect(served.body.user).toMatchObject({ email: 'ada@example.com' });
    expect((await me(second, later.token)).status).toBe(401);
    const emails = (await admin(second, 'GET', '/admin/users')).body.data.map((u: { email: string }) => u.email);
    expect(emails).toEqual(['ada@example.com']);
    await second.stop();
  });

  test('restores into an empty place, and keeps a current file that is not a database byte for byte', async () => {
    const dir = makeTempDir('restore-edge');
    const fresh = join(dir, 'new', 'keyward.db');
    const first = await cli(['restore', fixture.backup, '--database', fresh]);
    expect(first).toMatchObject({ code: 0, stderr: '' });
    expect(first.stdout).toMatch(/; there was no database before\n$/);
    expect(inspect(fresh, (db) => [integrity(db), tokenIds(db).size])).toEqual(['ok', 2]);

    const garbled = join(dir, 'garbled', 'keyward.db');
    mkdirSync(join(dir, 'garbled'));
    const junk = Buffer.from('the disk ate this database\n'.repeat(300));
    writeFileSync(garbled, junk);
    const second = await cli(['restore', fixture.backup, '--database', garbled]);
    expect(second).toMatchObject({ code: 0, stderr: '' });
    expect(second.stdout).toMatch(/it was not a readable database, so make sure keyward was stopped/);
    const kept = readdirSync(join(dir, 'garbled')).filter((f) => f.includes('.before-restore-'));
    expect(kept).toHaveLength(1);
    expect(readFileSync(join(dir, 'garbled', kept[0]!)).equals(junk)).toBe(true);
    expect(mode(join(dir, 'garbled', kept[0]!))).toBe(0o600);
    expect(inspect(garbled, (db) => tokenIds(db).size)).toBe(2);
  });

  test('refuses while a server has the database open, idle or not, and restores once it has stopped', async () => {
    const dir = makeTempDir('restore-running');
    const database = join(dir, 'data', 'keyward.db');
    const server = await startServer({ env: serverEnv(database), cwd: dir });
    const user = await createUser(server, 'running@example.com');
    const token = await mint(server, user);
    const env = { DATABASE_PATH: database };

    const busy = await cli(['restore', fixture.backup], { env });
    expectRefusal(busy, 'restore', /data\/keyward\.db is in use by another process \(is keyward running\?\): stop keyward, then restore; nothing was changed$/m);
    // Idle for a while: the server still holds its lock.
    await new Promise((r) => setTimeout(r, 1500));
    expectRefusal(await cli(['restore', fixture.backup], { env }), 'restore', /is in use by another process/);
    expect((await me(server, token.token)).status).toBe(200);
    expect(readdirSync(join(dir, 'data')).filter((f) => !/^keyward\.db(-wal|-shm)?$/.test(f))).toEqual([]);

    // Any process that has it open counts, not only keyward.
    expect((await server.stop()).code).toBe(0);
    const reader = new Database(database, { fileMustExist: true });
    reader.prepare('select count(*) from users').get();
    try {
      expectRefusal(await cli(['restore', fixture.backup], { env }), 'restore', /is in use by another process/);
    } finally {
      reader.close();
    }

    const done = await cli(['restore', fixture.backup], { env });
    expect(done).toMatchObject({ code: 0, stderr: '' });
    const emails = inspect(database, (db) => db.prepare('select email from users').pluck().all());
    expect(emails).not.toContain('running@example.com');
    expect(emails).toHaveLength(1);
  });
});

describe('docs/backup.md', () => {
  const doc = readFileSync(join(REPO_ROOT, 'docs', 'backup.md'), 'utf8');
  const blocks = (lang: string) => [...doc.matchAll(new RegExp('```' + lang + '\\n([\\s\\S]*?)\\n```', 'g'))].map((m) => m[1]!);

  test('has exactly the blocks this test runs', () => {
    expect(doc.match(/^```.*$/gm)).toEqual(['```bash', '```', '```crontab', '```', '```bash', '```']);
  });

  test('its backup, cron and restore commands work as written against a running server', async () => {
    const [backupBlock, restoreBlock] = blocks('bash') as [string, string];
    const cronLine = blocks('crontab')[0]!;
    // The folder keyward runs from: dist/ and a .env, as after `npm run quickstart`.
    const home = makeTempDir('backup-docs');
    symlinkSync(join(REPO_ROOT, 'dist'), join(home, 'dist'));
    writeFileSync(join(home, '.env'), `ADMIN_API_TOKEN=${ADMIN_KEY}\nDATABASE_PATH=./data/keyward.db\n`, { mode: 0o600 });
    const serverSettings = { PORT: '0', HOST: '127.0.0.1', BCRYPT_ROUNDS: '4' };

    const server = await startServer({ env: serverSettings, cwd: home });
    const user = await createUser(server, 'grace@example.com');
    const token = await mint(server, user);

    const backedUp = await runBash(backupBlock, { cwd: home, flags: ['-euo', 'pipefail'] });
    expect(backedUp).toMatchObject({ code: 0, stderr: '' });
    expect(backedUp.stdout).toMatch(new RegExp(`^backed up \\./data/keyward\\.db to backups/keyward-${STAMP.source}\\.db: \\d+ bytes, schema ${LATEST_MIGRATION}\\n$`));
    expect(mode(join(home, 'backups'))).toBe(0o700);

    // The cron line's command, in this folder. The names have one-second resolution: let a second pass.
    const cronFields = cronLine.split(' ');
    expect(cronFields.slice(0, 5)).toEqual(['17', '3', '*', '*', '*']);
    const cronCommand = cronFields.slice(5).join(' ').replace('cd /srv/keyward', `cd '${home}'`);
    expect(cronCommand).toContain(`cd '${home}' && node dist/src/cli.js backup`);
    const stale = join(home, 'backups', 'keyward-20200101T000000Z.db');
    writeFileSync(stale, 'a backup from long ago');
    utimesSync(stale, new Date('2020-01-01'), new Date('2020-01-01'));
    const secondStarted = Math.floor(Date.now() / 1000);
    await waitFor(() => Math.floor(Date.now() / 1000) > secondStarted, 'the next second');
    const cron = await runBash(cronCommand, { cwd: '/' });
    expect(cron).toMatchObject({ code: 0, stderr: '' });
    const backups = readdirSync(join(home, 'backups')).sort();
    expect(backups).toHaveLength(2);
    for (const name of backups) {
      expect(name).toMatch(new RegExp(`^keyward-${STAMP.source}\\.db$`));
      expect(mode(join(home, 'backups', name))).toBe(0o600);
    }

    // Written after the backups: the restore takes it away.
    const later = await mint(server, user);
    expect((await server.stop()).code).toBe(0);

    const restored = await runBash(restoreBlock, { cwd: home, flags: ['-euo', 'pipefail'] });
    expect(restored).toMatchObject({ code: 0, stderr: '' });
    expect(restored.stdout).toMatch(new RegExp(`^restored backups/${backups[1]} .* to \\./data/keyward\\.db; the previous database is kept as \\./data/keyward\\.db\\.before-restore-`));

    const again = await startServer({ env: serverSettings, cwd: home });
    expect((await me(again, token.token)).status).toBe(200);
    expect((await me(again, later.token)).status).toBe(401);
    await again.stop();
  });
});
