import { once } from 'node:events';
import { Redis } from 'ioredis';
import type { Pool } from 'pg';
import {
  type RateLimiterAbstract,
  RateLimiterMemory,
  RateLimiterPostgres,
  RateLimiterRedis,
  RateLimiterRes,
  RLWrapperTimeouts,
} from 'rate-limiter-flexible';
import { postgresPool } from '../../db/database';
import type { Config, RateLimitStoreKind } from '../config';
import type { Logger } from '../logger';

/** Every limit is per minute; the window starts with a key's first request, in the store that counts it. */
export const WINDOW_SECONDS = 60;

/** Where a key stands in its window. `consumed` past the limit means refused. */
export interface Window {
  consumed: number;
  resetSeconds: number;
}

/** The counters of one kind of limit (users, admin addresses, wrong keys per address). */
export interface Counter {
  /** Counts one request of `key`, whose limit is `limit`. */
  consume(key: string, limit: number): Promise<Window>;
  /** Where `key` stands, without counting; null if it has no window open. */
  get(key: string, limit: number): Promise<Window | null>;
  /** Gives one back (a key that proved good after all). */
  reward(key: string, limit: number): Promise<void>;
}

export type CounterKind = 'user' | 'token' | 'admin' | 'auth_failures';

/** Whether the shared store is counting, for /readyz and /metrics. */
export interface StoreState {
  kind: RateLimitStoreKind;
  /** memory: always. A shared store: it answered the last time it was asked. */
  up: boolean;
}

export interface Counters {
  counter(kind: CounterKind): Counter;
  state(): StoreState;
  /** Starts asking the shared store (until then, and whenever it does not answer, counting is local). */
  start(): void;
  close(): Promise<void>;
}

const seconds = (ms: number) => Math.max(1, Math.ceil(ms / 1000));
const windowOf = (res: RateLimiterRes): Window => ({ consumed: res.consumedPoints, resetSeconds: seconds(res.msBeforeNext) });

/**
 * This process's memory. One counter serves keys whose limits differ: rate-limiter-flexible counts
 * (fixed windows, expiring keys) and the limit is compared by the caller, so a changed limit applies
 * to the current window at once.
 */
class MemoryCounter implements Counter {
  private readonly limiter: RateLimiterMemory;

  constructor(kind: CounterKind) {
    this.limiter = new RateLimiterMemory({ keyPrefix: kind, points: Number.MAX_SAFE_INTEGER, duration: WINDOW_SECONDS });
  }

  async consume(key: string): Promise<Window> {
    return windowOf(await this.limiter.consume(key));
  }

  async get(key: string): Promise<Window | null> {
    const res = await this.limiter.get(key);
    return res ? windowOf(res) : null;
  }

  async reward(key: string): Promise<void> {
    await this.limiter.reward(key);
  }
}

export function memoryCounters(): Counters {
  const counters = new Map<CounterKind, MemoryCounter>();
  return {
    counter: (kind) => {
      if (!counters.has(kind)) counters.set(kind, new MemoryCounter(kind));
      return counters.get(kind)!;
    },
    state: () => ({ kind: 'memory', up: true }),
    start: () => undefined,
    close: async () => undefined,
  };
}

/** What differs between PostgreSQL and Redis: making a limiter, asking whether it answers, closing. */
interface StoreClient {
  kind: 'postgres' | 'redis';
  limiter(options: { keyPrefix: string; points: number; inMemoryBlockOnConsumed: number }): RateLimiterAbstract;
  ping(): Promise<void>;
  close(): Promise<void>;
}

/** How many limit values keep a limiter of their own; past it the oldest is dropped (and re-made when used). */
const LIMITERS_KEPT = 1000;
/** While the store is down, how often it is asked whether it is back. */
const PROBE_MS = 1000;

/**
 * Counters every instance shares, in PostgreSQL or Redis, through rate-limiter-flexible's own stores.
 * Each limit value has its limiter (they share the keys, so a changed limit still sees the count)
 * so that rate-limiter-flexible's in-memory block applies: a key past its limit is refused from memory
 * until its window ends, with no round trip. RLWrapperTimeouts bounds every call by
 * RATE_LIMIT_STORE_TIMEOUT_MS.
 *
 * A call that fails or times out switches the instance to its own memory (the `memory` behaviour),
 * logged once; from then on requests do not wait for the store at all, and a probe asks it every
 * second until it answers, logged once again. rate-limiter-flexible's insuranceLimiter would do the
 * switch per call, but silently and trying the store first on every request while it is down.
 */
