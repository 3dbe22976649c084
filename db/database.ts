import { closeSync, chmodSync, mkdirSync, openSync, statfsSync } from 'node:fs';
import { dirname } from 'node:path';
import SqliteDatabase from 'better-sqlite3';
import { type Compilable, type CompiledQuery, Kysely, Migrator, PostgresAdapter, PostgresDialect, SqliteDialect, sql } from 'kysely';
import { Pool, types } from 'pg';

const INT8_OID = 20;
import { migrationProvider } from './migrations';
import type { Database } from './schema';

/**
 * The dialect seam. Everything that knows which database engine is underneath lives in this file:
 * opening it, its pragmas, and how its errors are classified. Services and repositories only see
 * Kysely<Database> and the two predicates below, so a PostgreSQL dialect slots in here.
 */
export type Db = Kysely<Database>;

/** The largest id either database numbers: PostgreSQL's serial ids are int4. The API refuses larger ones. */
export const MAX_ID = 2_147_483_647;

export interface Storage {
  readonly db: Db;
  readonly dialect: 'sqlite' | 'postgres';
  /** PostgreSQL: the schema keyward's tables are in when it is not the default (the tests'). */
  readonly schema?: string;
  close(): Promise<void>;
}

/** DATABASE_URL set: PostgreSQL; otherwise the SQLite file at DATABASE_PATH. */
export function openDatabase(config: { databaseUrl: string | null; databasePath: string; databasePoolSize: number }): Storage {
  return config.databaseUrl ? openPostgres(config.databaseUrl, { poolSize: config.databasePoolSize }) : openSqlite(config.databasePath);
}

/**
 * PostgreSQL through a pool. `schema` puts every table in that schema (created if missing) through the
 * connections' search_path: the tests give each app its own.
 */
/**
 * A pool of connections to keyward's PostgreSQL database: the API's, and the shared rate-limit
 * counters' own few (src/rate-limit/counters.ts), in the same schema.
 */
export function postgresPool(
  url: string,
  options: { max: number; schema?: string; connectionTimeoutMs?: number; statementTimeoutMs?: number; keepIdle?: boolean },
): Pool {
  const pool = new Pool({
    connectionString: url,
    max: options.max,
    // Fail fast instead of queueing forever when the database is gone; the caller answers 503.
    connectionTimeoutMillis: options.connectionTimeoutMs ?? 5_000,
    // bigint columns (counters, balances) and count(*) arrive as numbers: every value keyward keeps
    // stays far below 2^53.
    types: { getTypeParser: ((oid: number, format?: string) => (oid === INT8_OID ? Number : types.getTypeParser(oid, format as 'text'))) as typeof types.getTypeParser },
    ...(options.schema ? { options: `-c search_path=${options.schema}` } : {}),
    ...(options.statementTimeoutMs ? { statement_timeout: options.statementTimeoutMs } : {}),
    // node-postgres closes a connection idle for 10 s; `keepIdle` keeps them open instead.
    ...(options.keepIdle ? { idleTimeoutMillis: 0 } : {}),
  });
  // An idle connection the server drops must not crash the process; the next query reconnects.
  pool.on('error', () => undefined);
  return pool;
}

export function openPostgres(url: string, options: { poolSize?: number; schema?: string } = {}): Storage {
  const pool = postgresPool(url, { max: options.poolSize ?? 10, schema: options.schema });
  const db = new Kysely<Database>({
    dialect: new PostgresDialect({
      pool: async () => {
        if (options.schema) {
          const client = await pool.connect();
          try {
            await client.query(`create schema if not exists "${options.schema.replace(/"/g, '""')}"`);
          } finally {
            client.release();
          }
        }
        return pool;
      },
    }),
  });
  return { db, dialect: 'postgres', schema: options.schema, close: () => db.destroy() };
}

/** How long SQLite waits for another process's lock before the request gets 503. */
const BUSY_TIMEOUT_MS = 5000;

