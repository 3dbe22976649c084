import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import SqliteDatabase from 'better-sqlite3';
import { sql } from 'kysely';
import { isStorageUnavailable, migrateToLatest, openSqlite, sqliteHandle, type Storage, writeEach, writeTransaction } from '../db/database';
import { findCredentialBySelector } from '../src/tokens/tokens.repository';

let storage: Storage;
beforeEach(async () => {
  storage = openSqlite(':memory:');
  await migrateToLatest(storage.db);
  const now = '2026-01-01T00:00:00.000Z';
  const { id } = await storage.db
    .insertInto('users')
    .values({ email: 'a@example.com', email_lower: 'a@example.com', name: null, max_concurrent_bots: 3, data: null, created_at: now, updated_at: now })
    .returning('id')
    .executeTakeFirstOrThrow();
  await storage.db
    .insertInto('tokens')
    .values({ user_id: id, name: null, selector: 'AAAAAAAAAAAA', secret_hash: 'x', last4: 'abcd', environment: 'live', scopes: 'bots:read', created_at: now })
    .execute();
});
afterEach(() => storage.close());

describe('the credential lookup (hotRead)', () => {
  test('finds a token by selector, with its user, and nothing for an unknown selector', async () => {
    expect(await findCredentialBySelector(storage.db, 'AAAAAAAAAAAA')).toMatchObject({ token_id: 1, email: 'a@example.com', revoked_at: null });
    expect(await findCredentialBySelector(storage.db, 'BBBBBBBBBBBB')).toBeUndefined();
  });

  test('never reads a transaction that has not committed: it waits for it, then sees its result', async () => {
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    let inside!: () => void;
    const started = new Promise<void>((resolve) => (inside = resolve));
    const transaction = storage.db.transaction().execute(async (trx) => {
      await trx.updateTable('tokens').set({ revoked_at: '2026-01-01T00:00:01.000Z' }).where('id', '=', 1).execute();
      inside();
      await held;
      throw new Error('roll back');
    });
    await started;
    let answered = false;
    const lookup = findCredentialBySelector(storage.db, 'AAAAAAAAAAAA').then((row) => {
      answered = true;
      return row;
    });
    await new Promise((resolve) => setTimeout(resolve, 50));
    // The revocation is uncommitted: the lookup must neither see it nor answer before the transaction ends.
    expect(answered).toBe(false);
    release();
    await expect(transaction).rejects.toThrow('roll back');
    expect((await lookup)?.revoked_at).toBeNull();
  });
});

describe('writeEach (the periodic flushes)', () => {
  const tokenRows = async () => storage.db.selectFrom('tokens').select(['id', 'name', 'last4']).orderBy('id').execute();

  beforeEach(async () => {
    const now = '2026-01-01T00:00:00.000Z';
    for (let i = 0; i < 4; i++) {
      await storage.db
        .insertInto('tokens')
        .values({ user_id: 1, name: null, selector: `S${i}`.padEnd(12, 'x'), secret_hash: 'x', last4: 'abcd', environment: 'live', scopes: 'bots:read', created_at: now })
        .execute();
    }
  });

  test("runs the write once per row with that row's values, a value used twice included, and a constant of the query kept", async () => {
    const rows = [2, 3, 4, 5].map((id) => ({ id, name: `token ${id}` }));
    await writeEach(storage.db, rows, (trx, row) =>
      trx.updateTable('tokens').set({ name: row.name, last4: 'wxyz' }).where('id', '=', row.id).where('name', 'is', null).where((eb) => eb.or([eb('name', '<>', row.name), eb('id', '=', row.id)])),
    );
    expect(await tokenRows()).toEqual([
      { id: 1, name: null, last4: 'abcd' },
      ...rows.map(({ id, name }) => ({ id, name, last4: 'wxyz' })),
    ]);
  });

  test('is one transaction: a row that fails rolls back the rows before it', async () => {
    const rows = [{ id: 2, selector: 'NEW000000000' }, { id: 3, selector: 'AAAAAAAAAAAA' }];
    const before = await storage.db.selectFrom('tokens').select(['id', 'selector']).execute();
    const outcome = await writeEach(storage.db, rows, (trx, row) => trx.updateTable('tokens').set({ selector: row.selector }).where('id', '=', row.id)).then(() => 'resolved', (err: Error) => err.message);
    // The rows it started from are part of the report: if this ever fails, they say why.
    expect({ outcome, before }).toEqual({ outcome: expect.stringMatching(/UNIQUE/), before: expect.arrayContaining([{ id: 1, selector: 'AAAAAAAAAAAA' }, { id: 3, selector: 'S1xxxxxxxxxx' }]) });
    expect(await storage.db.selectFrom('tokens').select('selector').where('id', '=', 2).executeTakeFirstOrThrow()).toEqual({ selector: 'S0xxxxxxxxxx' });
  });

  test('refuses a query that leaves one of the row\'s values out, having written nothing', async () => {
    const rows = [{ id: 2, name: 'never written' }];
    await expect(writeEach(storage.db, rows, (trx, row) => trx.updateTable('tokens').set({ last4: 'wxyz' }).where('id', '=', row.id))).rejects.toThrow(/every value of a row/);
    expect((await tokenRows()).every((row) => row.last4 === 'abcd')).toBe(true);
  });

  test('writes nothing and opens no transaction for no rows', async () => {
    await writeEach(storage.db, [], () => {
      throw new Error('not called');
    });
  });
});