class SharedCounters implements Counters {
  private up = false;
  /** Said in the log that the store is down: once per outage, at start once the first probe fails. */
  private toldDown = false;
  private probing: NodeJS.Timeout | undefined;
  private closed = false;
  private readonly limiters = new Map<string, RLWrapperTimeouts>();
  private readonly local = memoryCounters();
  private readonly counters = new Map<CounterKind, Counter>();

  constructor(
    private readonly client: StoreClient,
    private readonly options: { timeoutMs: number; prefix: string },
    private readonly logger: Logger,
  ) {}

  start(): void {
    void this.probe();
  }

  state(): StoreState {
    return { kind: this.client.kind, up: this.up };
  }

  counter(kind: CounterKind): Counter {
    if (!this.counters.has(kind)) this.counters.set(kind, this.sharedCounter(kind));
    return this.counters.get(kind)!;
  }

  private sharedCounter(kind: CounterKind): Counter {
    const local = this.local.counter(kind);
    /** The store's answer, or (store down or failing) this process's. A refusal is an answer. */
    const run = async <T>(limit: number, shared: (limiter: RLWrapperTimeouts) => Promise<T>, fallback: () => Promise<T>): Promise<T> => {
      if (!this.up) return fallback();
      try {
        return await shared(this.limiter(kind, limit));
      } catch (err) {
        if (err instanceof RateLimiterRes) throw err;
        this.down(err);
        return fallback();
      }
    };
    return {
      consume: async (key, limit) => {
        try {
          return await run(limit, async (l) => windowOf(await l.consume(key)), () => local.consume(key, limit));
        } catch (err) {
          if (!(err instanceof RateLimiterRes)) throw err;
          // Past the limit: a refusal blocked in memory reports no points, only the time left.
          return { consumed: Math.max(err.consumedPoints, limit + 1), resetSeconds: seconds(err.msBeforeNext) };
        }
      },
      get: (key, limit) =>
        run(
          limit,
          async (l) => {
            const res = await l.get(key);
            return res ? windowOf(res) : null;
          },
          () => local.get(key, limit),
        ),
      reward: (key, limit) => run(limit, async (l) => void (await l.reward(key)), () => local.reward(key, limit)),
    };
  }

  private limiter(kind: CounterKind, limit: number): RLWrapperTimeouts {
    const id = `${kind}:${limit}`;
    let limiter = this.limiters.get(id);
    if (!limiter) {
      if (this.limiters.size >= LIMITERS_KEPT) this.limiters.delete(this.limiters.keys().next().value!);
      const store = this.client.limiter({ keyPrefix: `${this.options.prefix}:${kind}`, points: limit, inMemoryBlockOnConsumed: limit + 1 });
      limiter = new RLWrapperTimeouts({ limiter: store, timeoutMs: this.options.timeoutMs });
      this.limiters.set(id, limiter);
    }
    return limiter;
  }

  private down(err: unknown): void {
    const wasUp = this.up;
    this.up = false;
    if (wasUp) this.tellDown(err);
    this.probeLater();
  }

  /** Once per outage, including one at start before anything was counted shared. */
  private tellDown(err: unknown): void {
    if (this.toldDown) return;
    this.toldDown = true;
    this.logger.warn(
      { rate_limit_store: this.client.kind, err: err instanceof Error ? err.message : String(err) },
      'rate-limit store not answering: each instance counts its own rate limits until it is back',
    );
  }

  private probeLater(): void {
    if (this.probing || this.closed) return;
    this.probing = setTimeout(() => {
      this.probing = undefined;
      void this.probe();
    }, PROBE_MS);
    this.probing.unref();
  }

