import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, existsSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import {
  REPO_ROOT,
  assertBuilt,
  jsonLines,
  makeTempDir,
  removeTempDirs,
  runBash,
  runServerUntilExit,
  startServer,
  stopAllServers,
  type ServerProcess,
} from './helpers/server-process';

/**
 * Storage that fails under a running server, or before it starts: a full disk, a read-only
 * filesystem, a database another process has locked, a corrupt file. Every case must end in a log line
 * that says what happened and either 503 UNAVAILABLE or a refusal to start; never a 401 (a client told
 * its key is bad throws the key away), a hang, or a dead process.
 *
 * The real built server is used because these faults live below the process: file descriptors, the
 * WAL, POSIX locks. SQLite-only by nature: the children get no DATABASE_URL.
 *
 * Needs real root, so it runs under `npm run test:system` (as root, as CI does), not `npm test`. `unshare --mount --map-root-user` is enough for the tmpfs
 * cases, but not for a loop device, chattr +i or ext4's error trigger, so it is not offered. Without
 * root the file fails rather than skips: a skipped fault test looks exactly like a passing one.
 */

const REQUEST_TIMEOUT_MS = 20_000;
/** busy_timeout is 5 s; anything well past it would be a hang, not a wait. */
const BOUNDED_MS = 15_000;
const BETTER_SQLITE3 = join(REPO_ROOT, 'node_modules', 'better-sqlite3');

jest.setTimeout(60_000);

const newAdminKey = () => randomBytes(32).toString('hex');
const sha256 = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

interface Reply {
  status: number;
  body: any;
  headers: Headers;
  ms: number;
}

