import { createHash, timingSafeEqual } from 'node:crypto';
import { LRUCache } from 'lru-cache';
import type { Db } from '../../db/database';
import { type Clock, isoNow } from '../clock';
import { AppError } from '../http/errors';
import { DigestCache } from './digest-cache';
import type { SecretHasher } from '../tokens/secret-hasher';
import { parseScopes } from '../tokens/scopes';
import { compiledAllowlist, normalizeClientIp } from '../tokens/ip-allowlist';
import type { LastUseRecorder } from '../tokens/last-use';
import type { UsageRecorder } from '../usage/usage';
import { type Environment, maskToken, type ParsedToken, parseToken, randomBase62, SECRET_LENGTH } from '../tokens/token-format';
import { findCredentialBySelector } from '../tokens/tokens.repository';

/** A key as sent, parsed and hashed once per request. `parsed` is null for anything malformed. */
export interface PresentedKey {
  text: string;
  parsed: ParsedToken | null;
  digest: Buffer | undefined;
}

export interface AuthContext {
  user: { id: number; email: string; name: string | null; maxConcurrentBots: number; rateLimitPerMinute: number };
  token: {
    id: number;
    name: string | null;
    scopes: string[];
    environment: Environment;
    masked: string;
    expiresAt: string | null;
    allowedIps: string[] | null;
  };
}

/** Wrong secrets tolerated per token per window before its bcrypt checks are refused outright. */
export const MAX_FAILED_CHECKS = 10;
export const FAILED_CHECK_WINDOW_MS = 60_000;

const WWW_AUTHENTICATE = { 'WWW-Authenticate': 'Bearer realm="keyward", error="invalid_token"' };
const malformed = () => new AppError(401, 'INVALID_API_KEY', 'The API key is malformed or mistyped.', undefined, WWW_AUTHENTICATE);
const invalid = () => new AppError(401, 'INVALID_API_KEY', 'The API key is not valid.', undefined, WWW_AUTHENTICATE);

const sha256 = (value: string): Buffer => createHash('sha256').update(value).digest();

export interface VerifierStats {
  bcryptChecks: number;
  cacheHits: number;
  cacheMisses: number;
}

/**
 * Verification (product.md): checksum first, one indexed lookup by selector, bcrypt once per token
 * per process, then sha256 of the whole token against the remembered digest. The row is read on every
 * request, so revocation, expiry and a disabled user take effect on the very next request.
 */
export class TokenVerifier {
  /** token id → sha256(full token) of a token whose secret bcrypt has accepted. */
  private readonly verified: DigestCache;
  /** sha256(full token) of tokens bcrypt has refused: repeating a wrong token costs no bcrypt. */
  private readonly refused = new LRUCache<string, true>({ max: 10_000 });
  /** selector → failed bcrypt checks in the current window. */
  private readonly failures = new LRUCache<string, number>({ max: 10_000, ttl: FAILED_CHECK_WINDOW_MS, noUpdateTTL: true });
  /** Concurrent first requests with the same token share one bcrypt check. */
  private readonly inflight = new Map<string, Promise<boolean>>();
  readonly stats: VerifierStats = { bcryptChecks: 0, cacheHits: 0, cacheMisses: 0 };

  constructor(
    private readonly deps: { db: Db; clock: Clock; hasher: SecretHasher; tokenPrefix: string; cacheSize: number; lastUse: LastUseRecorder; usage: UsageRecorder },
  ) {
    this.verified = new DigestCache(deps.cacheSize);
  }

  /** Parses and hashes a key once, for `knows` and `verify` to share. */
  present(text: string): PresentedKey {
    const parsed = parseToken(text, this.deps.tokenPrefix);
    return { text, parsed, digest: parsed ? sha256(text) : undefined };
  }

  /**
   * Whether this process has verified this exact token and still remembers it, or is verifying it
   * right now (a request with it will share that check): pure memory, no lookup and no bcrypt. An
   * address blocked for wrong keys may still use such a key.
   */
  knows(key: PresentedKey | string): boolean {
    const { digest } = typeof key === 'string' ? this.present(key) : key;
    return digest !== undefined && (this.verified.has(digest) || this.inflight.has(digest.toString('hex')));
  }

