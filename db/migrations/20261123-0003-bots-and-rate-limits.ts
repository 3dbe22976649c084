import { type Kysely, sql } from 'kysely';
import { idColumn } from './dialect';

// Bots (leases on a user's concurrency slots) and the per-user rate limit. Users that exist before
// this migration get the default rate limit of 600 requests a minute.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema
    .alterTable('users')
    .addColumn('rate_limit_per_minute', 'integer', (c) => c.notNull().defaultTo(600))
    .execute();

  await idColumn(db, db.schema.createTable('bots'))
    .addColumn('user_id', 'integer', (c) => c.notNull().references('users.id'))
    .addColumn('token_id', 'integer', (c) => c.references('tokens.id'))
    .addColumn('platform', 'text')
    .addColumn('native_meeting_id', 'text')
    .addColumn('label', 'text')
    .addColumn('metadata', 'text')
    .addColumn('status', 'text', (c) => c.notNull())
    .addColumn('ttl_seconds', 'integer', (c) => c.notNull())
    .addColumn('created_at', 'text', (c) => c.notNull())
    .addColumn('heartbeat_at', 'text', (c) => c.notNull())
    .addColumn('expires_at', 'text', (c) => c.notNull())
    .addColumn('ended_at', 'text')
    .addColumn('ended_by', 'text')
    .execute();

  // Admission counts a user's active leases; listings walk them by id.
  await db.schema.createIndex('bots_user_status_idx').on('bots').columns(['user_id', 'status', 'expires_at']).execute();
  await db.schema.createIndex('bots_status_ended_idx').on('bots').columns(['status', 'ended_at']).execute();
  // One active bot per meeting per user, enforced by the database itself (NULL platform counts as one).
  await sql`create unique index bots_active_meeting_idx on bots (user_id, coalesce(platform, ''), native_meeting_id)
    where status = 'active' and native_meeting_id is not null`.execute(db);
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.dropTable('bots').execute();
  await db.schema.alterTable('users').dropColumn('rate_limit_per_minute').execute();
}
