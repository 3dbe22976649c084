import { timingSafeEqual } from 'node:crypto';
import { LRUCache } from 'lru-cache';
import { AppError } from '../http/errors';
import type { SecretHasher } from '../tokens/secret-hasher';
import { randomBase62, SECRET_LENGTH } from '../tokens/token-format';
import { DigestCache } from './digest-cache';

/** Wrong secrets tolerated per key per window before its bcrypt checks are refused outright. */
export const MAX_FAILED_CHECKS = 10;
export const FAILED_CHECK_WINDOW_MS = 60_000;

export interface SecretCheckStats {
  bcryptChecks: number;
  cacheHits: number;
  cacheMisses: number;
}

/** What the check needs of a stored key: its row id and the bcrypt hash of its secret. */
export interface StoredSecret {
  id: number;
  secretHash: string;
}

/**
 * Whether the secret of a presented key matches its stored hash, as every kind of key is checked
 * (product.md): bcrypt once per key per process, then sha256 of the whole key against the remembered
 * digest. A key whose selector does not exist goes through the same bcrypt check against a decoy hash,
 * as a real selector with a wrong secret does: same time, same per-selector limit, same answers, so
 * nobody learns which selectors exist (docs/security.md has the measurement).
 *
 * One instance per kind of key (user tokens, admin keys): the caches are keyed by row id.
 */
export class SecretCheck {
  /** row id → sha256(full key) of a key whose secret bcrypt has accepted. */
  private readonly verified: DigestCache;
  /** sha256(full key) of keys bcrypt has refused: repeating a wrong key costs no bcrypt. */
  private readonly refused = new LRUCache<string, true>({ max: 10_000 });
  /** selector → failed bcrypt checks in the current window. */
  private readonly failures = new LRUCache<string, number>({ max: 10_000, ttl: FAILED_CHECK_WINDOW_MS, noUpdateTTL: true });
  /** Concurrent first requests with the same key share one bcrypt check. */
  private readonly inflight = new Map<string, Promise<boolean>>();
  private decoy: Promise<string> | undefined;
  readonly stats: SecretCheckStats = { bcryptChecks: 0, cacheHits: 0, cacheMisses: 0 };

  constructor(private readonly deps: { hasher: SecretHasher; cacheSize: number }) {
    this.verified = new DigestCache(deps.cacheSize);
  }

  /**
   * Whether this process has verified this exact key and still remembers it, or is verifying it
   * right now (a request with it will share that check): pure memory, no lookup and no bcrypt.
   */
  knows(digest: Buffer): boolean {
    return this.verified.has(digest) || this.inflight.has(digest.toString('hex'));
  }

  /**
   * True when `secret` is the stored key's; false when it is not, or when there is no such key
   * (`stored` undefined, checked against the decoy). Throws 429 RATE_LIMITED while the selector has
   * had too many wrong secrets.
   */
  async matches(stored: StoredSecret | undefined, selector: string, secret: string, digest: Buffer): Promise<boolean> {
    if (stored) {
      const known = this.verified.get(stored.id);
      if (known && timingSafeEqual(known, digest)) {
        this.stats.cacheHits++;
        return true;
      }
      this.stats.cacheMisses++;
    }
    const ok = await this.bcryptOnce(selector, secret, stored ? stored.secretHash : await this.decoyHash(), digest);
    if (ok && stored) this.verified.set(stored.id, digest);
    return ok && stored !== undefined;
  }

  /** A bcrypt hash of a random secret nobody holds, at the configured cost; made on first need. */
  private decoyHash(): Promise<string> {
    this.decoy ??= this.deps.hasher.hash(randomBase62(SECRET_LENGTH)).catch((err: unknown) => {
      this.decoy = undefined;
      throw err;
    });
    return this.decoy;
  }

  private async bcryptOnce(selector: string, secret: string, hash: string, digest: Buffer): Promise<boolean> {
    const key = digest.toString('hex');
    if (this.refused.has(key)) return false;
    let pending = this.inflight.get(key);
    let counted = false;
    if (!pending) {
      const failed = this.failures.get(selector) ?? 0;
      if (failed >= MAX_FAILED_CHECKS) {
        // Someone is guessing secrets for this selector: refuse before spending CPU on bcrypt.
        const retryAfter = Math.max(1, Math.ceil(this.failures.getRemainingTTL(selector) / 1000));
        throw new AppError(429, 'RATE_LIMITED', 'Too many failed attempts with this API key; try again later.', { retry_after: retryAfter }, {
          'Retry-After': String(retryAfter),
        });
      }
      // Counted before bcrypt and given back if the secret is right: a burst of different wrong
      // secrets sent at once cannot all pass the check above before any of them has failed. Requests
      // with the very same key share this one check and are not counted again.
      this.failures.set(selector, failed + 1);
      counted = true;
      this.stats.bcryptChecks++;
      pending = this.deps.hasher.verify(secret, hash).finally(() => this.inflight.delete(key));
      this.inflight.set(key, pending);
    }
    let matches = false;
    try {
      matches = await pending;
    } finally {
      if (matches && counted) this.forgiveFailure(selector);
    }
    if (!matches) this.refused.set(key, true);
    return matches;
  }

  private forgiveFailure(selector: string): void {
    const failed = this.failures.get(selector) ?? 0;
    if (failed > 1) this.failures.set(selector, failed - 1);
    else this.failures.delete(selector);
  }
}
