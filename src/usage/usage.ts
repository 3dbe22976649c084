import { type Db, readSnapshot, writeEach } from '../../db/database';
import type { BotRow } from '../../db/schema';
import type { Clock } from '../clock';
import { validationError } from '../http/errors';
import { PeriodicFlush } from '../periodic-flush';
import type { Logger } from '../logger';

/** How often counted requests are written; also the most a crash can lose. */
export const USAGE_FLUSH_MS = 5_000;
const DAY_MS = 86_400_000;
/** Rows of the user as a whole (bot time) rather than of one of their tokens. */
const WHOLE_USER = 0;

const dayOf = (ms: number) => new Date(ms).toISOString().slice(0, 10);

/** Seconds of [start, end) falling on each UTC day. */
export function secondsByDay(startMs: number, endMs: number): Map<string, number> {
  const out = new Map<string, number>();
  for (let from = startMs; from < endMs; ) {
    const nextDay = (Math.floor(from / DAY_MS) + 1) * DAY_MS;
    const to = Math.min(endMs, nextDay);
    out.set(dayOf(from), (out.get(dayOf(from)) ?? 0) + (to - from) / 1000);
    from = to;
  }
  return out;
}

/** When a bot stopped holding its slot, or `now` if it still does. */
function botEndMs(row: BotRow, nowMs: number): number {
  if (row.ended_at !== null) return Date.parse(row.ended_at);
  return Math.min(nowMs, Date.parse(row.expires_at));
}

/**
 * Folds the time of bots about to be deleted (BOT_RETENTION) into the daily totals, in the sweep's
 * transaction: their minutes are counted once, in the table or in the rows, never both or neither.
 */
export async function foldBotTime(trx: Db, rows: BotRow[], nowMs: number): Promise<void> {
  const totals = new Map<string, { userId: number; day: string; seconds: number }>();
  for (const row of rows) {
    for (const [day, seconds] of secondsByDay(Date.parse(row.created_at), botEndMs(row, nowMs))) {
      const key = `${row.user_id}|${day}`;
      const entry = totals.get(key) ?? { userId: row.user_id, day, seconds: 0 };
      entry.seconds += seconds;
      totals.set(key, entry);
    }
  }
  for (const { userId, day, seconds } of totals.values()) {
    await trx
      .insertInto('usage_daily')
      .values({ day, user_id: userId, token_id: WHOLE_USER, bot_seconds: Math.round(seconds) })
      .onConflict((oc) => oc.columns(['user_id', 'day', 'token_id']).doUpdateSet((eb) => ({ bot_seconds: eb('usage_daily.bot_seconds', '+', eb.ref('excluded.bot_seconds')) })))
      .execute();
  }
}

/**
 * Requests per token and day, without a write per request: counted in memory on the hot path and
 * added to the daily rows every few seconds and at shutdown. Reads add what is still pending.
 */
export class UsageRecorder {
  private counts = new Map<string, { day: string; userId: number; tokenId: number; requests: number }>();
  private readonly flusher = new PeriodicFlush(() => this.flushOnce());

  constructor(private readonly deps: { db: Db; clock: Clock; logger: Logger }) {}

  request(userId: number, tokenId: number): void {
    const day = dayOf(this.deps.clock.now().getTime());
    const key = `${day}|${tokenId}`;
    const entry = this.counts.get(key);
    if (entry) entry.requests++;
    else this.counts.set(key, { day, userId, tokenId, requests: 1 });
  }

  pending(userId: number): Array<{ day: string; tokenId: number; requests: number }> {
    return [...this.counts.values()].filter((c) => c.userId === userId);
  }

  start(intervalMs = USAGE_FLUSH_MS): void {
    this.flusher.start(intervalMs);
  }

  stop(): Promise<void> {
    return this.flusher.stop();
  }

  /** A failed flush puts its counts back for the next. */
  flush(): Promise<void> {
    return this.flusher.run();
  }

