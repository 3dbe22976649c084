import { actorId, type AuditContext, recordAudit } from '../audit/audit';
import { type Db, isUniqueViolation, writeTransaction } from '../../db/database';
import type { Clock } from '../clock';
import { conflict, type FieldProblem, notFound, validationError } from '../http/errors';
import { type Page, type PageRequest, toPage } from '../http/pagination';
import { requestedExpiry } from '../http/validation';
import { allowlistFromBody } from '../tokens/ip-allowlist';
import type { LastUseRecorder } from '../tokens/last-use';
import { insufficientScope, parseScopes, serializeScopes } from '../tokens/scopes';
import type { SecretHasher } from '../tokens/secret-hasher';
import { generateToken, maskToken } from '../tokens/token-format';
import type { AdminIdentity } from './admin-key-verifier';
import { ADMIN_SCOPES, isAdminScope } from './admin-scopes';
import type { TokenStatus } from '../tokens/tokens.repository';
import { parseAllowedIps, tokenStatus } from '../tokens/tokens.service';
import * as adminKeys from './admin-keys.repository';
import type { AdminKeyMetadataRow } from './admin-keys.repository';

export interface AdminKeyResponse {
  id: number;
  name: string;
  scopes: string[];
  masked: string;
  status: TokenStatus;
  allowed_ips: string[] | null;
  created_at: string;
  created_by: string;
  expires_at: string | null;
  revoked_at: string | null;
  last_used_at: string | null;
  last_used_ip: string | null;
}

/** The only response that ever carries the key itself. */
export interface CreatedAdminKeyResponse extends AdminKeyResponse {
  key: string;
}

export interface CreateAdminKeyInput {
  name: string;
  scopes: string[];
  expires_in?: number;
  expires_at?: string;
  allowed_ips?: string[] | null;
}

const problem = (field: string, message: string): FieldProblem => ({ field, in: 'body', message });

const target = (row: AdminKeyMetadataRow) => ({ type: 'admin_key' as const, id: row.id, userId: null });

/** What the audit log records of an admin key: what it may do, never any part of its secret. */
const auditedFields = (row: AdminKeyMetadataRow) => ({
  name: row.name,
  scopes: parseScopes(row.scopes),
  expires_at: row.expires_at,
  allowed_ips: parseAllowedIps(row.allowed_ips),
});

/**
 * Named admin keys: minted by an admin credential holding admin-keys:write, within what that
 * credential may do itself (its scopes, its expiry), shown once, revoked for good.
 */
export class AdminKeysService {
  constructor(
    private readonly deps: { db: Db; clock: Clock; hasher: SecretHasher; tokenPrefix: string; lastUse: LastUseRecorder; maxAdminKeys: number },
  ) {}

  toResponse(row: AdminKeyMetadataRow, now = this.deps.clock.now().toISOString()): AdminKeyResponse {
    const recent = this.deps.lastUse.pending(row.id);
    return {
      id: row.id,
      name: row.name,
      scopes: parseScopes(row.scopes),
      masked: maskToken(this.deps.tokenPrefix, 'admin', row.selector, row.last4),
      status: tokenStatus(row, now),
      allowed_ips: parseAllowedIps(row.allowed_ips),
      created_at: row.created_at,
      created_by: row.created_by,
      expires_at: row.expires_at,
      revoked_at: row.revoked_at,
      last_used_at: recent?.at ?? row.last_used_at,
      last_used_ip: recent?.ip ?? row.last_used_ip,
    };
  }