/** status 0: no answer within REQUEST_TIMEOUT_MS (a hang, reported as such instead of failing the run). */
async function call(method: string, url: string, headers: Record<string, string>, body?: unknown): Promise<Reply> {
  const started = Date.now();
  try {
    const res = await fetch(url, {
      method,
      headers: body === undefined ? headers : { 'Content-Type': 'application/json', ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
    const text = await res.text();
    return { status: res.status, body: text === '' ? null : JSON.parse(text), headers: res.headers, ms: Date.now() - started };
  } catch (err) {
    if ((err as Error).name !== 'TimeoutError') throw err;
    return { status: 0, body: null, headers: new Headers(), ms: Date.now() - started };
  }
}

function expectUnavailable(reply: Reply): void {
  expect({ status: reply.status, code: reply.body?.error?.code }).toEqual({ status: 503, code: 'UNAVAILABLE' });
  expect(Object.keys(reply.body).sort()).toEqual(['error']);
  expect(Object.keys(reply.body.error).sort()).toEqual(['code', 'details', 'message', 'request_id']);
  expect(reply.body.error.request_id).toBe(reply.headers.get('x-request-id'));
  expect(reply.headers.get('retry-after')).toBe('1');
}

/** Readable storage gives 200; unreadable storage 503. What it must never give is a 401. */
function expectReadOrUnavailable(reply: Reply): void {
  if (reply.status === 200) return;
  expectUnavailable(reply);
}

class Api {
  constructor(
    readonly server: ServerProcess,
    readonly adminKey: string,
  ) {}

  private get admin() {
    return { 'X-Admin-API-Key': this.adminKey };
  }

  createUser(email: string) {
    return call('POST', `${this.server.baseUrl}/admin/users`, this.admin, { email, max_concurrent_bots: 50 });
  }
  mint(userId: number) {
    return call('POST', `${this.server.baseUrl}/admin/users/${userId}/tokens`, this.admin, { scopes: ['bots:read', 'bots:write'] });
  }
  listUsers() {
    return call('GET', `${this.server.baseUrl}/admin/users?limit=100`, this.admin);
  }
  me(token: string) {
    return call('GET', `${this.server.baseUrl}/v1/me`, { 'X-API-Key': token });
  }
  acquireBot(token: string) {
    return call('POST', `${this.server.baseUrl}/v1/bots`, { 'X-API-Key': token }, { ttl_seconds: 600 });
  }
  listBots(token: string) {
    return call('GET', `${this.server.baseUrl}/v1/bots`, { 'X-API-Key': token });
  }
  readyz() {
    return call('GET', `${this.server.baseUrl}/readyz`, {});
  }
  healthz() {
    return call('GET', `${this.server.baseUrl}/healthz`, {});
  }

  /** Log lines written from now on. */
  logsFrom(): () => Array<Record<string, unknown>> {
    const offset = this.server.stdout.length;
    return () => jsonLines(this.server.stdout.slice(offset));
  }
}

function env(databasePath: string, adminKey: string): Record<string, string> {
  return { ADMIN_API_TOKEN: adminKey, DATABASE_PATH: databasePath, BCRYPT_ROUNDS: '4', PORT: '0', HOST: '127.0.0.1' };
}

async function start(databasePath: string, adminKey = newAdminKey()): Promise<Api> {
  const dir = makeTempDir('faults-cwd');
  return new Api(await startServer({ env: env(databasePath, adminKey), cwd: dir }), adminKey);
}

/** A user with one minted token, acknowledged (201) before any fault. */
async function seed(api: Api, email: string): Promise<{ userId: number; token: string }> {
  const user = await api.createUser(email);
  expect(user.status).toBe(201);
  const minted = await api.mint(user.body.id);
  expect(minted.status).toBe(201);
  return { userId: user.body.id, token: minted.body.token };
}

function expectAlive(api: Api): void {
  expect(api.server.child.exitCode).toBeNull();
  expect(api.server.child.signalCode).toBeNull();
}

const causeOf = (line: Record<string, unknown>) => String((line.err as { message?: string } | undefined)?.message);

/**
 * Waits (bounded) until at least `count` "request failed" error lines whose cause matches have been
 * logged since `lines` was taken: pino writes asynchronously, so the last may trail its response.
 */
async function expectFailureLogs(api: Api, lines: () => Array<Record<string, unknown>>, cause: RegExp, count: number) {
  const matching = () => lines().filter((l) => l.level === 'error' && l.msg === 'request failed' && cause.test(causeOf(l)));
  const child = api.server.child;
  await new Promise<void>((resolveWait) => {
    const check = () => {
      if (matching().length < count) return;
      clearTimeout(timer);
      child.stdout?.off('data', check);
      resolveWait();
    };
    const timer = setTimeout(() => {
      child.stdout?.off('data', check);
      resolveWait();
    }, 5_000);
    child.stdout?.on('data', check);
    check();
  });
  const failures = lines().filter((l) => l.msg === 'request failed');
  expect(failures.map((l) => `${String(l.level)} ${causeOf(l)}`)).toEqual(Array(count).fill(expect.stringMatching(new RegExp(`^error .*(${cause.source})`, cause.flags))));
}

function expectRefusal(result: Awaited<ReturnType<typeof runServerUntilExit>>, databasePath: string, cause: RegExp) {
  expect(result.timedOut).toBe(false);
  expect(result.code).not.toBe(0);
  expect(result.code).not.toBeNull();
  expect(result.stdout).not.toContain('keyward listening');
  const fatal = jsonLines(result.stdout).filter((l) => l.level === 'fatal');
  expect(fatal).toHaveLength(1);
  expect(fatal[0]).toMatchObject({ database: databasePath, msg: expect.stringMatching(/^cannot open or migrate the database.*refusing to start$/) });
  expect(`${String(fatal[0]!.msg)}: ${causeOf(fatal[0]!)}`).toMatch(cause);
}

/** The first log line since `lines` was taken that matches; fails after `timeoutMs`. */
async function waitForLog(api: Api, lines: () => Array<Record<string, unknown>>, match: (l: Record<string, unknown>) => boolean, timeoutMs: number) {
  const child = api.server.child;
  return new Promise<Record<string, unknown>>((resolveLine, reject) => {
    const check = () => {
      const line = lines().find(match);
      if (!line) return;
      clearTimeout(timer);
      child.stdout?.off('data', check);
      resolveLine(line);
    };
    const timer = setTimeout(() => {
      child.stdout?.off('data', check);
      reject(new Error(`no matching log line within ${timeoutMs} ms.\n${api.server.logs}`));
    }, timeoutMs);
    child.stdout?.on('data', check);
    check();
  });
}

let realDatabase: Buffer | undefined;

/** The file of a real database (one user, one token) closed cleanly, so the file alone holds it all. */
async function realDatabaseBytes(): Promise<Buffer> {
  if (realDatabase) return realDatabase;
  const databasePath = join(makeTempDir('faults-real'), 'keyward.db');
  const api = await start(databasePath);
  await seed(api, 'alice@example.com');
  expect((await api.server.stop()).code).toBe(0);
  expect(existsSync(`${databasePath}-wal`)).toBe(false);
  realDatabase = readFileSync(databasePath);
  return realDatabase;
}

const mounts: string[] = [];

async function sh(script: string): Promise<string> {
  const result = await runBash(script, { flags: ['-eu'], timeoutMs: 10_000 });
  if (result.code !== 0) throw new Error(`\`${script}\` failed (${result.code}): ${result.stderr}`);
  return result.stdout;
}

/** A fresh tmpfs of `sizeKiB`: small enough to fill in milliseconds, and remountable read-only. */
async function mountTmpfs(sizeKiB: number): Promise<string> {
  const dir = makeTempDir('faults-fs');
  const result = await runBash(`mount -t tmpfs -o size=${sizeKiB}k,mode=0700 keyward-faults '${dir}'`, { timeoutMs: 10_000 });
  if (result.code !== 0) {
    throw new Error(
      `storage-faults.test.ts needs to mount a small tmpfs and could not (${result.stderr.trim()}); run it as root.`,
    );
  }
  mounts.push(dir);
  return dir;
}

/** A small ext4 image, loop-mounted to remount itself read-only on an error, as production disks are. */
async function mountExt4(): Promise<{ dir: string; device: string; image: string }> {
  const image = join(makeTempDir('faults-img'), 'fs.img');
  const dir = makeTempDir('faults-ext4');
  await sh(`truncate -s 16M '${image}'; mkfs.ext4 -q -F '${image}'; mount -o loop,errors=remount-ro '${image}' '${dir}'`);
  mounts.push(dir);
  const device = (await sh(`findmnt -no SOURCE '${dir}'`)).trim().replace('/dev/', '');
  expect(device).toMatch(/^loop\d+$/);
  return { dir, device, image };
}

/** Writes zeros until the filesystem refuses: ENOSPC, with every last page taken. */
function fillUp(path: string): number {
  const fd = openSync(path, 'w');
  let written = 0;
  try {
    for (const size of [1 << 20, 4096, 1]) {
      const chunk = Buffer.alloc(size);
      for (;;) {
        try {
          const n = writeSync(fd, chunk);
          written += n;
          if (n < size) break;
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'ENOSPC') break;
          throw err;
        }
      }
    }
  } finally {
    closeSync(fd);
  }
  return written;
}

/**
 * Another process holding the database: `immediate` holds a write lock (BEGIN IMMEDIATE), which WAL
 * readers do not wait for; `exclusive` takes locking_mode=EXCLUSIVE and writes, after which nobody
 * else may even read. It lets go (closes) when its stdin closes.
 */
interface Holder {
  child: ChildProcess;
  release(): Promise<void>;
}

const holders = new Set<ChildProcess>();

const HOLDER_SCRIPT = `
const Database = require(process.argv[1]);
const db = new Database(process.argv[2], { timeout: 1000 });
if (process.argv[3] === 'exclusive') {
  db.pragma('locking_mode = EXCLUSIVE');
  db.pragma('user_version = 42');
} else {
  db.exec('BEGIN IMMEDIATE');
}
process.stdout.write('locked\\n');
process.stdin.resume();
process.stdin.on('end', () => {
  db.close();
  process.stdout.write('released\\n');
});
`;

async function holdLock(databasePath: string, mode: 'immediate' | 'exclusive'): Promise<Holder> {
  const child = spawn(process.execPath, ['-e', HOLDER_SCRIPT, BETTER_SQLITE3, databasePath, mode], { stdio: ['pipe', 'pipe', 'pipe'] });
  holders.add(child);
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8').on('data', (c: string) => (out += c));
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (err += c));
  const closed = new Promise<number | null>((r) => child.once('close', (code) => { holders.delete(child); r(code); }));
  const waitFor = (word: string) =>
    new Promise<void>((resolveWait, reject) => {
      const timer = setTimeout(() => reject(new Error(`lock holder did not say "${word}" within 10 s: ${out} ${err}`)), 10_000);
      const check = () => {
        if (out.includes(word)) {
          clearTimeout(timer);
          resolveWait();
        }
      };
      child.stdout!.on('data', check);
      void closed.then(() => {
        clearTimeout(timer);
        if (out.includes(word)) resolveWait();
        else reject(new Error(`lock holder exited before "${word}": ${out} ${err}`));
      });
      check();
    });
  await waitFor('locked');
  return {
    child,
    release: async () => {
      child.stdin!.end();
      await waitFor('released');
      expect(await closed).toBe(0);
    },
  };
}

beforeAll(() => {
  assertBuilt();
  if (process.getuid?.() !== 0) {
    throw new Error(
      'storage-faults.test.ts must run as root: it mounts tmpfs and loop-mounted ext4 filesystems, makes a file ' +
        'immutable (chattr +i) and forces an ext4 error. None of that works for another user, even in a user namespace.',
    );
  }
});

afterAll(async () => {
  for (const child of holders) child.kill('SIGKILL');
  await stopAllServers();
  // Unmount even when a test failed half-way; lazily if something still has a file open.
  const problems: string[] = [];
  for (const dir of mounts.splice(0)) {
    const result = await runBash(`umount '${dir}' || umount -l '${dir}'`, { timeoutMs: 10_000 });
    if (result.code !== 0) problems.push(`${dir}: ${result.stderr}`);
  }
  removeTempDirs();
  if (problems.length > 0) throw new Error(`could not unmount:\n${problems.join('\n')}`);
});

describe('a full disk', () => {
  test('fails writes with 503 UNAVAILABLE and a logged cause, keeps serving reads, and recovers when space is freed', async () => {
    const dir = await mountTmpfs(4096);
    const databasePath = join(dir, 'keyward.db');
    const api = await start(databasePath);
    const pid = api.server.child.pid;
    const alice = await seed(api, 'alice@example.com');
    expect((await api.acquireBot(alice.token)).status).toBe(201);
    const spare = await api.mint(alice.userId);
    expect(spare.status).toBe(201);

    const logs = api.logsFrom();
    const filler = join(dir, 'filler');
    expect(fillUp(filler)).toBeGreaterThan(0);

    const writes = [await api.createUser('bob@example.com'), await api.mint(alice.userId), await api.acquireBot(alice.token)];
    for (const reply of writes) expectUnavailable(reply);
    await expectFailureLogs(api, logs, /disk is full/, writes.length);

    // Verification only reads: a token verified before, and one never used on this process, both work.
    const me = await api.me(alice.token);
    expect(me.status).toBe(200);
    expect(me.body.user.email).toBe('alice@example.com');
    expect((await api.me(spare.body.token)).status).toBe(200);
    expect((await api.listBots(alice.token)).status).toBe(200);
    expect((await api.listUsers()).status).toBe(200);
    // The database still answers reads, so the instance stays in rotation.
    expect((await api.readyz()).status).toBe(200);

    // The last-use flush (every 5 s) hits the full disk too: a warning, not a crash.
    const flush = await waitForLog(api, logs, (l) => l.msg === 'could not record last use; will retry', 10_000);
    expect(flush.level).toBe('warn');
    expectAlive(api);

    rmSync(filler);
    const carol = await api.createUser('carol@example.com');
    expect(carol.status).toBe(201);
    expect((await api.mint(alice.userId)).status).toBe(201);
    expect((await api.acquireBot(alice.token)).status).toBe(201);
    expect(api.server.child.pid).toBe(pid);
    expectAlive(api);

    // After a restart: everything acknowledged is there, and nothing that got a 503 is.
    expect((await api.server.stop()).code).toBe(0);
    const again = await start(databasePath, api.adminKey);
    const users = await again.listUsers();
    expect(users.body.data.map((u: { email: string }) => u.email).sort()).toEqual(['alice@example.com', 'carol@example.com']);
    expect((await again.me(alice.token)).status).toBe(200);
    expect((await again.me(spare.body.token)).status).toBe(200);
    expect((await again.listBots(alice.token)).body.concurrency.active).toBe(2);
  });

  test('a fresh database on a full disk: refuses to start with a fatal line that names the file and the cause', async () => {
    const dir = await mountTmpfs(512);
    fillUp(join(dir, 'filler'));
    const databasePath = join(dir, 'keyward.db');
    const result = await runServerUntilExit({ env: env(databasePath, newAdminKey()), cwd: makeTempDir('faults-cwd') });
    expectRefusal(result, databasePath, /disk is full/);
  });

  test('a 503 tells the client the service is temporarily unavailable, not that it has an internal error', async () => {
    const dir = await mountTmpfs(1024);
    const api = await start(join(dir, 'keyward.db'));
    fillUp(join(dir, 'filler'));
    const reply = await api.createUser('bob@example.com');
    expectUnavailable(reply);
    expect(reply.body.error.message).toBe('The service is temporarily unavailable; try again shortly.');
  });

  // SQLite itself says only "disk I/O error" (SQLITE_IOERR_SHMSIZE) here: the log line must say more.
  test('an existing database on a full disk: refuses to start and says the disk is full', async () => {
    const dir = await mountTmpfs(1024);
    const databasePath = join(dir, 'keyward.db');
    writeFileSync(databasePath, await realDatabaseBytes(), { mode: 0o600 });
    const before = sha256(databasePath);
    fillUp(join(dir, 'filler'));
    const result = await runServerUntilExit({ env: env(databasePath, newAdminKey()), cwd: makeTempDir('faults-cwd') });
    expectRefusal(result, databasePath, /disk is full|no space/i);
    expect(sha256(databasePath)).toBe(before);
  });
});

describe('a read-only filesystem', () => {
  /**
   * tmpfs cannot be remounted read-only under a running server: the kernel refuses (EBUSY) while any
   * file on it is open for writing, and the server always has its database open. What does happen in
   * production is ext4 remounting itself read-only on an error (errors=remount-ro); ext4's
   * trigger_fs_error knob does exactly that to a small loop-mounted image. The kernel does not allow
   * such a filesystem back to read-write while mounted, so recovery is: stop, fsck, mount, start.
   */
  test('ext4 turning read-only under a running server: writes get 503, reads keep working, and after fsck and a restart nothing acknowledged is lost', async () => {
    const { dir, device, image } = await mountExt4();
    const databasePath = join(dir, 'keyward.db');
    const api = await start(databasePath);
    const alice = await seed(api, 'alice@example.com');
    const spare = await api.mint(alice.userId);
    expect(spare.status).toBe(201);
    expect((await api.acquireBot(alice.token)).status).toBe(201);
    expect((await api.me(alice.token)).status).toBe(200);

    const logs = api.logsFrom();
    await sh(`echo 1 > /sys/fs/ext4/${device}/trigger_fs_error`);
    expect(await sh(`findmnt -no OPTIONS '${dir}'`)).toMatch(/emergency_ro|(^|,)ro(,|$)/);
    const writes = [await api.createUser('bob@example.com'), await api.mint(alice.userId), await api.acquireBot(alice.token)];
    for (const reply of writes) expectUnavailable(reply);
    await expectFailureLogs(api, logs, /readonly|read-only|I\/O error/i, writes.length);

    const reads = [await api.me(alice.token), await api.me(spare.body.token), await api.listBots(alice.token), await api.listUsers(), await api.readyz()];
    for (const reply of reads) expectReadOrUnavailable(reply);
    expect(reads.map((r) => r.status)).toEqual([200, 200, 200, 200, 200]);
    expectAlive(api);

    const exit = await api.server.stop();
    expect(exit.signal).toBeNull();
    // e2fsck exits 1 when it has fixed something, which is the expected outcome after a forced error.
    await sh(`umount '${dir}'; e2fsck -fy '${image}' >/dev/null || [ $? -le 1 ]; mount -o loop,errors=remount-ro '${image}' '${dir}'`);
    const again = await start(databasePath, api.adminKey);
    expect((await again.listUsers()).body.data.map((u: { email: string }) => u.email)).toEqual(['alice@example.com']);
    expect((await again.me(spare.body.token)).status).toBe(200);
    expect((await again.listBots(alice.token)).body.concurrency.active).toBe(1);
    expect((await again.createUser('carol@example.com')).status).toBe(201);
  });

  async function closedDatabase(): Promise<{ dir: string; databasePath: string }> {
    const dir = await mountTmpfs(4096);
    const databasePath = join(dir, 'keyward.db');
    writeFileSync(databasePath, await realDatabaseBytes(), { mode: 0o600 });
    return { dir, databasePath };
  }

  test('a database on a filesystem mounted read-only at start: refuses to start and says it is read-only', async () => {
    const { dir, databasePath } = await closedDatabase();
    const before = sha256(databasePath);
    await sh(`mount -o remount,ro '${dir}'`);
    const result = await runServerUntilExit({ env: env(databasePath, newAdminKey()), cwd: makeTempDir('faults-cwd') });
    expectRefusal(result, databasePath, /read-only file system/);
    expect(sha256(databasePath)).toBe(before);
  });

  test('an immutable database file (chattr +i, which binds root too): refuses to start with a message naming the file', async () => {
    const { databasePath } = await closedDatabase();
    const before = sha256(databasePath);
    await sh(`chattr +i '${databasePath}'`);
    try {
      const result = await runServerUntilExit({ env: env(databasePath, newAdminKey()), cwd: makeTempDir('faults-cwd') });
      expectRefusal(result, databasePath, /operation not permitted/i);
      expect(String((jsonLines(result.stdout)[0]!.err as { message: string }).message)).toContain(databasePath);
    } finally {
      // An immutable file cannot be deleted, and would keep the tmpfs from going away cleanly.
      await sh(`chattr -i '${databasePath}'`);
    }
    expect(sha256(databasePath)).toBe(before);
  });
});

describe('a database locked by another process', () => {
  async function lockedSetup() {
    const databasePath = join(makeTempDir('faults-lock'), 'keyward.db');
    const api = await start(databasePath);
    const alice = await seed(api, 'alice@example.com');
    expect((await api.me(alice.token)).status).toBe(200);
    // Minted but never presented: its first check needs the database (no verified digest in memory).
    const fresh = await api.mint(alice.userId);
    expect(fresh.status).toBe(201);
    return { api, databasePath, alice, freshToken: fresh.body.token as string };
  }

  test('a write lock held past busy_timeout: writes get 503 in bounded time, reads go on, the release recovers, and EXCLUSIVE mode cannot be taken', async () => {
    const { api, databasePath, alice, freshToken } = await lockedSetup();
    const logs = api.logsFrom();
    const holder = await holdLock(databasePath, 'immediate');

    // The write waits out busy_timeout (5 s), then gives up. The reads in lockedSetup recorded last use
    // and usage, whose flushes (every 5 s) meet the same lock meanwhile.
    const admission = await api.acquireBot(alice.token);
    expectUnavailable(admission);
    expect(admission.ms).toBeGreaterThanOrEqual(4_000);
    expect(admission.ms).toBeLessThan(BOUNDED_MS);

    // WAL readers do not wait for a writer. Sent together so that a stall shows as one, not four.
    const reads = await Promise.all([api.me(alice.token), api.me(freshToken), api.listUsers(), api.readyz()]);
    expect(reads.map((r) => r.status)).toEqual([200, 200, 200, 200]);
    for (const reply of reads) expect(reply.ms).toBeLessThan(BOUNDED_MS);
    await expectFailureLogs(api, logs, /database is locked/, 1);
    expectAlive(api);

    await holder.release();

    // locking_mode=EXCLUSIVE would lock readers out too, but in WAL mode every open connection keeps a
    // shared lock on the file, so another process cannot take it from a running server: it gets
    // SQLITE_BUSY and the server does not notice. It can only get there before the server starts (below).
    await expect(holdLock(databasePath, 'exclusive')).rejects.toThrow(/database is locked/);
    expect((await api.me(alice.token)).status).toBe(200);
    expect((await api.acquireBot(alice.token)).status).toBe(201);
    expect((await api.createUser('carol@example.com')).status).toBe(201);
    expectAlive(api);
  });

  test('locking_mode=EXCLUSIVE taken before the server starts: refuses to start in bounded time, saying the database is locked', async () => {
    const databasePath = join(makeTempDir('faults-lock'), 'keyward.db');
    writeFileSync(databasePath, await realDatabaseBytes(), { mode: 0o600 });
    const holder = await holdLock(databasePath, 'exclusive');
    const started = Date.now();
    const result = await runServerUntilExit({ env: env(databasePath, newAdminKey()), cwd: makeTempDir('faults-cwd') });
    expect(Date.now() - started).toBeLessThan(BOUNDED_MS);
    expectRefusal(result, databasePath, /database is locked/);
    await holder.release();
  });
});

describe('a corrupt database file', () => {
  let real: Buffer;

  beforeAll(async () => {
    real = await realDatabaseBytes();
  });

  const PAGE = 4096;
  const variants: Array<[string, () => Buffer]> = [
    ['random bytes', () => randomBytes(64 * 1024)],
    ['a text file', () => Buffer.from('DATABASE_PATH=/data/keyward.db\nThis is a note, not a database.\n'.repeat(50))],
    ['a real database with its header overwritten', () => Buffer.concat([randomBytes(100), real.subarray(100)])],
    ['a real database truncated to its first two pages', () => real.subarray(0, 2 * PAGE)],
    ['a real database with every page after the first overwritten', () => Buffer.concat([real.subarray(0, PAGE), Buffer.alloc(real.length - PAGE, 0xa5)])],
  ];

  test.each(variants)('%s: refuses to start with one fatal line naming the file, and leaves the file as it was', async (_label, contents) => {
    const databasePath = join(makeTempDir('faults-corrupt'), 'keyward.db');
    writeFileSync(databasePath, contents(), { mode: 0o600 });
    const before = sha256(databasePath);
    const result = await runServerUntilExit({ env: env(databasePath, newAdminKey()), cwd: makeTempDir('faults-cwd') });
    expectRefusal(result, databasePath, /not a database|malformed|corrupt/i);
    expect(sha256(databasePath)).toBe(before);
  });

  test('corruption found while running: 503 (never 401) and a logged cause, and the process stays up', async () => {
    const databasePath = join(makeTempDir('faults-corrupt'), 'keyward.db');
    const api = await start(databasePath);
    const alice = await seed(api, 'alice@example.com');
    const fresh = await api.mint(alice.userId);
    expect(fresh.status).toBe(201);
    expect((await api.me(alice.token)).status).toBe(200);

    // Everything into the main file first, so the damage below is what the server will read.
    await sqliteExec(databasePath, 'PRAGMA wal_checkpoint(TRUNCATE)');
    const size = readFileSync(databasePath).length;
    const fd = openSync(databasePath, 'r+');
    writeSync(fd, Buffer.alloc(size - PAGE, 0xa5), 0, size - PAGE, PAGE);
    closeSync(fd);
    // A commit from elsewhere (touching only page 1) makes the server drop its page cache and read the damage.
    await sqliteExec(databasePath, 'PRAGMA user_version = 7');

    const logs = api.logsFrom();
    const replies = [await api.me(alice.token), await api.me(fresh.body.token), await api.createUser('bob@example.com'), await api.listUsers()];
    for (const reply of replies) expectUnavailable(reply);
    await expectFailureLogs(api, logs, /malformed|corrupt/i, replies.length);
    expect((await api.healthz()).status).toBe(200);
    expectAlive(api);
  });
});

/** Runs one statement on the file from another process, the way a second tool on the host would. */
async function sqliteExec(databasePath: string, statement: string): Promise<void> {
  const script = `const D = require(process.argv[1]); const db = new D(process.argv[2]); db.exec(process.argv[3]); db.close();`;
  await new Promise<void>((resolveRun, reject) => {
    const child = spawn(process.execPath, ['-e', script, BETTER_SQLITE3, databasePath, statement], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr.setEncoding('utf8').on('data', (c: string) => (err += c));
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    child.once('close', (code) => {
      clearTimeout(timer);
      if (code === 0) resolveRun();
      else reject(new Error(`${statement} failed (${code}): ${err}`));
    });
  });
}
