import type { ServerResponse } from 'node:http';
import { RateLimiterMemory } from 'rate-limiter-flexible';
import { AppError } from '../http/errors';
import { clientNetwork } from '../tokens/ip-allowlist';

const WINDOW_SECONDS = 60;

/**
 * Counting is rate-limiter-flexible's job (fixed one-minute windows, expiring keys); the limit is
 * compared here, so one counter serves users whose limits differ and a changed limit applies to the
 * current window at once. The counters live in this process: with several processes behind one
 * balancer, each counts on its own (see the README).
 */
function counter(): RateLimiterMemory {
  return new RateLimiterMemory({ points: Number.MAX_SAFE_INTEGER, duration: WINDOW_SECONDS });
}

interface Window {
  consumed: number;
  resetSeconds: number;
}

const seconds = (ms: number) => Math.max(1, Math.ceil(ms / 1000));

function rateLimited(message: string, window: Window, details: Record<string, unknown> = {}): AppError {
  return new AppError(429, 'RATE_LIMITED', message, { ...details, retry_after: window.resetSeconds }, { 'Retry-After': String(window.resetSeconds) });
}

/** Every response of a counted request says where the caller stands (IETF RateLimit header fields). */
function setHeaders(res: ServerResponse, limit: number, window: Window): void {
  res.setHeader('RateLimit-Limit', String(limit));
  res.setHeader('RateLimit-Remaining', String(Math.max(0, limit - window.consumed)));
  res.setHeader('RateLimit-Reset', String(window.resetSeconds));
}

export class RateLimits {
  private readonly users = counter();
  private readonly admin = counter();
  private readonly failures = counter();
  /** Requests refused by each limit since start, for /metrics. */
  readonly rejections = { user: 0, admin: 0, auth_failures: 0 };

  constructor(
    private readonly config: { authFailuresPerMinute: number; adminRateLimitPerMinute: number },
    /** Told of each attempt refused because its address sent too many wrong keys (the audit log counts them). */
    private readonly onWrongKeyRefused: (ip: string) => void = () => undefined,
  ) {}

  private async count(limiter: RateLimiterMemory, key: string): Promise<Window> {
    const res = await limiter.consume(key);
    return { consumed: res.consumedPoints, resetSeconds: seconds(res.msBeforeNext) };
  }

  /** Counts one /v1 request of a user; past `limit` this minute, 429. A limit of 0 refuses everything. */
  async userRequest(userId: number, limit: number, res: ServerResponse): Promise<void> {
    const window = await this.count(this.users, String(userId));
    setHeaders(res, limit, window);
    if (window.consumed > limit) {
      this.rejections.user++;
      throw rateLimited(`This user may make ${limit} requests a minute; try again in ${window.resetSeconds} s.`, window, { limit });
    }
  }

  /** Counts one admin request from an address. */
  async adminRequest(ip: string, res: ServerResponse): Promise<void> {
    const limit = this.config.adminRateLimitPerMinute;
    const window = await this.count(this.admin, clientNetwork(ip));
    setHeaders(res, limit, window);
    if (window.consumed > limit) {
      this.rejections.admin++;
      throw rateLimited(`The admin API takes ${limit} requests a minute from one address; try again in ${window.resetSeconds} s.`, window, { limit });
    }
  }

  /** Records a wrong key sent from an address. */
  async authFailed(ip: string): Promise<void> {
    await this.failures.consume(clientNetwork(ip));
  }

  /**
   * Counts a key this process does not know as a wrong one before it is checked, and refuses it if
   * the address is over its limit: requests sent at once cannot all pass a check that only counts the
   * ones already answered. `attemptSucceeded` gives the count back when the key proves good.
   */
  async reserveAttempt(ip: string): Promise<AppError | undefined> {
    const res = await this.failures.consume(clientNetwork(ip));
    if (res.consumedPoints <= this.config.authFailuresPerMinute) return undefined;
    this.rejections.auth_failures++;
    this.onWrongKeyRefused(ip);
    return rateLimited('Too many wrong keys from this address; try again later.', {
      consumed: res.consumedPoints,
      resetSeconds: seconds(res.msBeforeNext),
    });
  }

  async attemptSucceeded(ip: string): Promise<void> {
    await this.failures.reward(clientNetwork(ip));
  }

  /**
   * Whether an address has sent too many wrong keys this minute. The caller decides what a blocked
   * address may still do (a key this process already knows), and refuses the rest with this error.
   */
  async blocked(ip: string): Promise<AppError | undefined> {
    const res = await this.failures.get(clientNetwork(ip));
    if (!res || res.consumedPoints < this.config.authFailuresPerMinute) return undefined;
    this.rejections.auth_failures++;
    this.onWrongKeyRefused(ip);
    return rateLimited(
      'Too many wrong keys from this address; try again later.',
      { consumed: res.consumedPoints, resetSeconds: seconds(res.msBeforeNext) },
    );
  }
}
