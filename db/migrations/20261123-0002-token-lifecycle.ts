import type { Kysely } from 'kysely';

// Token lifecycle (issue 4): IP allowlists, rotation links and last use. All nullable, so existing
// rows stay valid: no allowlist, never rotated, never used since the upgrade.
export async function up(db: Kysely<any>): Promise<void> {
  await db.schema.alterTable('tokens').addColumn('allowed_ips', 'text').execute();
  await db.schema.alterTable('tokens').addColumn('rotated_from', 'integer', (c) => c.references('tokens.id')).execute();
  await db.schema.alterTable('tokens').addColumn('rotated_to', 'integer', (c) => c.references('tokens.id')).execute();
  await db.schema.alterTable('tokens').addColumn('last_used_at', 'text').execute();
  await db.schema.alterTable('tokens').addColumn('last_used_ip', 'text').execute();
}

export async function down(db: Kysely<any>): Promise<void> {
  for (const column of ['last_used_ip', 'last_used_at', 'rotated_to', 'rotated_from', 'allowed_ips']) {
    await db.schema.alterTable('tokens').dropColumn(column).execute();
  }
}