  private async probe(): Promise<void> {
    try {
      await this.client.ping();
    } catch (err) {
      if (this.closed) return;
      this.tellDown(err);
      this.probeLater();
      return;
    }
    if (this.closed) return;
    this.up = true;
    if (this.toldDown) this.logger.info({ rate_limit_store: this.client.kind }, 'rate-limit store answers again: rate limits are shared again');
    else this.logger.info({ rate_limit_store: this.client.kind }, 'rate limits are counted in the shared store');
    this.toldDown = false;
  }

  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.probing);
    await this.client.close();
  }
}

/** How long a probe waits for Redis to (re)connect before it counts as not answering. */
const CONNECT_TIMEOUT_MS = 1000;

function redisClient(url: string, timeoutMs: number): StoreClient {
  const client = new Redis(url, {
    // A command while disconnected fails at once instead of queueing behind the reconnection.
    enableOfflineQueue: false,
    maxRetriesPerRequest: 1,
    connectTimeout: CONNECT_TIMEOUT_MS,
    commandTimeout: Math.max(timeoutMs * 4, 200),
    retryStrategy: (attempt) => Math.min(attempt * 100, 1000),
  });
  // Connection errors are reported through the probe; unhandled, ioredis would print each one.
  client.on('error', () => undefined);
  return {
    kind: 'redis',
    limiter: (options) => new RateLimiterRedis({ storeClient: client, duration: WINDOW_SECONDS, rejectIfRedisNotReady: true, ...options }),
    ping: async () => {
      if (client.status !== 'ready') {
        try {
          await once(client, 'ready', { signal: AbortSignal.timeout(CONNECT_TIMEOUT_MS) });
        } catch {
          throw new Error(`redis is ${client.status}`);
        }
      }
      await client.ping();
    },
    close: async () => {
      client.disconnect();
    },
  };
}

const SWEEP_MS = 5 * 60_000;
const POSTGRES_CONNECTIONS = 4;

/** The table rate-limiter-flexible counts in; db/migrations creates it, in the same schema as the rest. */
export const POSTGRES_TABLE = 'rate_limits';

function postgresClient(url: string, schema: string | undefined, timeoutMs: number): StoreClient {
  // Its own few connections, kept open: a slow count never holds one the API needs, a request never
  // waits for one to open, and a query the bound gave up on is cancelled by the server soon after.
  const pool: Pool = postgresPool(url, { schema, max: POSTGRES_CONNECTIONS, connectionTimeoutMs: CONNECT_TIMEOUT_MS, statementTimeoutMs: Math.max(timeoutMs * 10, 500), keepIdle: true });
  // Keys that never come back leave a row behind. rate-limiter-flexible would sweep them on a timer
  // per limiter (one per limit value here): one sweep per instance instead, of the rows whose window
  // ended an hour ago, as rate-limiter-flexible's own sweep deletes them.
  const sweep = setInterval(() => void pool.query(`delete from ${POSTGRES_TABLE} where expire < $1`, [Date.now() - 3_600_000]).catch(() => undefined), SWEEP_MS);
  sweep.unref();
  return {
    kind: 'postgres',
    limiter: (options) =>
      new RateLimiterPostgres({ storeClient: pool, storeType: 'pool', tableName: POSTGRES_TABLE, tableCreated: true, clearExpiredByTimeout: false, duration: WINDOW_SECONDS, ...options }),
    // On every connection at once: opening one takes longer than a request may wait, so the probe
    // that switches to the store opens them all first (the pool keeps them).
    ping: async () => {
      await Promise.all(Array.from({ length: POSTGRES_CONNECTIONS }, () => pool.query(`select 1 from ${POSTGRES_TABLE} limit 1`)));
    },
    close: async () => {
      clearInterval(sweep);
      await pool.end();
    },
  };
}

/** The counters RATE_LIMIT_STORE names. `schema`: the PostgreSQL schema keyward's tables are in (tests). */
export function openCounters(config: Config, logger: Logger, schema?: string): Counters {
  const options = { timeoutMs: config.rateLimitStoreTimeoutMs, prefix: config.rateLimitStorePrefix };
  switch (config.rateLimitStore) {
    case 'memory':
      return memoryCounters();
    case 'redis':
      return new SharedCounters(redisClient(config.redisUrl!, options.timeoutMs), options, logger);
    case 'postgres':
      return new SharedCounters(postgresClient(config.databaseUrl!, schema, options.timeoutMs), options, logger);
  }
}
