import { createHash } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import type { Db } from '../../db/database';
import type { Actor } from '../audit/audit';
import { SecretCheck } from '../auth/secret-check';
import { type Clock, isoNow } from '../clock';
import { AppError } from '../http/errors';
import { contextOf } from '../http/request-context';
import { compiledAllowlist, normalizeClientIp } from '../tokens/ip-allowlist';
import type { LastUseRecorder } from '../tokens/last-use';
import { parseScopes } from '../tokens/scopes';
import type { SecretHasher } from '../tokens/secret-hasher';
import { parseAdminKey } from '../tokens/token-format';
import { type AdminScope, ADMIN_SCOPES } from './admin-scopes';
import { findAdminKeyBySelector } from './admin-keys.repository';

/** Who is calling /admin, and what they may do: the root key, a named admin key, or (later) a person. */
export interface AdminIdentity {
  actor: Actor;
  scopes: readonly AdminScope[];
  /** The credential's own end, which keys it mints may not outlive; null: none. */
  expiresAt: string | null;
}

export const rootIdentity = (actor: Actor): AdminIdentity => ({ actor, scopes: ADMIN_SCOPES, expiresAt: null });

export const adminIdentityOf = (res: ServerResponse): AdminIdentity => contextOf(res).admin as AdminIdentity;

/** An admin key as sent, parsed and hashed once per request; null `parsed`: not an admin key's format. */
export interface PresentedAdminKey {
  parsed: { selector: string; secret: string } | null;
  digest: Buffer;
}

const invalidAdminKey = () => new AppError(401, 'INVALID_ADMIN_KEY', 'The admin key is not valid.');

/**
 * Admin keys are verified exactly as user tokens are (product.md): checksum first, one indexed lookup
 * by selector on every request (revocation and expiry take effect on the next one), bcrypt once per
 * key per process, then sha256 of the whole key against the remembered digest; an unknown selector
 * costs the same bcrypt against a decoy. The secret check is the user tokens' own code, with a cache
 * of its own.
 */
export class AdminKeyVerifier {
  private readonly secrets: SecretCheck;

  constructor(private readonly deps: { db: Db; clock: Clock; hasher: SecretHasher; tokenPrefix: string; lastUse: LastUseRecorder }) {
    this.secrets = new SecretCheck({ hasher: deps.hasher, cacheSize: 10_000 });
  }

  /** `digest`: sha256 of `text`, when the caller has already computed it. */
  present(text: string, digest = createHash('sha256').update(text).digest()): PresentedAdminKey {
    return { parsed: parseAdminKey(text, this.deps.tokenPrefix), digest };
  }

  /** Verified before by this process (no lookup, no bcrypt): an address blocked for wrong keys may still use it. */
  knows(key: PresentedAdminKey): boolean {
    return key.parsed !== null && this.secrets.knows(key.digest);
  }

  async verify(key: PresentedAdminKey, clientIp: string): Promise<AdminIdentity> {
    const { parsed, digest } = key;
    if (!parsed) throw invalidAdminKey();
    const row = await findAdminKeyBySelector(this.deps.db, parsed.selector);
    const stored = row ? { id: row.id, secretHash: row.secret_hash } : undefined;
    if (!(await this.secrets.matches(stored, parsed.selector, parsed.secret, digest)) || !row) throw invalidAdminKey();
    // State only after the secret: nobody learns a key's state without holding it.
    if (row.revoked_at !== null) throw new AppError(401, 'ADMIN_KEY_REVOKED', 'The admin key has been revoked.');
    if (row.expires_at !== null && row.expires_at <= isoNow(this.deps.clock)) throw new AppError(401, 'ADMIN_KEY_EXPIRED', 'The admin key has expired.');
    if (row.allowed_ips !== null && !compiledAllowlist(row.allowed_ips).allows(clientIp)) {
      const shown = normalizeClientIp(clientIp);
      throw new AppError(403, 'FORBIDDEN_IP', `This admin key may not be used from ${shown}.`, { ip: shown });
    }
    this.deps.lastUse.record(row.id, normalizeClientIp(clientIp));
    return { actor: { type: 'admin_key', id: row.id, name: row.name }, scopes: parseScopes(row.scopes) as AdminScope[], expiresAt: row.expires_at };
  }
}