export function openSqlite(path: string): Storage {
  if (path !== ':memory:') prepareDatabaseFile(path);
  const sqlite = new SqliteDatabase(path);
  if (path !== ':memory:') sqlite.pragma('journal_mode = WAL');
  // FULL: an acknowledged mint or revocation must survive a power cut, not just a crash. Writes are
  // admin actions, rare next to reads, so the extra fsync costs nothing that matters.
  sqlite.pragma('synchronous = FULL');
  sqlite.pragma('foreign_keys = ON');
  // SQLite's own default page cache (2 MB) instead of better-sqlite3's 16 MB: the file's pages are in
  // the kernel's page cache anyway, and a lookup that misses SQLite's cost the same (5.7 µs over 100,000
  // distinct tokens of a 1,000,000-token database, both sizes) while the larger cache added 15 MB to
  // the process.
  sqlite.pragma('cache_size = -2000');
  // A statement that meets another process's lock waits this long, synchronously: better-sqlite3
  // blocks the event loop meanwhile. Reads in WAL mode never meet one in practice; writes wait for the
  // lock in writeTransaction instead, without blocking.
  sqlite.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
  const statements = withStatementCache(sqlite);
  const db = new Kysely<Database>({ dialect: new SqliteDialect({ database: statements }) });
  sqliteStatements.set(db, statements);
  sqliteHandles.set(db, sqlite);
  return {
    db,
    dialect: 'sqlite',
    // Kysely's destroy closes the better-sqlite3 handle, which checkpoints the WAL.
    close: () => db.destroy(),
  };
}

const STATEMENT_CACHE_SIZE = 256;

/**
 * Kysely's SQLite driver prepares every query anew, which costs more than running it. Statements are
 * reusable (better-sqlite3 runs them synchronously, one at a time), so identical SQL text shares one.
 * keyward's queries are a small fixed set; the bound only guards against an unexpected variety.
 */
function withStatementCache(sqlite: SqliteDatabase.Database) {
  const statements = new Map<string, SqliteDatabase.Statement>();
  return {
    inTransaction: () => sqlite.inTransaction,
    close: () => sqlite.close(),
    prepare: (text: string) => {
      let statement = statements.get(text);
      if (!statement) {
        if (statements.size >= STATEMENT_CACHE_SIZE) statements.clear();
        statement = sqlite.prepare(text);
        statements.set(text, statement);
      }
      return statement;
    },
  };
}

const sqliteStatements = new WeakMap<Db, ReturnType<typeof withStatementCache>>();
const sqliteHandles = new WeakMap<Db, SqliteDatabase.Database>();

/** The SQLite connection under `db`, for SQLite's online backup API; undefined on other dialects. */
export function sqliteHandle(db: Db): SqliteDatabase.Database | undefined {
  return sqliteHandles.get(db);
}

/**
 * A single-row read that runs on every request (the credential lookup). On SQLite the compiled query
 * runs straight on its prepared statement: better-sqlite3 is synchronous, so Kysely's connection mutex
 * and promise chain only add cost (about a third of the lookup). Other dialects run it through Kysely.
 * Errors still arrive as rejections, classified by isStorageUnavailable like any other.
 */
export function hotRead<Row>(db: Db, query: CompiledQuery): (parameters: readonly unknown[]) => Promise<Row | undefined> {
  const statements = sqliteStatements.get(db);
  if (statements) {
    const statement = statements.prepare(query.sql);
    if (!statement.reader) throw new Error('hotRead takes a query that returns rows');
    const viaKysely = async (parameters: readonly unknown[]) => (await db.executeQuery<Row>({ ...query, parameters })).rows[0];
    // The one connection is shared with Kysely. While a Kysely transaction is open on it (between its
    // awaits), a direct read would see that transaction's uncommitted rows: wait for it like any query.
    return async (parameters) => (statements.inTransaction() ? viaKysely(parameters) : (statement.get(parameters) as Row | undefined));
  }
  return async (parameters) => (await db.executeQuery<Row>({ ...query, parameters })).rows[0];
}

/**
 * The same write for each of many rows, in one transaction: the periodic flushes of last use and usage.
 * Building and compiling a Kysely query costs far more than running it (about 12 µs and 25 KB of
 * garbage a row: a flush of 5,000 rows held the event loop for 60 ms and filled the young generation
 * as it went), so the query is built once with a marker in place of each of the row's values, and each
 * row runs the compiled statement with its own values in the markers' places.
 */
