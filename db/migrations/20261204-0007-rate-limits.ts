import type { Kysely } from 'kysely';
import { isPostgres } from './dialect';

// Shared rate-limit counters (issue 20) for RATE_LIMIT_STORE=postgres: the table rate-limiter-flexible's
// RateLimiterPostgres counts in, in its layout (key, points, expire in epoch ms). PostgreSQL only: a
// SQLite file serves one instance, whose rate limits count in its memory.
export async function up(db: Kysely<any>): Promise<void> {
  if (!isPostgres(db)) return;
  await db.schema
    .createTable('rate_limits')
    .addColumn('key', 'varchar(255)', (c) => c.primaryKey())
    .addColumn('points', 'integer', (c) => c.notNull().defaultTo(0))
    .addColumn('expire', 'bigint')
    .execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  if (!isPostgres(db)) return;
  await db.schema.dropTable('rate_limits').execute();
}
