import type { Kysely } from 'kysely';

// The identity a signed-in person has at the company's identity provider (oauth2-proxy's user header),
// linked to at most one keyward user.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('users').addColumn('sso_subject', 'text').execute();
  // SQLite cannot add a UNIQUE column; a unique index does the same (NULLs stay distinct).
  await db.schema.createIndex('users_sso_subject_idx').on('users').column('sso_subject').unique().execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropIndex('users_sso_subject_idx').execute();
  await db.schema.alterTable('users').dropColumn('sso_subject').execute();
}
