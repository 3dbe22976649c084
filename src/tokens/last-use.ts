import { type Db, writeEach } from '../../db/database';
import type { Clock } from '../clock';
import type { Logger } from '../logger';
import { PeriodicFlush } from '../periodic-flush';

export interface LastUse {
  at: string;
  ip: string;
}

/** How often recorded uses are written; also the most a crash can lose. */
export const LAST_USE_FLUSH_MS = 5_000;

/**
 * When and from where each token was last used, without a write per request: the hot path only sets
 * a map entry, and the map is written in one transaction every few seconds and at shutdown. Responses
 * read through `pending` so this process never shows a stale value.
 */
export class LastUseRecorder {
  private uses = new Map<number, { ms: number; ip: string }>();
  /** The batch a flush is writing: still what `pending` answers until the write has landed. */
  private writing = new Map<number, { ms: number; ip: string }>();
  private readonly flusher = new PeriodicFlush(() => this.flushOnce());

  /** `table`: whose uses these are, user tokens' or admin keys'. */
  constructor(private readonly deps: { db: Db; clock: Clock; logger: Logger; table: 'tokens' | 'admin_keys' }) {}

  record(tokenId: number, ip: string): void {
    this.uses.set(tokenId, { ms: this.deps.clock.now().getTime(), ip });
  }

  pending(tokenId: number): LastUse | undefined {
    const use = this.uses.get(tokenId) ?? this.writing.get(tokenId);
    return use && { at: new Date(use.ms).toISOString(), ip: use.ip };
  }

  /** Every token with a use `pending` answers for, written or not. */
  pendingIds(): number[] {
    return [...new Set([...this.uses.keys(), ...this.writing.keys()])];
  }

  start(intervalMs = LAST_USE_FLUSH_MS): void {
    this.flusher.start(intervalMs);
  }

  /** Stops the timer and writes what is pending (at shutdown, before the database closes). */
  stop(): Promise<void> {
    return this.flusher.stop();
  }

  /** Writes every use recorded so far. A failed flush keeps its uses for the next. */
  flush(): Promise<void> {
    return this.flusher.run();
  }

  private async flushOnce(): Promise<void> {
    if (this.uses.size === 0) return;
    const batch = this.uses;
    this.writing = batch;
    this.uses = new Map();
    try {
      const uses = [...batch].map(([id, use]) => ({ id, at: new Date(use.ms).toISOString(), ip: use.ip }));
      // Both tables have the same two columns; Kysely types one table name at a time.
      await writeEach(this.deps.db, uses, (trx, use) =>
        trx
          .updateTable(this.deps.table as 'tokens')
          .set({ last_used_at: use.at, last_used_ip: use.ip })
          .where('id', '=', use.id)
          // Two processes can flush out of order: never move last use backwards.
          .where((eb) => eb.or([eb('last_used_at', 'is', null), eb('last_used_at', '<', use.at)])),
      );
    } catch (err) {
      // Put the batch back unless a newer use of the same token arrived meanwhile.
      for (const [id, use] of batch) if (!this.uses.has(id)) this.uses.set(id, use);
      this.deps.logger.warn({ err, tokens: batch.size }, 'could not record last use; will retry');
    } finally {
      this.writing = new Map();
    }
  }
}
