import { randomBytes } from 'node:crypto';
import {
  chmodSync,
  closeSync,
  existsSync,
  fsyncSync,
  linkSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readSync,
  renameSync,
  rmSync,
  statSync,
  unlinkSync,
  writeSync,
} from 'node:fs';
import { rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import SqliteDatabase from 'better-sqlite3';
import { LATEST_MIGRATION, migrationProvider } from '../../db/migrations';

/**
 * Online backup and checked restore of keyward's SQLite file.
 *
 * Backup copies through SQLite's online backup API from a connection of its own, so the server keeps
 * reading and writing (WAL) while it runs. Restore never lets a file it has not checked near the live
 * path: the backup is copied to a private staging file next to the database, checked there, and renamed
 * over the database only after the previous one has been kept, with no -wal/-shm/-journal left beside it.
 *
 * Expected failures (a missing file, a corrupt backup, a running server) are BackupError, whose message
 * is one line meant for the operator.
 */
export class BackupError extends Error {
  override readonly name = 'BackupError';
}

export interface BackupResult {
  /** Where the backup was written, as given. */
  readonly path: string;
  readonly bytes: number;
  /** The last migration applied in the copy: the schema a keyward needs to serve it. */
  readonly schemaVersion: string;
}

export interface TemporaryBackup extends BackupResult {
  /** Deletes the backup and its private directory. Safe to call more than once. */
  remove(): Promise<void>;
}

export interface RestoreResult {
  readonly databasePath: string;
  readonly bytes: number;
  readonly schemaVersion: string;
  /** True when the backup's schema is older than this keyward's: its migrations run at the next start. */
  readonly migrationsPending: boolean;
  /** Where the replaced database is kept; null when there was none. */
  readonly previousPath: string | null;
  /**
   * False when the replaced file was not a readable SQLite database, so it could not be locked and
   * keyward being stopped could not be checked (it cannot have been serving from that file either).
   */
  readonly checkedStopped: boolean;
}

type Sqlite = SqliteDatabase.Database;

const KEYWARD_TABLES = ['kysely_migration', 'users', 'tokens'] as const;
// SQLite writes these beside a database. A -wal or -journal left next to a file that is not theirs is
// replayed into it at the next open: that is how a careless restore corrupts the restored database.
const COMPANIONS = ['-wal', '-journal', '-shm'] as const;
// Backup in one step: a backup interrupted between steps by another connection's write starts over,
// so under a steady write load small steps might never finish. One step holds a read snapshot for its
// duration; in WAL mode writers carry on meanwhile.
const ALL_PAGES = () => 0x7fffffff;
// How long restore waits for the database lock before deciding that another process is using the file.
const LOCK_WAIT_MS = 1000;
// How long a backup waits for a source that is busy (a transaction open on the handle it was given).
const BUSY_WAIT_MS = 5000;

/**
 * Writes a consistent copy of the database at `source` (a path, or an open better-sqlite3 handle) to
 * `destination`, mode 0600, readable on its own (no -wal beside it). Refuses to replace an existing
 * file unless `overwrite`. The file appears at `destination` only once it is complete.
 */
export async function backupToFile(
  source: string | Sqlite,
  destination: string,
  options: { overwrite?: boolean } = {},
): Promise<BackupResult> {
  const sourcePath = typeof source === 'string' ? source : source.name;
  if (typeof source === 'string') requireFile(source, `no database at ${source}`);
  if (existsSync(destination)) {
    if (sameFile(destination, sourcePath)) throw new BackupError(`${destination} is the database itself; choose another file`);
    if (statSync(destination).isDirectory()) throw new BackupError(`${destination} is a directory; name the backup file`);
    if (!options.overwrite) throw new BackupError(`${destination} already exists; pass --force to overwrite it`);
  }

  const staging = createPrivateFile(dirname(resolve(destination)), `.${basename(destination)}.`, destination);
  try {
    const db = typeof source === 'string' ? new SqliteDatabase(source, { fileMustExist: true, timeout: BUSY_WAIT_MS }) : source;
    try {
      await copyAll(db, staging, sourcePath);
    } catch (err) {
      throw sqliteProblem(err, sourcePath, destination);
    } finally {
      if (typeof source === 'string') db.close();
    }
    const { migrations } = inspectStaging(staging, sourcePath, 'database');
    syncFile(staging);
    place(staging, destination, options.overwrite === true);
    syncDirectory(dirname(resolve(destination)));
    return { path: destination, bytes: statSync(destination).size, schemaVersion: migrations.at(-1)! };
  } catch (err) {
    removeWithCompanions(staging);
    throw err;
  }
}

async function copyAll(db: Sqlite, destination: string, label: string): Promise<void> {
  const deadline = Date.now() + BUSY_WAIT_MS;
  for (;;) {
    const { totalPages } = await db.backup(destination, { progress: ALL_PAGES });
    // better-sqlite3 reports a first step that found the source busy (for one, a write transaction
    // open on this very handle, as Kysely keeps one open across awaits) as a finished backup of zero
    // pages. Only a truly empty source may end that way.
    if (totalPages > 0 || db.pragma('page_count', { simple: true }) === 0) return;
    if (Date.now() > deadline) throw new BackupError(`${label} stayed busy for ${BUSY_WAIT_MS / 1000} s; try again`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * A backup in a fresh private directory (mode 0700, under os.tmpdir() unless `directory` is given), for
 * a caller that streams it somewhere and then calls remove().
 */
export async function backupToTempFile(source: string | Sqlite, options: { directory?: string; now?: Date } = {}): Promise<TemporaryBackup> {
  const dir = mkdtempSync(join(options.directory ?? tmpdir(), 'keyward-backup-'));
  const remove = () => rm(dir, { recursive: true, force: true });
  try {
    const result = await backupToFile(source, join(dir, `keyward-${utcStamp(options.now ?? new Date())}.db`));
    return { ...result, remove };
  } catch (err) {
    await remove();
    throw err;
  }
}

/**
 * Replaces the database at `databasePath` with the backup at `backupPath`, after checking the backup
 * (integrity, keyward's tables, a schema this keyward can run) and that no process has the database
 * open. The replaced database is kept beside it as `<databasePath>.before-restore-<UTC time>` (0600).
 */
export async function restoreFromFile(backupPath: string, databasePath: string, options: { now?: Date } = {}): Promise<RestoreResult> {
  requireFile(backupPath, `no backup at ${backupPath}`);
  if (sameFile(backupPath, databasePath)) throw new BackupError(`${backupPath} is the database itself; name a backup file`);
  const target = resolve(databasePath);
  const dir = dirname(target);
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (err) {
    throw cannotWrite(databasePath, err);
  }

  const staging = createPrivateFile(dir, `.${basename(target)}.restore-`, databasePath);
  try {
    try {
      copyPrivate(backupPath, staging, { replace: true });
      // A copy of a live WAL database carries committed rows in its -wal: bring them along.
      if (existsSync(`${backupPath}-wal`)) copyPrivate(`${backupPath}-wal`, `${staging}-wal`);
    } catch (err) {
      throw cannotWrite(databasePath, err);
    }
    const { migrations, bytes } = inspectStaging(staging, backupPath, 'backup');
    const schemaVersion = migrations.at(-1)!;
    await requireKnownSchema(migrations, backupPath);

    const current = lockCurrent(target, databasePath);
    try {
      const previousPath = current.kind === 'none' ? null : await keepPrevious(current, target, options.now ?? new Date(), databasePath);
      for (const suffix of COMPANIONS) removeIfPresent(`${target}${suffix}`);
      syncFile(staging);
      renameSync(staging, target);
      syncDirectory(dir);
      return {
        databasePath,
        bytes,
        schemaVersion,
        migrationsPending: schemaVersion < LATEST_MIGRATION,
        previousPath,
        checkedStopped: current.kind !== 'unreadable',
      };
    } finally {
      // In MEMORY journal mode closing touches no file by name, so the restored file beside it is safe.
      if (current.kind === 'locked') current.db.close();
    }
  } catch (err) {
    removeWithCompanions(staging);
    throw err;
  }
}

/**
 * Opens a private copy, folds any WAL into it (journal mode DELETE: the file stands alone afterwards),
 * and checks that it is a sound keyward database. Exclusive locking mode: no -shm is made for it.
 */
function inspectStaging(staging: string, label: string, what: 'backup' | 'database'): { migrations: string[]; bytes: number } {
  let db: Sqlite | undefined;
  try {
    db = new SqliteDatabase(staging, { fileMustExist: true, timeout: 0 });
    db.pragma('locking_mode = EXCLUSIVE');
    db.pragma('journal_mode = DELETE');
    if (what === 'backup') {
      const rows = db.pragma('integrity_check(20)') as Array<{ integrity_check: string }>;
      if (rows.length !== 1 || rows[0]!.integrity_check !== 'ok') {
        throw new BackupError(`${label} is corrupt (integrity check: ${oneLine(rows.map((r) => r.integrity_check).join('; '))}); nothing was changed`);
      }
    }
    const migrations = keywardMigrations(db, label, what);
    db.close();
    db = undefined;
    for (const suffix of COMPANIONS) removeIfPresent(`${staging}${suffix}`);
    return { migrations, bytes: statSync(staging).size };
  } catch (err) {
    if (err instanceof BackupError) throw err;
    const code = codeOf(err);
    if (code === 'SQLITE_NOTADB') throw new BackupError(`${label} is not a SQLite database${what === 'backup' ? '; nothing was changed' : ''}`);
    if (code.startsWith('SQLITE_CORRUPT')) throw new BackupError(`${label} is corrupt (${oneLine(messageOf(err))})${what === 'backup' ? '; nothing was changed' : ''}`);
    throw err;
  } finally {
    db?.close();
  }
}

function keywardMigrations(db: Sqlite, label: string, what: 'backup' | 'database'): string[] {
  const tables = new Set(db.prepare(`select name from sqlite_master where type = 'table'`).pluck().all() as string[]);
  const missing = KEYWARD_TABLES.filter((t) => !tables.has(t));
  const names = missing.length === 0 ? (db.prepare('select name from kysely_migration order by name').pluck().all() as string[]) : [];
  if (missing.length > 0 || names.length === 0) {
    const why = missing.length > 0 ? `no ${missing.join(', ')} table` : 'no migration applied';
    throw new BackupError(`${label} is not a keyward ${what} (${why})${what === 'backup' ? '; nothing was changed' : ''}`);
  }
  return names;
}

/** The backup must need no migration this keyward lacks, or the server would refuse to start on it. */
async function requireKnownSchema(migrations: string[], label: string): Promise<void> {
  const latest = migrations.at(-1)!;
  if (latest > LATEST_MIGRATION) {
    throw new BackupError(
      `${label} has schema ${latest}, newer than this keyward's (${LATEST_MIGRATION}): upgrade keyward first, then restore; nothing was changed`,
    );
  }
  const known = new Set(Object.keys(await migrationProvider.getMigrations()));
  const unknown = migrations.filter((m) => !known.has(m));
  if (unknown.length > 0) {
    throw new BackupError(`${label} has migrations this keyward does not know (${unknown.join(', ')}); nothing was changed`);
  }
}

type Current = { kind: 'none' } | { kind: 'locked'; db: Sqlite } | { kind: 'unreadable' };

/**
 * Takes the database's lock for the rest of the restore, which is also how a running keyward is found:
 * every connection to a WAL database holds a shared lock on the file for as long as it is open, so an
 * exclusive lock is refused while any server (or other process) has it open, idle or not. Advisory
 * locks are only as good as the file system: reliable on a local disk, not on network shares.
 *
 * Exclusive locking mode makes SQLite take the lock on the file itself and skip the -shm. Switching to
 * journal mode MEMORY checkpoints the WAL into the file and deletes it, so the file stands alone, and
 * no journal file is made. Nothing else here may open the file with fs: closing any descriptor of a
 * file drops every POSIX lock the process holds on it.
 */
function lockCurrent(target: string, label: string): Current {
  if (!existsSync(target)) return { kind: 'none' };
  if (!statSync(target).isFile()) throw new BackupError(`${label} is not a file; nothing was changed`);
  const db = new SqliteDatabase(target, { fileMustExist: true, timeout: LOCK_WAIT_MS });
  try {
    db.pragma('locking_mode = EXCLUSIVE');
    db.pragma('journal_mode = MEMORY');
    db.exec('begin exclusive');
    db.exec('commit');
    return { kind: 'locked', db };
  } catch (err) {
    db.close();
    const code = codeOf(err);
    if (code.startsWith('SQLITE_BUSY') || code.startsWith('SQLITE_LOCKED')) {
      throw new BackupError(`${label} is in use by another process (is keyward running?): stop keyward, then restore; nothing was changed`);
    }
    // A file SQLite cannot read is what a restore is often for; it is kept byte for byte instead.
    if (code === 'SQLITE_NOTADB' || code.startsWith('SQLITE_CORRUPT')) return { kind: 'unreadable' };
    throw sqliteProblem(err, label, label);
  }
}

async function keepPrevious(current: Exclude<Current, { kind: 'none' }>, target: string, now: Date, label: string): Promise<string> {
  // Named from the path as given, so messages show it the way the operator wrote it.
  const base = `${label}.before-restore-${utcStamp(now)}`;
  let previous = '';
  for (let n = 1; previous === ''; n++) {
    const candidate = n === 1 ? base : `${base}-${n}`;
    try {
      closeSync(openSync(candidate, 'wx', 0o600));
      previous = candidate;
    } catch (err) {
      if (codeOf(err) !== 'EEXIST' || n >= 100) throw cannotWrite(candidate, err);
    }
  }
  try {
    chmodSync(previous, 0o600);
    if (current.kind === 'locked') {
      // Through the locked connection: a second descriptor on the file would drop the lock.
      await current.db.backup(previous, { progress: ALL_PAGES });
    } else {
      copyPrivate(target, previous, { replace: true });
      if (existsSync(`${target}-wal`)) copyPrivate(`${target}-wal`, `${previous}-wal`);
    }
    syncFile(previous);
    return previous;
  } catch (err) {
    removeWithCompanions(previous);
    throw sqliteProblem(err, label, previous);
  }
}

/** Moves the finished staging file into place; without `overwrite`, never over a file that appeared meanwhile. */
function place(staging: string, destination: string, overwrite: boolean): void {
  if (overwrite) {
    removeIfPresent(`${destination}-wal`);
    removeIfPresent(`${destination}-journal`);
    renameSync(staging, destination);
    return;
  }
  try {
    linkSync(staging, destination);
    unlinkSync(staging);
  } catch (err) {
    if (codeOf(err) === 'EEXIST') throw new BackupError(`${destination} already exists; pass --force to overwrite it`);
    // File systems without hard links: the existence check above has to do.
    if (existsSync(destination)) throw new BackupError(`${destination} already exists; pass --force to overwrite it`);
    renameSync(staging, destination);
  }
}

function createPrivateFile(dir: string, prefix: string, label: string): string {
  for (;;) {
    const path = join(dir, `${prefix}${randomBytes(6).toString('hex')}.tmp`);
    try {
      closeSync(openSync(path, 'wx', 0o600));
      // The umask can only remove bits; this also undoes an unusual one that removed the owner's.
      chmodSync(path, 0o600);
      return path;
    } catch (err) {
      if (codeOf(err) !== 'EEXIST') throw cannotWrite(label, err);
    }
  }
}

/** Copies bytes into a file created 0600 (fs.copyFile would give it the source's mode). */
function copyPrivate(from: string, to: string, options: { replace?: boolean } = {}): void {
  let input: number;
  try {
    input = openSync(from, 'r');
  } catch (err) {
    throw new BackupError(`cannot read ${from}: ${codeOf(err) === 'EACCES' ? 'permission denied' : oneLine(messageOf(err))}`);
  }
  try {
    const output = openSync(to, options.replace ? 'w' : 'wx', 0o600);
    try {
      const buffer = Buffer.allocUnsafe(1 << 20);
      for (;;) {
        const n = readSync(input, buffer, 0, buffer.length, null);
        if (n === 0) break;
        for (let written = 0; written < n; ) written += writeSync(output, buffer, written, n - written);
      }
      fsyncSync(output);
    } finally {
      closeSync(output);
    }
  } finally {
    closeSync(input);
  }
}

function requireFile(path: string, missing: string): void {
  if (!existsSync(path)) throw new BackupError(missing);
  if (!statSync(path).isFile()) throw new BackupError(`${path} is not a file`);
}

function sameFile(a: string, b: string): boolean {
  if (!existsSync(a) || !existsSync(b)) return false;
  const sa = statSync(a);
  const sb = statSync(b);
  return sa.dev === sb.dev && sa.ino === sb.ino;
}

function syncFile(path: string): void {
  const fd = openSync(path, 'r+');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** A rename is durable only once its directory is synced. Not every platform can sync a directory. */
function syncDirectory(dir: string): void {
  let fd: number | undefined;
  try {
    fd = openSync(dir, 'r');
    fsyncSync(fd);
  } catch {
    // best effort
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

function removeIfPresent(path: string): void {
  rmSync(path, { force: true });
}

function removeWithCompanions(path: string): void {
  for (const p of [path, ...COMPANIONS.map((s) => `${path}${s}`)]) {
    try {
      removeIfPresent(p);
    } catch {
      // cleanup of our own temporary file; the original error matters more
    }
  }
}

/** 2026-11-23T07:14:05.123Z → 20261123T071405Z: sorts by time, and is a valid file name everywhere. */
export function utcStamp(date: Date): string {
  return date.toISOString().replace(/\.\d{3}Z$/, 'Z').replace(/[-:]/g, '');
}

function codeOf(err: unknown): string {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : '';
}

function messageOf(err: unknown): string {
  return typeof err === 'object' && err !== null && 'message' in err && typeof err.message === 'string' ? err.message : String(err);
}

function oneLine(text: string): string {
  const flat = text.replace(/\s+/g, ' ').trim();
  return flat.length > 300 ? `${flat.slice(0, 297)}...` : flat;
}

function cannotWrite(path: string, err: unknown): BackupError {
  if (err instanceof BackupError) return err;
  const reasons: Record<string, string> = {
    ENOENT: `directory ${dirname(path)} does not exist`,
    ENOTDIR: `${dirname(path)} is not a directory`,
    EACCES: 'permission denied',
    EPERM: 'permission denied',
    EROFS: 'read-only file system',
    ENOSPC: 'no space left on the device',
    EDQUOT: 'disk quota exceeded',
    EISDIR: 'it is a directory',
  };
  return new BackupError(`cannot write ${path}: ${reasons[codeOf(err)] ?? oneLine(messageOf(err))}`);
}

/** SQLite errors while reading `source` and writing `destination`, in words. */
function sqliteProblem(err: unknown, source: string, destination: string): Error {
  if (err instanceof BackupError) return err;
  const code = codeOf(err);
  if (code === 'SQLITE_NOTADB') return new BackupError(`${source} is not a SQLite database`);
  if (code.startsWith('SQLITE_CORRUPT')) return new BackupError(`${source} is corrupt (${oneLine(messageOf(err))})`);
  if (code.startsWith('SQLITE_BUSY') || code.startsWith('SQLITE_LOCKED')) return new BackupError(`${source} stayed locked by another process; try again`);
  if (/^SQLITE_(FULL|IOERR|CANTOPEN|READONLY|PERM)/.test(code)) return new BackupError(`cannot write ${destination}: ${oneLine(messageOf(err))}`);
  if (/^E[A-Z]+$/.test(code)) return cannotWrite(destination, err);
  return err instanceof Error ? err : new Error(messageOf(err));
}
