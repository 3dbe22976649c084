import { type Db, isUniqueViolation, lockUserForUpdate, writeTransaction } from '../../db/database';
import type { BotRow, BotStatus } from '../../db/schema';
import { type AuditContext, recordAudit } from '../audit/audit';
import type { Clock } from '../clock';
import { foldBotTime } from '../usage/usage';
import { AppError, conflict, notFound } from '../http/errors';
import { boundedJson } from '../http/json-limits';
import type { Logger } from '../logger';
import { type Page, type PageRequest, toPage } from '../http/pagination';
import * as bots from './bots.repository';
import type { BotFilter } from './bots.repository';

export const DEFAULT_TTL_SECONDS = 300;
export const MAX_METADATA_BYTES = 4 * 1024;
export const MAX_METADATA_DEPTH = 8;
/** How often run-out leases are marked and old finished bots deleted. */
export const SWEEP_INTERVAL_MS = 60_000;

export interface BotResponse {
  id: number;
  user_id: number;
  token_id: number | null;
  platform: string | null;
  native_meeting_id: string | null;
  label: string | null;
  metadata: Record<string, unknown> | null;
  status: BotStatus;
  ttl_seconds: number;
  created_at: string;
  heartbeat_at: string;
  expires_at: string;
  ended_at: string | null;
  ended_by: 'user' | 'admin' | 'expiry' | null;
}

export interface AcquireInput {
  platform?: string;
  native_meeting_id?: string;
  label?: string;
  ttl_seconds?: number;
  metadata?: Record<string, unknown> | null;
}

/** Who acts on a bot: the admin acts on anyone's, a user only on their own. */
export type Actor = { kind: 'admin' } | { kind: 'user'; userId: number };

export interface Concurrency {
  limit: number;
  active: number;
}

/** An active row whose lease ran out is expired, whether or not the sweep has marked it yet. */
export function toBotResponse(row: BotRow, now: string): BotResponse {
  const ranOut = row.status === 'active' && row.expires_at <= now;
  return {
    id: row.id,
    user_id: row.user_id,
    token_id: row.token_id,
    platform: row.platform,
    native_meeting_id: row.native_meeting_id,
    label: row.label,
    metadata: row.metadata === null ? null : (JSON.parse(row.metadata) as Record<string, unknown>),
    status: ranOut ? 'expired' : row.status,
    ttl_seconds: row.ttl_seconds,
    created_at: row.created_at,
    heartbeat_at: row.heartbeat_at,
    expires_at: row.expires_at,
    ended_at: ranOut ? row.expires_at : row.ended_at,
    ended_by: ranOut ? 'expiry' : row.ended_by,
  };
}

/**
 * Bots are leases on a user's `max_concurrent_bots` slots. Admission (mark the user's run-out leases,
 * count the active ones, insert) is one write transaction, which SQLite runs one at a time even across
 * processes: the limit holds exactly, whatever arrives at once. A lease that is not renewed runs out
 * and frees its slot, so a crashed runner cannot hold slots forever.
 */