  private async flushOnce(): Promise<void> {
    if (this.counts.size === 0) return;
    const batch = this.counts;
    this.counts = new Map();
    try {
      await writeEach(this.deps.db, [...batch.values()], (trx, c) =>
        trx
          .insertInto('usage_daily')
          .values({ day: c.day, user_id: c.userId, token_id: c.tokenId, requests: c.requests })
          .onConflict((oc) => oc.columns(['user_id', 'day', 'token_id']).doUpdateSet((eb) => ({ requests: eb('usage_daily.requests', '+', eb.ref('excluded.requests')) }))),
      );
    } catch (err) {
      for (const [key, c] of batch) {
        const newer = this.counts.get(key);
        if (newer) newer.requests += c.requests;
        else this.counts.set(key, c);
      }
      this.deps.logger.warn({ err, rows: batch.size }, 'could not record usage; will retry');
    }
  }
}

export interface UsageResponse {
  user_id: number;
  from: string;
  to: string;
  totals: { requests: number; bot_minutes: number };
  days: Array<{ day: string; requests: number; bot_minutes: number; tokens: Array<{ token_id: number; requests: number }> }>;
}

const MAX_SPAN_DAYS = 366;
const minutes = (seconds: number) => Math.round(seconds / 6) / 10;

/** A user's usage from the daily rows, what is still pending in memory, and bots not yet folded in. */
export class UsageService {
  constructor(private readonly deps: { db: Db; clock: Clock; recorder: UsageRecorder }) {}

  async forUser(userId: number, fromDay: string | undefined, toDay: string | undefined): Promise<UsageResponse> {
    const nowMs = this.deps.clock.now().getTime();
    const to = toDay ?? dayOf(nowMs);
    const from = fromDay ?? dayOf(Date.parse(to) - 29 * DAY_MS);
    const span = (Date.parse(to) - Date.parse(from)) / DAY_MS;
    if (span < 0) throw validationError([{ field: 'from', in: 'query', message: 'must not be after to' }]);
    if (span > MAX_SPAN_DAYS) throw validationError([{ field: 'from', in: 'query', message: `must be at most ${MAX_SPAN_DAYS} days before to` }]);
    const endMs = Date.parse(to) + DAY_MS;

    const days = new Map<string, { requests: number; botSeconds: number; tokens: Map<number, number> }>();
    const dayEntry = (day: string) => {
      let entry = days.get(day);
      if (!entry) {
        entry = { requests: 0, botSeconds: 0, tokens: new Map() };
        days.set(day, entry);
      }
      return entry;
    };
    const addRequests = (day: string, tokenId: number, requests: number) => {
      if (day < from || day > to || requests === 0) return;
      const entry = dayEntry(day);
      entry.requests += requests;
      entry.tokens.set(tokenId, (entry.tokens.get(tokenId) ?? 0) + requests);
    };

    // One snapshot: a sweep elsewhere moves bot time from the bots table into usage_daily.
    const [rows, bots] = await readSnapshot(this.deps.db, async (trx) => [
      await trx.selectFrom('usage_daily').selectAll().where('user_id', '=', userId).where('day', '>=', from).where('day', '<=', to).execute(),
      await trx.selectFrom('bots').selectAll().where('user_id', '=', userId).where('created_at', '<', new Date(endMs).toISOString()).execute(),
    ] as const);
    for (const row of rows) {
      if (row.token_id !== WHOLE_USER) addRequests(row.day, row.token_id, row.requests);
      if (row.bot_seconds > 0) dayEntry(row.day).botSeconds += row.bot_seconds;
    }
    for (const p of this.deps.recorder.pending(userId)) addRequests(p.day, p.tokenId, p.requests);
    for (const bot of bots) {
      for (const [day, seconds] of secondsByDay(Date.parse(bot.created_at), botEndMs(bot, nowMs))) {
        if (day >= from && day <= to) dayEntry(day).botSeconds += seconds;
      }
    }

    const out = [...days]
      .sort(([a], [b]) => (a < b ? -1 : 1))
      .map(([day, e]) => ({
        day,
        requests: e.requests,
        bot_minutes: minutes(e.botSeconds),
        tokens: [...e.tokens].sort(([a], [b]) => a - b).map(([token_id, requests]) => ({ token_id, requests })),
      }));
    const totalSeconds = [...days.values()].reduce((a, e) => a + e.botSeconds, 0);
    return { user_id: userId, from, to, totals: { requests: out.reduce((a, d) => a + d.requests, 0), bot_minutes: minutes(totalSeconds) }, days: out };
  }
}
