import type { Kysely } from 'kysely';

// A rate limit per key (issue 21), besides the user's: NULL means the user's limit only.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('tokens').addColumn('rate_limit_per_minute', 'integer').execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('tokens').dropColumn('rate_limit_per_minute').execute();
}
