import type { Db } from '../../db/database';
import type { BotRow, BotStatus, NewBotRow } from '../../db/schema';
import type { PageRequest } from '../http/pagination';

// A lease is active while its row says 'active' and its expires_at is still ahead. Rows whose lease
// ran out are marked 'expired' when their user next asks for a slot, and by the periodic sweep; every
// query below applies the time itself, so nothing depends on the sweep having run.

export async function insertBot(db: Db, row: NewBotRow): Promise<BotRow> {
  return db.insertInto('bots').values(row).returningAll().executeTakeFirstOrThrow();
}

export async function findBot(db: Db, id: number): Promise<BotRow | undefined> {
  return db.selectFrom('bots').selectAll().where('id', '=', id).executeTakeFirst();
}

/** Marks a user's run-out leases expired (as of when they ran out). */
export async function expireLeasesOfUser(db: Db, userId: number, now: string): Promise<void> {
  await db
    .updateTable('bots')
    .set((eb) => ({ status: 'expired', ended_at: eb.ref('expires_at'), ended_by: 'expiry' }))
    .where('user_id', '=', userId)
    .where('status', '=', 'active')
    .where('expires_at', '<=', now)
    .execute();
}

export async function countActiveLeases(db: Db, userId: number, now: string): Promise<number> {
  const row = await db
    .selectFrom('bots')
    .select((eb) => eb.fn.countAll<number>().as('active'))
    .where('user_id', '=', userId)
    .where('status', '=', 'active')
    .where('expires_at', '>', now)
    .executeTakeFirstOrThrow();
  return Number(row.active);
}

/** When the (n+1)-th earliest of a user's active leases runs out (n = 0: the first), if there is one. */
export async function nthLeaseExpiry(db: Db, userId: number, now: string, n: number): Promise<string | null> {
  const row = await db
    .selectFrom('bots')
    .select('expires_at')
    .where('user_id', '=', userId)
    .where('status', '=', 'active')
    .where('expires_at', '>', now)
    .orderBy('expires_at')
    .limit(1)
    .offset(n)
    .executeTakeFirst();
  return row?.expires_at ?? null;
}

/** Active lease counts of several users at once (user listings). */
export async function countAllActiveLeases(db: Db, now: string): Promise<number> {
  const row = await db.selectFrom('bots').select((eb) => eb.fn.countAll<number>().as('n')).where('status', '=', 'active').where('expires_at', '>', now).executeTakeFirst();
  return Number(row?.n ?? 0);
}

export async function activeCounts(db: Db, userIds: number[], now: string): Promise<Map<number, number>> {
  if (userIds.length === 0) return new Map();
  const rows = await db
    .selectFrom('bots')
    .select((eb) => ['user_id', eb.fn.countAll<number>().as('active')])
    .where('user_id', 'in', userIds)
    .where('status', '=', 'active')
    .where('expires_at', '>', now)
    .groupBy('user_id')
    .execute();
  return new Map(rows.map((r) => [r.user_id, Number(r.active)]));
}

export async function findActiveForMeeting(
  db: Db,
  userId: number,
  platform: string | null,
  nativeMeetingId: string,
  now: string,
): Promise<BotRow | undefined> {
  let query = db
    .selectFrom('bots')
    .selectAll()
    .where('user_id', '=', userId)
    .where('native_meeting_id', '=', nativeMeetingId)
    .where('status', '=', 'active')
    .where('expires_at', '>', now);
  query = platform === null ? query.where('platform', 'is', null) : query.where('platform', '=', platform);
  return query.executeTakeFirst();
}

/** Extends an active lease; undefined when it is not (or no longer) active. */
export async function extendLease(db: Db, id: number, userId: number | undefined, now: string, expiresAt: string, ttlSeconds: number): Promise<BotRow | undefined> {
  let query = db
    .updateTable('bots')
    .set({ heartbeat_at: now, expires_at: expiresAt, ttl_seconds: ttlSeconds })
    .where('id', '=', id)
    .where('status', '=', 'active')
    .where('expires_at', '>', now);
  if (userId !== undefined) query = query.where('user_id', '=', userId);
  return query.returningAll().executeTakeFirst();
}

/** Ends an active lease; false when it was not active. */
export async function endLease(db: Db, id: number, now: string, by: 'user' | 'admin'): Promise<boolean> {
  const result = await db
    .updateTable('bots')
    .set({ status: 'released', ended_at: now, ended_by: by })
    .where('id', '=', id)
    .where('status', '=', 'active')
    .where('expires_at', '>', now)
    .executeTakeFirst();
  return result.numUpdatedRows > 0n;
}

/**
 * Releases every active lease of a user (the user is being deleted). Leases that already ran out are
 * marked expired first, so their history says how they really ended.
 */
/** Returns how many were still running. */
export async function endLeasesOfUser(db: Db, userId: number, now: string): Promise<number> {
  await expireLeasesOfUser(db, userId, now);
  const result = await db
    .updateTable('bots')
    .set({ status: 'released', ended_at: now, ended_by: 'admin' })
    .where('user_id', '=', userId)
    .where('status', '=', 'active')
    .where('expires_at', '>', now)
    .executeTakeFirst();
  return Number(result.numUpdatedRows);
}

export interface BotFilter {
  userId?: number;
  status?: BotStatus;
}

export async function listBots(db: Db, filter: BotFilter, page: PageRequest, now: string): Promise<BotRow[]> {
  let query = db.selectFrom('bots').selectAll().where('id', '>', page.afterId);
  if (filter.userId !== undefined) query = query.where('user_id', '=', filter.userId);
  if (filter.status === 'active') query = query.where('status', '=', 'active').where('expires_at', '>', now);
  if (filter.status === 'released') query = query.where('status', '=', 'released');
  if (filter.status === 'expired') {
    query = query.where((eb) => eb.or([eb('status', '=', 'expired'), eb.and([eb('status', '=', 'active'), eb('expires_at', '<=', now)])]));
  }
  return query.orderBy('id').limit(page.limit + 1).execute();
}

/** The periodic sweep: mark run-out leases; returns the finished ones older than the retention. */
export async function sweepBots(db: Db, now: string, finishedBefore: string): Promise<BotRow[]> {
  await db
    .updateTable('bots')
    .set((eb) => ({ status: 'expired', ended_at: eb.ref('expires_at'), ended_by: 'expiry' }))
    .where('status', '=', 'active')
    .where('expires_at', '<=', now)
    .execute();
  return db.selectFrom('bots').selectAll().where('status', '!=', 'active').where('ended_at', '<', finishedBefore).execute();
}

export async function deleteBots(db: Db, ids: number[]): Promise<void> {
  // In chunks: SQLite limits how many values one statement binds.
  for (let i = 0; i < ids.length; i += 500) await db.deleteFrom('bots').where('id', 'in', ids.slice(i, i + 500)).execute();
}
