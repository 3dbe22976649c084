import type { Kysely } from 'kysely';

// Metadata on a key (issue 21): a small JSON object the admin sets, which forward auth hands to the
// upstream with every request the key makes. JSON text, at most 1 KiB.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('tokens').addColumn('metadata', 'text').execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('tokens').dropColumn('metadata').execute();
}
