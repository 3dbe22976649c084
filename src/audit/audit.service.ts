import { type Db, writeTransaction } from '../../db/database';
import type { Clock } from '../clock';
import { encodeCursor, type Page, type PageRequest } from '../http/pagination';
import type { Logger } from '../logger';
import { clientNetwork } from '../tokens/ip-allowlist';
import { type AuditFilter, listAuditEvents, pruneAuditEvents } from './audit.repository';
import { type AuditEventResponse, recordAudit, toAuditResponse } from './audit';

export type { AuditFilter } from './audit.repository';

/** Refusals that say someone tried a credential and failed; "no credential at all" is not one. */
export const AUTH_FAILURE_CODES = new Set([
  'INVALID_API_KEY',
  'API_KEY_EXPIRED',
  'API_KEY_REVOKED',
  'INVALID_ADMIN_KEY',
  'ADMIN_KEY_EXPIRED',
  'ADMIN_KEY_REVOKED',
  'FORBIDDEN_IP',
  'USER_DISABLED',
  'SSO_ACCESS_DENIED',
  'CSRF_CHECK_FAILED',
]);

/** Authentication failures are written once a minute, one entry per address (IPv6 per /64)… */
export const AUTH_FAILURE_FLUSH_MS = 60_000;
/** …for at most this many addresses a minute; the rest are summed into one entry, so a flood from many addresses writes 101 rows a minute, not one per attempt. */
export const AUTH_FAILURE_ADDRESSES_PER_FLUSH = 100;
/** Addresses told apart in memory between flushes; failures from more are counted as one. */
export const AUTH_FAILURE_ADDRESSES_TRACKED = 10_000;
const UNTRACKED = '*';
const PRUNE_INTERVAL_MS = 3_600_000;
const PRUNE_BATCH = 5_000;

interface FailureWindow {
  count: number;
  codes: Record<string, number>;
  first: string;
  last: string;
}

/**
 * The audit log's reader and housekeeper. Changes write their own entries in their own transactions
 * (recordAudit); this lists them, prunes what RETENTION no longer keeps, and turns floods of failed
 * authentication into a few aggregate entries.
 */
export class AuditLog {
  private failures = new Map<string, FailureWindow>();
  private timers: NodeJS.Timeout[] = [];

  constructor(private readonly deps: { db: Db; clock: Clock; logger: Logger; retentionSeconds: number }) {}

  async list(filter: AuditFilter, page: PageRequest): Promise<Page<AuditEventResponse>> {
    // Newest first; the cursor carries the last id shown, and the next page starts below it.
    const rows = await listAuditEvents(this.deps.db, filter, page.afterId, page.limit);
    const more = rows.length > page.limit;
    const items = more ? rows.slice(0, page.limit) : rows;
    return { data: items.map(toAuditResponse), meta: { limit: page.limit, next_cursor: more ? encodeCursor(items.at(-1)!.id) : null } };
  }

  /** Counted in memory on the request path; written by flushFailures. */
  authFailed(ip: string, code: string): void {
    let address = clientNetwork(ip);
    const at = this.deps.clock.now().toISOString();
    // Memory is bounded too: past this many addresses in a minute, the rest are counted together.
    if (!this.failures.has(address) && this.failures.size >= AUTH_FAILURE_ADDRESSES_TRACKED) address = UNTRACKED;
    let window = this.failures.get(address);
    if (!window) {
      window = { count: 0, codes: {}, first: at, last: at };
      this.failures.set(address, window);
    }
    window.count++;
    window.codes[code] = (window.codes[code] ?? 0) + 1;
    window.last = at;
  }

  async flushFailures(): Promise<void> {
    if (this.failures.size === 0) return;
    const untracked = this.failures.get(UNTRACKED);
    const batch = [...this.failures].filter(([address]) => address !== UNTRACKED).sort((a, b) => b[1].count - a[1].count);
    this.failures = new Map();
    const at = this.deps.clock.now().toISOString();
    const named = batch.slice(0, AUTH_FAILURE_ADDRESSES_PER_FLUSH);
    const rest = batch.slice(AUTH_FAILURE_ADDRESSES_PER_FLUSH);
    if (untracked) rest.push([UNTRACKED, untracked]);
    try {
      await writeTransaction(this.deps.db, async (trx) => {
        for (const [address, w] of named) {
          await recordAudit(trx, { actor: { type: 'anonymous' }, ip: address, requestId: null }, at, {
            action: 'auth.failed',
            details: { count: w.count, codes: w.codes, first_at: w.first, last_at: w.last },
          });
        }
        if (rest.length > 0) {
          const codes: Record<string, number> = {};
          for (const [, w] of rest) for (const [code, n] of Object.entries(w.codes)) codes[code] = (codes[code] ?? 0) + n;
          const tracked = rest.filter(([address]) => address !== UNTRACKED).length;
          await recordAudit(trx, { actor: { type: 'anonymous' }, ip: null, requestId: null }, at, {
            action: 'auth.failed',
            details: {
              count: rest.reduce((a, [, w]) => a + w.count, 0),
              codes,
              // Addresses beyond the tracked ones are not told apart: "at least".
              addresses: untracked ? `${tracked + 1}+` : tracked,
              first_at: rest.map(([, w]) => w.first).sort()[0],
              last_at: rest.map(([, w]) => w.last).sort().at(-1),
            },
          });
        }
      });
    } catch (err) {
      // Counts are not worth retrying into a database that refuses writes; the log line keeps them.
      this.deps.logger.warn({ err, addresses: batch.length }, 'could not write authentication failures to the audit log');
    }
  }

  /** Deletes entries older than the retention, a batch at a time so no write lock is held for long. */
  async prune(): Promise<number> {
    if (this.deps.retentionSeconds === 0) return 0;
    const before = new Date(this.deps.clock.now().getTime() - this.deps.retentionSeconds * 1000).toISOString();
    let total = 0;
    for (;;) {
      const deleted = await pruneAuditEvents(this.deps.db, before, PRUNE_BATCH);
      total += deleted;
      if (deleted < PRUNE_BATCH) return total;
    }
  }

  start(): void {
    if (this.timers.length > 0) return;
    const prune = () =>
      void this.prune().catch((err: unknown) => this.deps.logger.warn({ err }, 'could not prune the audit log'));
    prune();
    this.timers = [setInterval(() => void this.flushFailures(), AUTH_FAILURE_FLUSH_MS), setInterval(prune, PRUNE_INTERVAL_MS)];
    for (const t of this.timers) t.unref();
  }

  /** At shutdown: the failures counted since the last flush are written. */
  async stop(): Promise<void> {
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    await this.flushFailures();
  }
}
