import { type Kysely, sql } from 'kysely';
import { idColumn } from './dialect';

// Named, scoped admin keys (issue 18), stored as user tokens are: the selector in plain text, the
// secret only as a bcrypt hash. The audit log names the key that made each change by its name too.
export async function up(db: Kysely<any>): Promise<void> {
  await idColumn(db, db.schema.createTable('admin_keys'))
    .addColumn('name', 'text', (c) => c.notNull())
    .addColumn('selector', 'text', (c) => c.notNull().unique())
    .addColumn('secret_hash', 'text', (c) => c.notNull())
    .addColumn('last4', 'text', (c) => c.notNull())
    // Space-separated admin scopes (src/admin-keys/admin-scopes.ts).
    .addColumn('scopes', 'text', (c) => c.notNull())
    // JSON array of addresses and CIDR ranges the key may be used from; NULL means anywhere.
    .addColumn('allowed_ips', 'text')
    .addColumn('created_at', 'text', (c) => c.notNull())
    .addColumn('expires_at', 'text')
    .addColumn('revoked_at', 'text')
    // The actor that minted it, as the audit log spells actors ("admin:3f2a…", "admin_key:4", "sso:…").
    .addColumn('created_by', 'text', (c) => c.notNull())
    .addColumn('last_used_at', 'text')
    .addColumn('last_used_ip', 'text')
    .execute();
  // A name is unique among keys not revoked: in both databases a partial unique index.
  await db.schema.createIndex('admin_keys_active_name_idx').on('admin_keys').column('name').unique().where(sql.ref('revoked_at'), 'is', null).execute();
  await db.schema.alterTable('audit_events').addColumn('actor_name', 'text').execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('audit_events').dropColumn('actor_name').execute();
  await db.schema.dropTable('admin_keys').execute();
}
