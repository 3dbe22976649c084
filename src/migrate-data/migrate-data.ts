import { existsSync } from 'node:fs';
import SqliteDatabase from 'better-sqlite3';
import { sql } from 'kysely';
import { migrateToLatest, openPostgres, type Db } from '../../db/database';
import { LATEST_MIGRATION } from '../../db/migrations';

/** An expected failure: the message is one line for the operator. */
export class MigrateDataError extends Error {
  override readonly name = 'MigrateDataError';
}

/** In the order foreign keys need them. Every table keyward keeps; ids are kept as they are. */
const TABLES = ['users', 'tokens', 'bots', 'audit_events', 'usage_daily'] as const;
const BATCH = 500;

export interface MigrateDataResult {
  rows: Record<(typeof TABLES)[number], number>;
  schemaVersion: string;
}

/** The text of a value as both databases give it back, for the row-by-row check. */
const canonical = (row: Record<string, unknown>, columns: string[]) =>
  JSON.stringify(columns.map((c) => (row[c] === null || row[c] === undefined ? null : typeof row[c] === 'number' || typeof row[c] === 'bigint' ? Number(row[c]) : String(row[c]))));

/**
 * Copies a SQLite deployment into an empty PostgreSQL database, in one PostgreSQL transaction, then
 * reads both back and compares every row. The SQLite file is opened read-only and never changed; a
 * target that already holds keyward data is refused.
 */
export async function migrateData(fromPath: string, toUrl: string): Promise<MigrateDataResult> {
  if (!existsSync(fromPath)) throw new MigrateDataError(`no SQLite database at ${fromPath}`);
  let source: SqliteDatabase.Database;
  try {
    source = new SqliteDatabase(fromPath, { readonly: true, fileMustExist: true });
    source.pragma('schema_version');
  } catch (err) {
    throw new MigrateDataError(`${fromPath} is not a SQLite database (${err instanceof Error ? err.message : String(err)})`);
  }
  const target = openPostgres(toUrl, { poolSize: 2 });
  try {
    const version = sourceVersion(source, fromPath);
    try {
      await migrateToLatest(target.db);
    } catch (err) {
      throw new MigrateDataError(`cannot reach or prepare the PostgreSQL database: ${err instanceof Error ? err.message : String(err)}`);
    }
    for (const table of TABLES) {
      const { n } = (await sql<{ n: number }>`select count(*)::int as n from ${sql.table(table)}`.execute(target.db)).rows[0]!;
      if (n > 0) throw new MigrateDataError(`the PostgreSQL database already holds keyward data (${n} rows in ${table}); migrate into an empty one`);
    }

    const rows = {} as MigrateDataResult['rows'];
    await target.db.transaction().execute(async (trx) => {
      for (const table of TABLES) rows[table] = await copyTable(source, trx, table);
      // Ids were copied as they are: each id sequence continues after the highest one.
      for (const table of ['users', 'tokens', 'bots', 'audit_events'] as const) {
        await sql`select setval(pg_get_serial_sequence(${table}, 'id'), coalesce((select max(id) from ${sql.table(table)}), 1), (select count(*) > 0 from ${sql.table(table)}))`.execute(trx);
      }
    });

    for (const table of TABLES) await verifyTable(source, target.db, table);
    return { rows, schemaVersion: version };
  } finally {
    source.close();
    await target.close();
  }
}

function sourceVersion(source: SqliteDatabase.Database, fromPath: string): string {
  let names: string[];
  try {
    names = (source.prepare('select name from kysely_migration order by name').all() as Array<{ name: string }>).map((r) => r.name);
  } catch {
    throw new MigrateDataError(`${fromPath} is not a keyward database (it has no migration table)`);
  }
  const version = names.at(-1) ?? '';
  if (version !== LATEST_MIGRATION) {
    throw new MigrateDataError(
      version > LATEST_MIGRATION
        ? `${fromPath} comes from a newer keyward (schema ${version}); migrate with that version`
        : `${fromPath} has schema ${version}, older than this keyward's ${LATEST_MIGRATION}: start this keyward on it once (it upgrades the file), stop it, then migrate`,
    );
  }
  return version;
}

async function copyTable(source: SqliteDatabase.Database, trx: Db, table: (typeof TABLES)[number]): Promise<number> {
  const all = source.prepare(`select * from ${table} order by rowid`).all() as Array<Record<string, unknown>>;
  // A token may point at its successor, which comes later: links are set once every token exists.
  const links: Array<{ id: number; rotated_to: number }> = [];
  for (let i = 0; i < all.length; i += BATCH) {
    const batch = all.slice(i, i + BATCH).map((row) => {
      if (table === 'tokens' && row.rotated_to !== null) {
        links.push({ id: row.id as number, rotated_to: row.rotated_to as number });
        return { ...row, rotated_to: null };
      }
      return row;
    });
    await trx.insertInto(table).values(batch as never).execute();
  }
  for (const link of links) await trx.updateTable('tokens').set({ rotated_to: link.rotated_to }).where('id', '=', link.id).execute();
  return all.length;
}

async function verifyTable(source: SqliteDatabase.Database, target: Db, table: (typeof TABLES)[number]): Promise<void> {
  const key = table === 'usage_daily' ? 'user_id, day, token_id' : 'id';
  const from = source.prepare(`select * from ${table} order by ${key}`).all() as Array<Record<string, unknown>>;
  const to = (await sql<Record<string, unknown>>`select * from ${sql.table(table)} order by ${sql.raw(key)}`.execute(target)).rows;
  const columns = from[0] ? Object.keys(from[0]) : [];
  if (from.length !== to.length) throw new MigrateDataError(`check failed: ${table} has ${from.length} rows in SQLite and ${to.length} in PostgreSQL`);
  for (let i = 0; i < from.length; i++) {
    if (canonical(from[i]!, columns) !== canonical(to[i]!, columns)) {
      throw new MigrateDataError(`check failed: row ${i + 1} of ${table} differs between SQLite and PostgreSQL`);
    }
  }
}