export async function writeEach<Row extends Record<string, string | number>>(db: Db, rows: readonly Row[], query: (trx: Db, row: Row) => Compilable<unknown>): Promise<void> {
  if (rows.length === 0) return;
  const keys = Object.keys(rows[0]!);
  const markers = Object.fromEntries(keys.map((key) => [key, `\u0000${key}`])) as Row;
  await writeTransaction(db, async (trx) => {
    const compiled = query(trx, markers).compile();
    const slots = compiled.parameters.map((p) => (typeof p === 'string' && p.startsWith('\u0000') ? p.slice(1) : undefined));
    if (keys.some((key) => !slots.includes(key))) throw new Error('writeEach: every value of a row must be a parameter of the query');
    for (const row of rows) {
      await trx.executeQuery({ ...compiled, parameters: compiled.parameters.map((p, i) => (slots[i] === undefined ? p : row[slots[i]!])) });
    }
  });
}

/**
 * The one way keyward writes in a transaction. On SQLite it begins IMMEDIATE: the write lock is taken
 * before the first read, so a read-then-write step (count the active bots, then admit one) is atomic
 * even across processes sharing the file; a second process waits (busy_timeout) instead of acting on
 * a count that is already stale.
 */
export async function writeTransaction<T>(db: Db, work: (trx: Db) => Promise<T>): Promise<T> {
  // PostgreSQL: read committed, and a step that must be atomic across instances locks the row it
  // depends on (lockUserForUpdate below) before it reads what it counts.
  if (!sqliteStatements.has(db)) return db.transaction().execute(work);
  const sqlite = sqliteHandles.get(db)!;
  // While another process holds the write lock, SQLite's own busy wait would block the event loop,
  // and every request with it, for up to BUSY_TIMEOUT_MS. Instead BEGIN IMMEDIATE is tried without
  // waiting, and tried again after a pause in which everything else runs.
  const deadline = Date.now() + BUSY_TIMEOUT_MS;
  for (let pause = 5; ; pause = Math.min(pause * 2, 100)) {
    try {
      return await sqliteTransaction(db, () => beginImmediateNow(sqlite), work);
    } catch (err) {
      if (!(err instanceof LockBusy) || Date.now() + pause > deadline) throw err instanceof LockBusy ? err.cause : err;
      await new Promise((resolve) => setTimeout(resolve, pause));
    }
  }
}

/** BEGIN IMMEDIATE found the write lock taken. */
class LockBusy extends Error {}

function beginImmediateNow(sqlite: SqliteDatabase.Database): void {
  // One synchronous step on the one connection: nothing else can run on it while the timeout is 0.
  sqlite.pragma('busy_timeout = 0');
  try {
    sqlite.exec('begin immediate');
  } catch (err) {
    if (sqliteCode(err) === 'SQLITE_BUSY') throw new LockBusy('the write lock is taken', { cause: err });
    throw err;
  } finally {
    sqlite.pragma(`busy_timeout = ${BUSY_TIMEOUT_MS}`);
  }
}

/** Kysely's SQLite transactions always begin DEFERRED; these choose how theirs begins. */
function sqliteTransaction<T>(db: Db, begin: (connection: Db) => Promise<unknown> | void, work: (trx: Db) => Promise<T>): Promise<T> {
  return db.connection().execute(async (connection) => {
    await begin(connection);
    try {
      const result = await work(connection);
      await sql`commit`.execute(connection);
      return result;
    } catch (err) {
      await sql`rollback`.execute(connection).catch(() => undefined);
      throw err;
    }
  });
}

/**
 * Reads that must see one moment of the database (a report built from two tables while another
 * process may move rows between them). On SQLite a deferred transaction: its first read fixes the
 * snapshot, and writers carry on meanwhile (WAL).
 */
export async function readSnapshot<T>(db: Db, work: (trx: Db) => Promise<T>): Promise<T> {
  if (!sqliteStatements.has(db)) return db.transaction().setIsolationLevel('repeatable read').execute(work);
  return sqliteTransaction(db, (connection) => sql`begin`.execute(connection), work);
}

/** The file is created before SQLite opens it, so there is no moment where others can read it. */
function prepareDatabaseFile(path: string): void {
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  closeSync(openSync(path, 'a', 0o600));
  // An existing file keeps its mode on open: tighten it. SQLite gives its -wal and -shm files the
  // same mode as the database file.
  chmodSync(path, 0o600);
}

