import { sql } from 'kysely';
import { type Db, MAX_ID } from '../../db/database';
import type { AuditEventRow } from '../../db/schema';

export interface AuditFilter {
  /** "admin", "admin_key", "key", "sso", "anonymous", "system" (every actor of that kind), "user:<id>" (by that user's keys or sign-in), or an exact actor id ("token:12", "admin:<fingerprint>", "admin_key:4", "sso:<subject>"). */
  actor?: string;
  /** An exact action, or a family ending in ".*" ("token.*"). */
  action?: string;
  /** "user:<id>", "token:<id>" or "bot:<id>". */
  target?: string;
  /** Entries by or about this user. */
  userId?: number;
  since?: string;
  until?: string;
}

const ACTOR_TYPES = new Set(['admin', 'admin_key', 'key', 'sso', 'anonymous', 'system']);

/** Newest first: `beforeId` is the last id of the previous page (0 for the first page). */
export async function listAuditEvents(db: Db, filter: AuditFilter, beforeId: number, limit: number): Promise<AuditEventRow[]> {
  let query = db.selectFrom('audit_events').selectAll();
  if (beforeId > 0) query = query.where('id', '<', beforeId);
  if (filter.actor !== undefined) {
    const byUser = /^user:(\d+)$/.exec(filter.actor);
    // An id no database could hold (PostgreSQL's ids are int4) is nobody's, not an error.
    if (byUser) query = Number(byUser[1]) <= MAX_ID ? query.where('actor_user_id', '=', Number(byUser[1])) : query.where(sql<boolean>`false`);
    else if (ACTOR_TYPES.has(filter.actor)) query = query.where('actor_type', '=', filter.actor as AuditEventRow['actor_type']);
    else query = query.where('actor_id', '=', filter.actor);
  }
  if (filter.action !== undefined) {
    if (filter.action.endsWith('.*')) query = query.where('action', '>=', filter.action.slice(0, -1)).where('action', '<', `${filter.action.slice(0, -2)}/`);
    else query = query.where('action', '=', filter.action);
  }
  if (filter.target !== undefined) {
    const [type, id] = filter.target.split(':');
    query = query.where('target_type', '=', type!).where('target_id', '=', id!);
  }
  if (filter.userId !== undefined) {
    const userId = filter.userId;
    query = query.where((eb) => eb.or([eb('target_user_id', '=', userId), eb('actor_user_id', '=', userId)]));
  }
  if (filter.since !== undefined) query = query.where('at', '>=', filter.since);
  if (filter.until !== undefined) query = query.where('at', '<', filter.until);
  return query.orderBy('id', 'desc').limit(limit + 1).execute();
}

/** Deletes up to `batch` entries older than `before`; returns how many. */
export async function pruneAuditEvents(db: Db, before: string, batch: number): Promise<number> {
  const result = await db
    .deleteFrom('audit_events')
    .where('id', 'in', (eb) => eb.selectFrom('audit_events').select('id').where('at', '<', before).orderBy('id').limit(batch))
    .executeTakeFirst();
  return Number(result.numDeletedRows);
}
