import { type Db, hotRead } from '../../db/database';
import type { AdminKeyRow } from '../../db/schema';
import type { PageRequest } from '../http/pagination';

/** Every column except the secret's hash: what listings and responses are made from. */
export type AdminKeyMetadataRow = Omit<AdminKeyRow, 'secret_hash'>;

const METADATA_COLUMNS = [
  'id',
  'name',
  'selector',
  'last4',
  'scopes',
  'allowed_ips',
  'created_at',
  'expires_at',
  'revoked_at',
  'created_by',
  'last_used_at',
  'last_used_ip',
] as const;

export async function insertAdminKey(db: Db, row: Omit<AdminKeyRow, 'id' | 'revoked_at' | 'last_used_at' | 'last_used_ip'>): Promise<AdminKeyMetadataRow> {
  return db.insertInto('admin_keys').values(row).returning(METADATA_COLUMNS).executeTakeFirstOrThrow();
}

export async function findAdminKeyById(db: Db, id: number): Promise<AdminKeyMetadataRow | undefined> {
  return db.selectFrom('admin_keys').select(METADATA_COLUMNS).where('id', '=', id).executeTakeFirst();
}

export async function listAdminKeys(db: Db, page: PageRequest): Promise<AdminKeyMetadataRow[]> {
  return db.selectFrom('admin_keys').select(METADATA_COLUMNS).where('id', '>', page.afterId).orderBy('id').limit(page.limit + 1).execute();
}

/** Neither revoked nor expired: what MAX_ADMIN_KEYS counts. */
export async function countActiveAdminKeys(db: Db, now: string): Promise<number> {
  const row = await db
    .selectFrom('admin_keys')
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .where('revoked_at', 'is', null)
    .where((eb) => eb.or([eb('expires_at', 'is', null), eb('expires_at', '>', now)]))
    .executeTakeFirstOrThrow();
  return Number(row.n);
}

/**
 * An expired key that nobody revoked still holds its name under the unique index of names not
 * revoked: it is recorded as revoked at the moment it expired, which is when it stopped working.
 */
export async function retireExpiredByName(db: Db, name: string, now: string): Promise<void> {
  await db
    .updateTable('admin_keys')
    .set((eb) => ({ revoked_at: eb.ref('expires_at') }))
    .where('name', '=', name)
    .where('revoked_at', 'is', null)
    .where('expires_at', '<=', now)
    .execute();
}

/** Whether a key not revoked holds this name (the unique index's rule). */
export async function nameIsTaken(db: Db, name: string): Promise<boolean> {
  return (await db.selectFrom('admin_keys').select('id').where('name', '=', name).where('revoked_at', 'is', null).executeTakeFirst()) !== undefined;
}

/** Whether this call revoked it (false: it already was). */
export async function revokeAdminKey(db: Db, id: number, now: string): Promise<boolean> {
  const result = await db.updateTable('admin_keys').set({ revoked_at: now }).where('id', '=', id).where('revoked_at', 'is', null).executeTakeFirst();
  return Number(result.numUpdatedRows) > 0;
}

/** What verifying a request with an admin key needs, by selector; read on every request. */
export type AdminKeyCredentialRow = Pick<AdminKeyRow, 'id' | 'name' | 'secret_hash' | 'scopes' | 'allowed_ips' | 'expires_at' | 'revoked_at'>;

const compiledLookups = new WeakMap<Db, (parameters: readonly unknown[]) => Promise<AdminKeyCredentialRow | undefined>>();

export function findAdminKeyBySelector(db: Db, selector: string): Promise<AdminKeyCredentialRow | undefined> {
  let lookup = compiledLookups.get(db);
  if (lookup === undefined) {
    const compiled = db
      .selectFrom('admin_keys')
      .select(['id', 'name', 'secret_hash', 'scopes', 'allowed_ips', 'expires_at', 'revoked_at'])
      .where('selector', '=', selector)
      .compile();
    lookup = hotRead<AdminKeyCredentialRow>(db, compiled);
    compiledLookups.set(db, lookup);
  }
  return lookup([selector]);
}