  /** `clientIp` is the caller's address as TRUST_PROXY allows it to be known (Express's req.ip). */
  async verify(key: PresentedKey, clientIp: string): Promise<AuthContext> {
    const { parsed, digest } = key;
    if (!parsed || !digest) throw malformed();
    const row = await findCredentialBySelector(this.deps.db, parsed.selector);
    // The environment is part of the token: a live key respelt as kw_test_… (checksum recomputed) is
    // not that key, and must not pass for a test key or take the real spelling's place in the cache.
    if (!row || row.environment !== parsed.environment) {
      // A key whose selector does not exist goes through the same bcrypt check, against a decoy hash,
      // as a real selector with a wrong secret: same time, same per-selector limit, same answers, so
      // nobody learns which selectors exist (docs/security.md has the measurement).
      await this.checkSecret(parsed.selector, parsed.secret, await this.decoyHash(), digest);
      throw invalid();
    }

    const known = this.verified.get(row.token_id);
    if (known && timingSafeEqual(known, digest)) {
      this.stats.cacheHits++;
    } else {
      this.stats.cacheMisses++;
      await this.checkSecret(parsed.selector, parsed.secret, row.secret_hash, digest);
      this.verified.set(row.token_id, digest);
    }

    // State is checked only after the secret: nobody learns a token's state without holding it.
    if (row.revoked_at !== null || row.deleted_at !== null) {
      throw new AppError(401, 'API_KEY_REVOKED', 'The API key has been revoked.', undefined, WWW_AUTHENTICATE);
    }
    if (row.expires_at !== null && row.expires_at <= isoNow(this.deps.clock)) {
      throw new AppError(401, 'API_KEY_EXPIRED', 'The API key has expired.', undefined, WWW_AUTHENTICATE);
    }
    if (row.disabled_at !== null) throw new AppError(403, 'USER_DISABLED', 'The user of this API key is disabled.');
    let allowedIps: string[] | null = null;
    if (row.allowed_ips !== null) {
      const allowlist = compiledAllowlist(row.allowed_ips);
      if (!allowlist.allows(clientIp)) {
        const shown = normalizeClientIp(clientIp);
        throw new AppError(403, 'FORBIDDEN_IP', `This API key may not be used from ${shown}.`, { ip: shown });
      }
      allowedIps = [...allowlist.entries];
    }
    this.deps.lastUse.record(row.token_id, normalizeClientIp(clientIp));
    this.deps.usage.request(row.user_id, row.token_id);

    return {
      user: {
        id: row.user_id,
        email: row.email,
        name: row.user_name,
        maxConcurrentBots: row.max_concurrent_bots,
        rateLimitPerMinute: row.rate_limit_per_minute,
      },
      token: {
        id: row.token_id,
        name: row.token_name,
        scopes: parseScopes(row.scopes),
        environment: row.environment,
        masked: maskToken(this.deps.tokenPrefix, row.environment, parsed.selector, row.last4),
        expiresAt: row.expires_at,
        allowedIps,
      },
    };
  }

  private decoy: Promise<string> | undefined;

  /** A bcrypt hash of a random secret nobody holds, at the configured cost; made on first need. */
  private decoyHash(): Promise<string> {
    this.decoy ??= this.deps.hasher.hash(randomBase62(SECRET_LENGTH)).catch((err: unknown) => {
      this.decoy = undefined;
      throw err;
    });
    return this.decoy;
  }

  private async checkSecret(selector: string, secret: string, hash: string, digest: Buffer): Promise<void> {
    const key = digest.toString('hex');
    if (this.refused.has(key)) throw invalid();
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
      // with the very same token share this one check and are not counted again.
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
    if (!matches) {
      this.refused.set(key, true);
      throw invalid();
    }
  }

  private forgiveFailure(selector: string): void {
    const failed = this.failures.get(selector) ?? 0;
    if (failed > 1) this.failures.set(selector, failed - 1);
    else this.failures.delete(selector);
  }
}