  async create(input: CreateAdminKeyInput, issuer: AdminIdentity, audit: AuditContext): Promise<CreatedAdminKeyResponse> {
    const { db, clock, hasher, tokenPrefix, maxAdminKeys } = this.deps;
    const now = clock.now();
    const nowIso = now.toISOString();
    const name = input.name.trim();
    if (name === '') throw validationError([problem('name', 'must not be blank')]);
    const scopes = this.resolveScopes(input.scopes, issuer);
    const expiresAt = resolveExpiry(input, now, issuer);
    const allowedIps = input.allowed_ips === undefined || input.allowed_ips === null ? null : allowlistFromBody(input.allowed_ips);

    // bcrypt runs before the transaction, so no write lock is held while it works; a selector
    // collision (62^12 values) is retried, a name taken is the caller's 409.
    for (let attempt = 1; ; attempt++) {
      const minted = generateToken(tokenPrefix, 'admin');
      const secretHash = await hasher.hash(minted.secret);
      try {
        const row = await writeTransaction(db, async (trx) => {
          await adminKeys.retireExpiredByName(trx, name, nowIso);
          if (await adminKeys.nameIsTaken(trx, name)) {
            throw conflict(`An active admin key is already named "${name}"; pick another name or revoke that key first.`, { name });
          }
          const active = await adminKeys.countActiveAdminKeys(trx, nowIso);
          if (active >= maxAdminKeys) {
            throw conflict(`There are already ${active} active admin keys, the most MAX_ADMIN_KEYS allows; revoke one first.`, { limit: maxAdminKeys, active });
          }
          const inserted = await adminKeys.insertAdminKey(trx, {
            name,
            selector: minted.selector,
            secret_hash: secretHash,
            last4: minted.last4,
            scopes: serializeScopes(scopes),
            allowed_ips: allowedIps === null ? null : JSON.stringify(allowedIps),
            created_at: nowIso,
            expires_at: expiresAt,
            created_by: actorId(issuer.actor),
          });
          await recordAudit(trx, audit, nowIso, { action: 'admin_key.created', target: target(inserted), details: auditedFields(inserted) });
          return inserted;
        });
        return { ...this.toResponse(row, nowIso), key: minted.token };
      } catch (err) {
        // A name taken by another instance at the same moment, or a selector collision: the next
        // attempt finds which, and answers 409 for the name.
        if (!isUniqueViolation(err) || attempt >= 3) throw err;
      }
    }
  }

  async list(page: PageRequest): Promise<Page<AdminKeyResponse>> {
    const now = this.deps.clock.now().toISOString();
    return toPage(await adminKeys.listAdminKeys(this.deps.db, page), page, (row) => this.toResponse(row, now));
  }

  async get(id: number): Promise<AdminKeyResponse> {
    const row = await adminKeys.findAdminKeyById(this.deps.db, id);
    if (!row) throw notFound('Admin key');
    return this.toResponse(row);
  }

  /** Recorded, not deleted: the next request with the key is told it was revoked. */
  async revoke(id: number, audit: AuditContext): Promise<void> {
    const row = await adminKeys.findAdminKeyById(this.deps.db, id);
    if (!row) throw notFound('Admin key');
    const now = this.deps.clock.now().toISOString();
    await writeTransaction(this.deps.db, async (trx) => {
      // Revoking again changes nothing, and records nothing.
      if (await adminKeys.revokeAdminKey(trx, id, now)) await recordAudit(trx, audit, now, { action: 'admin_key.revoked', target: target(row) });
    });
  }

  /** Known admin scopes, folded and sorted, and only ones the issuer holds itself. */
  private resolveScopes(requested: string[], issuer: AdminIdentity): string[] {
    if (requested.length === 0) throw validationError([problem('scopes', 'must name at least one admin scope')]);
    const unknown = [...new Set(requested.filter((s) => !isAdminScope(s)))];
    if (unknown.length > 0) {
      throw validationError(unknown.map((s) => problem('scopes', `unknown admin scope "${s}"; valid scopes are ${ADMIN_SCOPES.join(', ')}`)));
    }
    const scopes = [...new Set(requested)].sort();
    const missing = scopes.filter((s) => !(issuer.scopes as readonly string[]).includes(s));
    if (missing.length > 0) throw insufficientScope(missing, `An admin key can only grant scopes it has itself; it lacks ${missing.join(', ')}.`);
    return scopes;
  }
}

/** Never later than the issuer's own end; without a requested one, the issuer's end if it has one. */
function resolveExpiry(input: CreateAdminKeyInput, now: Date, issuer: AdminIdentity): string | null {
  const { at: requested, field } = requestedExpiry(input, now);
  const ceiling = issuer.expiresAt === null ? null : Date.parse(issuer.expiresAt);
  if (requested !== null && ceiling !== null && requested > ceiling) {
    throw validationError([problem(field, `cannot outlive the admin key that mints it (it expires at ${issuer.expiresAt})`)]);
  }
  const expires = requested ?? ceiling;
  return expires === null ? null : new Date(expires).toISOString();
}
