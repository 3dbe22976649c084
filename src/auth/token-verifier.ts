import { createHash } from 'node:crypto';
import type { Db } from '../../db/database';
import { type Clock, isoNow } from '../clock';
import { AppError } from '../http/errors';
import { SecretCheck, type SecretCheckStats } from './secret-check';
import type { SecretHasher } from '../tokens/secret-hasher';
import { parseScopes } from '../tokens/scopes';
import { compiledAllowlist, normalizeClientIp } from '../tokens/ip-allowlist';
import type { LastUseRecorder } from '../tokens/last-use';
import type { UsageRecorder } from '../usage/usage';
import { type Environment, maskToken, type ParsedToken, parseToken } from '../tokens/token-format';
import { findCredentialBySelector } from '../tokens/tokens.repository';

/** A key as sent, parsed and hashed once per request. `parsed` is null for anything malformed. */
export interface PresentedKey {
  text: string;
  parsed: ParsedToken | null;
  digest: Buffer | undefined;
}

export interface AuthContext {
  user: { id: number; email: string; name: string | null; externalId: string | null; maxConcurrentBots: number; rateLimitPerMinute: number };
  token: {
    id: number;
    name: string | null;
    scopes: string[];
    environment: Environment;
    masked: string;
    expiresAt: string | null;
    allowedIps: string[] | null;
    /** The admin's object for the upstream, as stored (JSON text): parsed only by who shows it. */
    metadataJson: string | null;
    /** Requests a minute with this key, besides the user's; null: the user's only. */
    rateLimitPerMinute: number | null;
  };
}

const WWW_AUTHENTICATE = { 'WWW-Authenticate': 'Bearer realm="keyward", error="invalid_token"' };
const malformed = () => new AppError(401, 'INVALID_API_KEY', 'The API key is malformed or mistyped.', undefined, WWW_AUTHENTICATE);
const invalid = () => new AppError(401, 'INVALID_API_KEY', 'The API key is not valid.', undefined, WWW_AUTHENTICATE);

const sha256 = (value: string): Buffer => createHash('sha256').update(value).digest();

export type VerifierStats = SecretCheckStats;

/**
 * Verification (product.md): checksum first, one indexed lookup by selector, bcrypt once per token
 * per process, then sha256 of the whole token against the remembered digest. The row is read on every
 * request, so revocation, expiry and a disabled user take effect on the very next request.
 */
export class TokenVerifier {
  private readonly secrets: SecretCheck;

  constructor(
    private readonly deps: { db: Db; clock: Clock; hasher: SecretHasher; tokenPrefix: string; cacheSize: number; lastUse: LastUseRecorder; usage: UsageRecorder },
  ) {
    this.secrets = new SecretCheck({ hasher: deps.hasher, cacheSize: deps.cacheSize });
  }

  get stats(): VerifierStats {
    return this.secrets.stats;
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
    return digest !== undefined && this.secrets.knows(digest);
  }

  /** `clientIp` is the caller's address as TRUST_PROXY allows it to be known (Express's req.ip). */
  async verify(key: PresentedKey, clientIp: string): Promise<AuthContext> {
    const { parsed, digest } = key;
    if (!parsed || !digest) throw malformed();
    const row = await findCredentialBySelector(this.deps.db, parsed.selector);
    // The environment is part of the token: a live key respelt as kw_test_… (checksum recomputed) is
    // not that key, and must not pass for a test key or take the real spelling's place in the cache.
    const stored = row && row.environment === parsed.environment ? { id: row.token_id, secretHash: row.secret_hash } : undefined;
    if (!(await this.secrets.matches(stored, parsed.selector, parsed.secret, digest)) || !row) throw invalid();

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
        externalId: row.external_id,
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
        metadataJson: row.metadata,
        rateLimitPerMinute: row.token_rate_limit_per_minute,
      },
    };
  }

}
