import type { ServerResponse } from 'node:http';
import { AppError } from '../http/errors';
import { clientNetwork } from '../tokens/ip-allowlist';
import { type Counter, type Counters, memoryCounters, type Window } from './counters';

function rateLimited(message: string, window: Window, details: Record<string, unknown> = {}): AppError {
  return new AppError(429, 'RATE_LIMITED', message, { ...details, retry_after: window.resetSeconds }, { 'Retry-After': String(window.resetSeconds) });
}

/** Every response of a counted request says where the caller stands (IETF RateLimit header fields). */
function setHeaders(res: ServerResponse, limit: number, window: Window): void {
  res.setHeader('RateLimit-Limit', String(limit));
  res.setHeader('RateLimit-Remaining', String(Math.max(0, limit - window.consumed)));
  res.setHeader('RateLimit-Reset', String(window.resetSeconds));
}

/**
 * The limits: a user's requests a minute on /v1 (and a key's, where it has one of its own), an
 * address's on /admin, and the wrong keys an address may send. The counting happens in RATE_LIMIT_STORE (counters.ts): this process's memory, or
 * a store every instance shares, so that N instances together admit the limit once.
 */
export class RateLimits {
  private readonly users: Counter;
  private readonly tokens: Counter;
  private readonly admin: Counter;
  private readonly failures: Counter;
  /** Requests refused by each limit since start, for /metrics. */
  readonly rejections = { user: 0, token: 0, admin: 0, auth_failures: 0 };

  constructor(
    private readonly config: { authFailuresPerMinute: number; adminRateLimitPerMinute: number },
    /** Told of each attempt refused because its address sent too many wrong keys (the audit log counts them). */
    private readonly onWrongKeyRefused: (ip: string) => void = () => undefined,
    readonly counters: Counters = memoryCounters(),
  ) {
    this.users = counters.counter('user');
    this.tokens = counters.counter('token');
    this.admin = counters.counter('admin');
    this.failures = counters.counter('auth_failures');
  }

  /**
   * Counts one /v1 request of a user, and of its key when the key has a limit of its own; past either
   * this minute, 429. The RateLimit headers describe the tighter of the two. A limit of 0 refuses
   * everything.
   */
  async userRequest(userId: number, limit: number, res: ServerResponse, token?: { id: number; limit: number | null }): Promise<void> {
    const window = await this.users.consume(String(userId), limit);
    const keyLimit = token?.limit ?? null;
    const keyWindow = keyLimit === null ? null : await this.tokens.consume(String(token!.id), keyLimit);
    if (keyWindow !== null && keyLimit! - keyWindow.consumed < limit - window.consumed) setHeaders(res, keyLimit!, keyWindow);
    else setHeaders(res, limit, window);
    if (window.consumed > limit) {
      this.rejections.user++;
      throw rateLimited(`This user may make ${limit} requests a minute; try again in ${window.resetSeconds} s.`, window, { limit });
    }
    if (keyWindow !== null && keyWindow.consumed > keyLimit!) {
      this.rejections.token++;
      throw rateLimited(`This API key may make ${keyLimit} requests a minute; try again in ${keyWindow.resetSeconds} s.`, keyWindow, { limit: keyLimit });
    }
  }

  /** Counts one admin request from an address. */
  async adminRequest(ip: string, res: ServerResponse): Promise<void> {
    const limit = this.config.adminRateLimitPerMinute;
    const window = await this.admin.consume(clientNetwork(ip), limit);
    setHeaders(res, limit, window);
    if (window.consumed > limit) {
      this.rejections.admin++;
      throw rateLimited(`The admin API takes ${limit} requests a minute from one address; try again in ${window.resetSeconds} s.`, window, { limit });
    }
  }

  /** Records a wrong key sent from an address. */
  async authFailed(ip: string): Promise<void> {
    await this.failures.consume(clientNetwork(ip), this.config.authFailuresPerMinute);
  }

  /**
   * Counts a key this process does not know as a wrong one before it is checked, and refuses it if
   * the address is over its limit: requests sent at once cannot all pass a check that only counts the
   * ones already answered. `attemptSucceeded` gives the count back when the key proves good.
   */
  async reserveAttempt(ip: string): Promise<AppError | undefined> {
    const window = await this.failures.consume(clientNetwork(ip), this.config.authFailuresPerMinute);
    if (window.consumed <= this.config.authFailuresPerMinute) return undefined;
    this.rejections.auth_failures++;
    this.onWrongKeyRefused(ip);
    return rateLimited('Too many wrong keys from this address; try again later.', window);
  }

  async attemptSucceeded(ip: string): Promise<void> {
    await this.failures.reward(clientNetwork(ip), this.config.authFailuresPerMinute);
  }

  /**
   * Whether an address has sent too many wrong keys this minute. The caller decides what a blocked
   * address may still do (a key this process already knows), and refuses the rest with this error.
   */
  async blocked(ip: string): Promise<AppError | undefined> {
    const window = await this.failures.get(clientNetwork(ip), this.config.authFailuresPerMinute);
    if (!window || window.consumed < this.config.authFailuresPerMinute) return undefined;
    this.rejections.auth_failures++;
    this.onWrongKeyRefused(ip);
    return rateLimited('Too many wrong keys from this address; try again later.', window);
  }
}