export async function migrateToLatest(db: Db): Promise<void> {
  // Kysely's migrator looks for its own tables in every schema it can see; one in another schema
  // (another application's, another test's) must not count. On PostgreSQL it is told ours.
  const schema = db.getExecutor().adapter instanceof PostgresAdapter
    ? (await sql<{ schema: string }>`select current_schema() as schema`.execute(db)).rows[0]?.schema
    : undefined;
  const migrator = new Migrator({ db, provider: migrationProvider, ...(schema ? { migrationTableSchema: schema } : {}) });
  const { error, results } = await migrator.migrateToLatest();
  const failed = results?.find((r) => r.status === 'Error');
  if (error || failed) {
    const cause = error instanceof Error ? error.message : String(error ?? 'unknown error');
    throw new Error(`database migration ${failed?.migrationName ?? ''} failed: ${cause}`);
  }
}

/**
 * Locks one user's row until the write transaction ends, where the database has row locks
 * (PostgreSQL: SELECT … FOR UPDATE). Steps that count a user's rows and then insert one (bot admission,
 * the token cap) take it first, so instances sharing the database take turns per user. SQLite needs
 * nothing: its write transaction already holds the whole database.
 */
export async function lockUserForUpdate(trx: Db, userId: number): Promise<void> {
  if (!(trx.getExecutor().adapter instanceof PostgresAdapter)) return;
  await trx.selectFrom('users').select('id').where('id', '=', userId).forUpdate().execute();
}

function sqliteCode(err: unknown): string {
  if (typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string') return err.code;
  return '';
}

export function isUniqueViolation(err: unknown): boolean {
  const code = sqliteCode(err);
  return code === 'SQLITE_CONSTRAINT_UNIQUE' || code === 'SQLITE_CONSTRAINT_PRIMARYKEY' || code === PG_UNIQUE_VIOLATION;
}

const PG_UNIQUE_VIOLATION = '23505';
// Connection exceptions (08…), too many connections, shutting down, cannot connect now, disk full,
// out of memory, and the network errors node-postgres passes through.
const PG_UNAVAILABLE = /^(08\w{3}|53\w{3}|57P0[1-3]|58\w{3}|ECONNREFUSED|ECONNRESET|ETIMEDOUT|EPIPE|ENOTFOUND|EAI_AGAIN)$/;

const UNAVAILABLE_CODES = /^SQLITE_(BUSY|LOCKED|IOERR|FULL|READONLY|CORRUPT|NOTADB|CANTOPEN|PROTOCOL|NOMEM)/;

/**
 * Storage that cannot answer right now. The caller must turn this into 503, never into "invalid key":
 * a client told its key is bad while the disk is full would throw the key away.
 */
export function isStorageUnavailable(err: unknown): boolean {
  const code = sqliteCode(err);
  if (UNAVAILABLE_CODES.test(code) || PG_UNAVAILABLE.test(code)) return true;
  // Not `instanceof Error`: better-sqlite3 raises its errors from its own realm (they fail that check
  // under jest's module sandbox, for one).
  const message = typeof err === 'object' && err !== null && 'message' in err && typeof err.message === 'string' ? err.message : '';
  return (
    message.includes('database connection is not open') ||
    message.includes('driver has already been destroyed') ||
    // node-postgres, when a pool has ended or a connection attempt timed out.
    message.includes('Cannot use a pool after calling end') ||
    message.includes('timeout exceeded when trying to connect') ||
    message.includes('Connection terminated')
  );
}

/**
 * The cause in plain words where SQLite's own message misleads: on a full disk SQLite cannot grow its
 * -shm file and says only "disk I/O error". Undefined when SQLite's message is clear enough.
 */
export function storageFailureHint(err: unknown, path: string): string | undefined {
  if (!sqliteCode(err).startsWith('SQLITE_IOERR')) return undefined;
  try {
    if (statfsSync(dirname(path)).bavail === 0) return `no space left on the filesystem of ${dirname(path)}`;
  } catch {
    // The directory itself is the problem: SQLite's error already says so.
  }
  return undefined;
}
