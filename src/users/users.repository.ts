import { sql } from 'kysely';
import type { Db } from '../../db/database';
import type { NewUserRow, UserRow, UserUpdate } from '../../db/schema';
import type { PageRequest } from '../http/pagination';

// Deleted users stay in the table (their tokens keep answering API_KEY_REVOKED) but are invisible here.

export async function insertUser(db: Db, row: NewUserRow): Promise<UserRow> {
  return db.insertInto('users').values(row).returningAll().executeTakeFirstOrThrow();
}

export async function findUserById(db: Db, id: number): Promise<UserRow | undefined> {
  return db.selectFrom('users').selectAll().where('id', '=', id).where('deleted_at', 'is', null).executeTakeFirst();
}

export async function findUserByEmail(db: Db, emailLower: string): Promise<UserRow | undefined> {
  return db.selectFrom('users').selectAll().where('email_lower', '=', emailLower).executeTakeFirst();
}

export interface UserFilter {
  /** Part of the email, any case. */
  emailContains?: string;
  /** Exactly this external id. */
  externalId?: string;
}

export async function findUserByExternalId(db: Db, externalId: string): Promise<UserRow | undefined> {
  return db.selectFrom('users').selectAll().where('external_id', '=', externalId).where('deleted_at', 'is', null).executeTakeFirst();
}

export async function listUsers(db: Db, page: PageRequest, { emailContains, externalId }: UserFilter = {}): Promise<UserRow[]> {
  let query = db
    .selectFrom('users')
    .selectAll()
    .where('deleted_at', 'is', null)
    .where('id', '>', page.afterId)
    .orderBy('id')
    .limit(page.limit + 1);
  if (emailContains !== undefined) {
    const pattern = `%${emailContains.toLowerCase().replace(/[\\%_]/g, (c) => `\\${c}`)}%`;
    query = query.where(sql<boolean>`email_lower like ${pattern} escape '\\'`);
  }
  if (externalId !== undefined) query = query.where('external_id', '=', externalId);
  return query.execute();
}

export async function updateUser(db: Db, id: number, patch: UserUpdate): Promise<UserRow | undefined> {
  return db
    .updateTable('users')
    .set(patch)
    .where('id', '=', id)
    .where('deleted_at', 'is', null)
    .returningAll()
    .executeTakeFirst();
}

/** Frees the email and the SSO subject for reuse; the row stays so the user's revoked tokens still say "revoked". */
export async function markUserDeleted(db: Db, id: number, now: string): Promise<boolean> {
  const result = await db
    .updateTable('users')
    .set({ deleted_at: now, updated_at: now, email_lower: null, sso_subject: null })
    .where('id', '=', id)
    .where('deleted_at', 'is', null)
    .executeTakeFirst();
  return result.numUpdatedRows > 0n;
}

export async function findUserBySsoSubject(db: Db, subject: string): Promise<UserRow | undefined> {
  return db.selectFrom('users').selectAll().where('sso_subject', '=', subject).where('deleted_at', 'is', null).executeTakeFirst();
}

/** Links a subject to a user that has none yet; undefined if the user changed meanwhile. */
export async function linkSsoSubject(db: Db, id: number, subject: string, now: string): Promise<UserRow | undefined> {
  return db
    .updateTable('users')
    .set({ sso_subject: subject, updated_at: now })
    .where('id', '=', id)
    .where('sso_subject', 'is', null)
    .where('deleted_at', 'is', null)
    .returningAll()
    .executeTakeFirst();
}
