import { type Kysely, sql } from 'kysely';

// The platform's own account id on a user (issue 21): unique among users not deleted, so a deleted
// user's id can be given to a new one, as with email.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('users').addColumn('external_id', 'text').execute();
  await db.schema.createIndex('users_external_id_idx').on('users').column('external_id').unique().where(sql.ref('deleted_at'), 'is', null).execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropIndex('users_external_id_idx').execute();
  await db.schema.alterTable('users').dropColumn('external_id').execute();
}