export class BotsService {
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly deps: { db: Db; clock: Clock; logger: Logger; retentionSeconds: number; creditsPerBot: number }) {}

  private now(): string {
    return this.deps.clock.now().toISOString();
  }

  async acquire(userId: number, tokenId: number, input: AcquireInput): Promise<BotResponse> {
    const { db, clock } = this.deps;
    const metadata = boundedJson('metadata', input.metadata, { maxBytes: MAX_METADATA_BYTES, maxDepth: MAX_METADATA_DEPTH });
    const ttl = input.ttl_seconds ?? DEFAULT_TTL_SECONDS;
    try {
      const row = await writeTransaction(db, async (trx) => {
        // Instances sharing a PostgreSQL database take turns per user here; SQLite's transaction already does.
        await lockUserForUpdate(trx, userId);
        const now = clock.now();
        const nowIso = now.toISOString();
        await bots.expireLeasesOfUser(trx, userId, nowIso);
        // The meeting first: a runner asking again for a meeting it already has needs to hear 409 and
        // the bot's id, not a 429 it would retry for as long as that bot runs.
        if (input.native_meeting_id !== undefined) {
          const existing = await bots.findActiveForMeeting(trx, userId, input.platform ?? null, input.native_meeting_id, nowIso);
          if (existing) throw meetingTaken(existing.id);
        }
        // The limit and balance are read inside the transaction: an admin's change is seen at once.
        const user = await trx.selectFrom('users').select(['max_concurrent_bots', 'credits']).where('id', '=', userId).executeTakeFirst();
        const limit = user?.max_concurrent_bots ?? 0;
        const active = await bots.countActiveLeases(trx, userId, nowIso);
        if (active >= limit) {
          // A slot frees up when enough leases have ended to bring the count below the limit.
          const freesAt = limit === 0 ? null : await bots.nthLeaseExpiry(trx, userId, nowIso, active - limit);
          throw limitExceeded(limit, active, freesAt, now);
        }
        // Spent only once admission is certain, in the same transaction: a refused start costs nothing.
        const cost = this.deps.creditsPerBot;
        if (cost > 0) {
          const credits = user?.credits ?? 0;
          if (credits < cost) {
            throw new AppError(402, 'INSUFFICIENT_CREDITS', `Starting a bot costs ${cost} credits and this user has ${credits}; ask the admin for more.`, { credits, required: cost });
          }
          await trx.updateTable('users').set({ credits: credits - cost }).where('id', '=', userId).execute();
        }
        return bots.insertBot(trx, {
          user_id: userId,
          token_id: tokenId,
          platform: input.platform ?? null,
          native_meeting_id: input.native_meeting_id ?? null,
          label: input.label ?? null,
          metadata,
          status: 'active',
          ttl_seconds: ttl,
          created_at: nowIso,
          heartbeat_at: nowIso,
          expires_at: new Date(now.getTime() + ttl * 1000).toISOString(),
          ended_at: null,
          ended_by: null,
        });
      });
      return toBotResponse(row, row.created_at);
    } catch (err) {
      if (!isUniqueViolation(err) || input.native_meeting_id === undefined) throw err;
      // The unique index is the backstop (the check above runs in the same transaction, so this
      // should not happen); the answer is the same.
      const existing = await bots.findActiveForMeeting(db, userId, input.platform ?? null, input.native_meeting_id, this.now());
      throw meetingTaken(existing?.id ?? null);
    }
  }

  /** Renews an active lease for `ttl_seconds` (default: its own) from now. */
  async heartbeat(id: number, actor: Actor, ttlSeconds: number | undefined): Promise<BotResponse> {
    const current = await this.find(id, actor);
    const now = this.deps.clock.now();
    const ttl = ttlSeconds ?? current.ttl_seconds;
    const row = await bots.extendLease(this.deps.db, id, current.user_id, now.toISOString(), new Date(now.getTime() + ttl * 1000).toISOString(), ttl);
    if (!row) {
      const status = toBotResponse((await bots.findBot(this.deps.db, id)) ?? current, now.toISOString()).status;
      throw conflict(`This bot's lease has ${status === 'released' ? 'been released' : 'expired'}; acquire a new one.`, { status });
    }
    return toBotResponse(row, now.toISOString());
  }

  /** Idempotent: releasing a finished lease again is not an error, so a runner can simply retry. */
  async release(id: number, actor: Actor, audit: AuditContext): Promise<void> {
    const row = await this.find(id, actor);
    const now = this.now();
    if (actor.kind === 'user') {
      await bots.endLease(this.deps.db, id, now, 'user');
      return;
    }
    // An admin ending someone's bot is an audited event; releasing a finished one again is not.
    await writeTransaction(this.deps.db, async (trx) => {
      if (!(await bots.endLease(trx, id, now, 'admin'))) return;
      await recordAudit(trx, audit, now, {
        action: 'bot.force_released',
        target: { type: 'bot', id, userId: row.user_id },
        details: { platform: row.platform, native_meeting_id: row.native_meeting_id, label: row.label, token_id: row.token_id, created_at: row.created_at },
      });
    });
  }

  async get(id: number, actor: Actor): Promise<BotResponse> {
    return toBotResponse(await this.find(id, actor), this.now());
  }

  async list(filter: BotFilter, page: PageRequest): Promise<Page<BotResponse>> {
    const now = this.now();
    return toPage(await bots.listBots(this.deps.db, filter, page, now), page, (row) => toBotResponse(row, now));
  }

  async concurrency(user: { id: number; maxConcurrentBots: number }): Promise<Concurrency> {
    return { limit: user.maxConcurrentBots, active: await bots.countActiveLeases(this.deps.db, user.id, this.now()) };
  }

  async activeTotal(): Promise<number> {
    return bots.countAllActiveLeases(this.deps.db, this.now());
  }

  async activeCounts(userIds: number[]): Promise<Map<number, number>> {
    return bots.activeCounts(this.deps.db, userIds, this.now());
  }

  /** Another user's bot is 404, exactly like one that does not exist. */
  private async find(id: number, actor: Actor): Promise<BotRow> {
    const row = await bots.findBot(this.deps.db, id);
    if (!row || (actor.kind === 'user' && row.user_id !== actor.userId)) throw notFound('Bot');
    return row;
  }

  /** Marks run-out leases and deletes bots finished longer than BOT_RETENTION ago, keeping their minutes in the usage totals. */
  async sweep(): Promise<void> {
    const now = this.deps.clock.now();
    const finishedBefore = new Date(now.getTime() - this.deps.retentionSeconds * 1000).toISOString();
    await writeTransaction(this.deps.db, async (trx) => {
      const old = await bots.sweepBots(trx, now.toISOString(), finishedBefore);
      if (old.length === 0) return;
      await foldBotTime(trx, old, now.getTime());
      await bots.deleteBots(trx, old.map((b) => b.id));
    });
  }

  start(intervalMs = SWEEP_INTERVAL_MS): void {
    if (this.timer) return;
    this.timer = setInterval(() => {
      this.sweep().catch((err: unknown) => this.deps.logger.warn({ err }, 'bot sweep failed; will retry'));
    }, intervalMs);
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }
}

const meetingTaken = (existingId: number | null) =>
  conflict('A bot is already active for this meeting; release it or wait for its lease to end.', { existing_id: existingId });

/**
 * Always 429, whatever the timing: the caller may retry once a slot frees up, which is at the latest
 * when enough active leases have run out (Retry-After; the earliest one when the user is exactly at
 * the limit). With a limit of 0 no slot ever frees up; Retry-After then says a minute and the message
 * says why.
 */
function limitExceeded(limit: number, active: number, freesAt: string | null, now: Date): AppError {
  const retryAfter = freesAt === null ? 60 : Math.max(1, Math.ceil((Date.parse(freesAt) - now.getTime()) / 1000));
  const message =
    limit === 0
      ? 'This user may not run bots (max_concurrent_bots is 0); ask the admin to raise the limit.'
      : `This user already runs ${active} of ${limit} bots; release one or wait for a lease to end.`;
  return new AppError(429, 'CONCURRENCY_LIMIT_EXCEEDED', message, { limit, active }, { 'Retry-After': String(retryAfter) });
}