describe('writeTransaction on a SQLite file another process is writing to', () => {
  let dir: string;
  let file: Storage;
  let other: SqliteDatabase.Database;
  beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'keyward-seam-'));
    file = openSqlite(join(dir, 'keyward.db'));
    await sql`create table t (x integer)`.execute(file.db);
    other = new SqliteDatabase(join(dir, 'keyward.db'));
  });
  afterEach(async () => {
    other.close();
    await file.close();
    rmSync(dir, { recursive: true, force: true });
  });

  test("opens the file in WAL mode with full sync and SQLite's own 2 MB page cache (the kernel caches the file's pages)", () => {
    const handle = sqliteHandle(file.db)!;
    expect(handle.pragma('journal_mode', { simple: true })).toBe('wal');
    expect(handle.pragma('synchronous', { simple: true })).toBe(2);
    expect(handle.pragma('cache_size', { simple: true })).toBe(-2000);
  });

  test('waits for the write lock without blocking the event loop, reads go on meanwhile, and it writes once the lock is free', async () => {
    other.exec('begin immediate');
    let ticks = 0;
    const ticker = setInterval(() => ticks++, 10);
    const write = writeTransaction(file.db, async (trx) => {
      await sql`insert into t (x) values (1)`.execute(trx);
      return 'written';
    });
    await new Promise((resolve) => setTimeout(resolve, 300));
    // SQLite's own busy wait would have held the whole process here (better-sqlite3 is synchronous).
    expect(ticks).toBeGreaterThan(10);
    expect((await sql<{ n: number }>`select count(*) as n from t`.execute(file.db)).rows).toEqual([{ n: 0 }]);
    other.exec('commit');
    await expect(write).resolves.toBe('written');
    clearInterval(ticker);
    expect((await sql<{ n: number }>`select count(*) as n from t`.execute(file.db)).rows).toEqual([{ n: 1 }]);
  });

  test('gives up after the busy timeout with SQLITE_BUSY (a 503 for the request), having written nothing', async () => {
    other.exec('begin immediate');
    const started = Date.now();
    const error = await writeTransaction(file.db, async (trx) => sql`insert into t (x) values (1)`.execute(trx)).then(
      () => undefined,
      (err: unknown) => err,
    );
    other.exec('rollback');
    expect(isStorageUnavailable(error)).toBe(true);
    expect((error as { code?: string }).code).toBe('SQLITE_BUSY');
    expect(Date.now() - started).toBeGreaterThanOrEqual(4_500);
    expect((await sql<{ n: number }>`select count(*) as n from t`.execute(file.db)).rows).toEqual([{ n: 0 }]);
  }, 15_000);
});
