import { type Kysely, sql } from 'kysely';
import { idColumn, isPostgres } from './dialect';

// Operating keyward: the audit log, usage counters per day, and a credits balance per user.
export async function up(db: Kysely<any>): Promise<void> {
  // SQLite's integers are 64-bit; PostgreSQL's `integer` is 32-bit, too small for counters and balances.
  const counter = isPostgres(db) ? 'bigint' : 'integer';
  await idColumn(db, db.schema.createTable('audit_events'))
    .addColumn('at', 'text', (c) => c.notNull())
    // 'admin', 'key', 'sso', 'anonymous' or 'system'; actor_id is the filterable form ("admin:3f2a…",
    // "token:12", "sso:<subject>"); the user and token columns say whose key or identity it was.
    .addColumn('actor_type', 'text', (c) => c.notNull())
    .addColumn('actor_id', 'text', (c) => c.notNull())
    .addColumn('actor_user_id', 'integer')
    .addColumn('actor_token_id', 'integer')
    // A signed-in person's email as the proxy gave it (SSO actors only).
    .addColumn('actor_email', 'text')
    .addColumn('action', 'text', (c) => c.notNull())
    .addColumn('target_type', 'text')
    .addColumn('target_id', 'text')
    // The user the target belongs to, so one user's history is one indexed lookup.
    .addColumn('target_user_id', 'integer')
    .addColumn('ip', 'text')
    .addColumn('request_id', 'text')
    // JSON: {"field": {"old": …, "new": …}} or the event's facts. Never a secret.
    .addColumn('details', 'text')
    .execute();
  await db.schema.createIndex('audit_events_at_idx').on('audit_events').column('at').execute();
  await db.schema.createIndex('audit_events_action_idx').on('audit_events').columns(['action', 'id']).execute();
  await db.schema.createIndex('audit_events_actor_idx').on('audit_events').columns(['actor_id', 'id']).execute();
  await db.schema.createIndex('audit_events_target_idx').on('audit_events').columns(['target_type', 'target_id', 'id']).execute();
  await db.schema.createIndex('audit_events_target_user_idx').on('audit_events').columns(['target_user_id', 'id']).execute();
  await db.schema.createIndex('audit_events_actor_user_idx').on('audit_events').columns(['actor_user_id', 'id']).execute();
  // Append-only: an entry is never changed. (Deleting is left to retention pruning.)
  if (isPostgres(db)) {
    await sql`create function audit_events_append_only() returns trigger language plpgsql as $$
      begin raise exception 'the audit log is append-only'; end $$`.execute(db);
    await sql`create trigger audit_events_append_only before update on audit_events
      for each row execute function audit_events_append_only()`.execute(db);
  } else {
    await sql`create trigger audit_events_append_only before update on audit_events
      begin select raise(abort, 'the audit log is append-only'); end`.execute(db);
  }

  // One row per token (or 0 for the user as a whole) per UTC day: requests and bot time, not a row per request.
  await db.schema
    .createTable('usage_daily')
    .addColumn('day', 'text', (c) => c.notNull())
    .addColumn('user_id', 'integer', (c) => c.notNull())
    .addColumn('token_id', 'integer', (c) => c.notNull())
    .addColumn('requests', counter, (c) => c.notNull().defaultTo(0))
    .addColumn('bot_seconds', counter, (c) => c.notNull().defaultTo(0))
    .addPrimaryKeyConstraint('usage_daily_pk', ['user_id', 'day', 'token_id'])
    .execute();

  await db.schema
    .alterTable('users')
    .addColumn('credits', counter, (c) => c.notNull().defaultTo(0))
    .execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('users').dropColumn('credits').execute();
  await db.schema.dropTable('usage_daily').execute();
  await db.schema.dropTable('audit_events').execute();
  if (isPostgres(db)) await sql`drop function audit_events_append_only()`.execute(db);
}
