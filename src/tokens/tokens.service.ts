import { createHash } from 'node:crypto';
import { isUniqueViolation, type Db, lockUserForUpdate, writeTransaction } from '../../db/database';
import type { TokenUpdate } from '../../db/schema';
import { type AuditContext, changes, recordAudit } from '../audit/audit';
import type { Clock } from '../clock';
import { AppError, conflict, type FieldProblem, notFound, validationError } from '../http/errors';
import { boundedJson } from '../http/json-limits';
import { type Page, type PageRequest, toPage } from '../http/pagination';
import { parseBodyTime, requestedExpiry } from '../http/validation';
import type { UsersService } from '../users/users.service';
import { allowlistFromBody, compiledAllowlist } from './ip-allowlist';
import type { LastUseRecorder } from './last-use';
import type { SecretHasher } from './secret-hasher';
import { insufficientScope, normalizeScopes, parseScopes, serializeScopes } from './scopes';
import { type Environment, generateToken, maskToken } from './token-format';
import * as tokens from './tokens.repository';
import type { TokenFilter, TokenMetadataRow, TokenStatus } from './tokens.repository';

export const DEFAULT_GRACE_PERIOD_SECONDS = 86_400;
export const MAX_GRACE_PERIOD_SECONDS = 7 * 86_400;

export interface TokenResponse {
  id: number;
  user_id: number;
  name: string | null;
  scopes: string[];
  environment: Environment;
  masked: string;
  status: TokenStatus;
  allowed_ips: string[] | null;
  /** The admin's object for the upstream; handed on by forward auth. Never a secret. */
  metadata: Record<string, unknown> | null;
  /** Requests a minute with this key, besides the user's limit; null: the user's limit only. */
  rate_limit_per_minute: number | null;
  created_at: string;
  expires_at: string | null;
  revoked_at: string | null;
  last_used_at: string | null;
  last_used_ip: string | null;
  rotated_from: number | null;
  rotated_to: number | null;
}

/** The only response that ever carries the token itself. */
export interface MintedTokenResponse extends TokenResponse {
  token: string;
}

export interface MintInput {
  name?: string | null;
  scopes?: string[];
  environment?: Environment;
  expires_in?: number;
  expires_at?: string;
  allowed_ips?: string[] | null;
  metadata?: Record<string, unknown> | null;
  rate_limit_per_minute?: number | null;
}

export interface UpdateInput {
  name?: string | null;
  scopes?: string[];
  allowed_ips?: string[] | null;
  expires_at?: string | null;
  metadata?: Record<string, unknown> | null;
  rate_limit_per_minute?: number | null;
}

/** A key's metadata travels in a header with every forwarded request: small and shallow. */
export const MAX_METADATA_BYTES = 1024;
export const MAX_METADATA_DEPTH = 5;
const serializeMetadata = (metadata: Record<string, unknown> | null | undefined) =>
  boundedJson('metadata', metadata, { maxBytes: MAX_METADATA_BYTES, maxDepth: MAX_METADATA_DEPTH });
export const parseMetadata = (stored: string | null): Record<string, unknown> | null => (stored === null ? null : (JSON.parse(stored) as Record<string, unknown>));

/**
 * Who is minting, rotating or managing a token. The admin may do anything within the deployment's
 * limits. A user key acts only on its own user's tokens and can never hand out more than it holds:
 * scopes, lifetime, environment and allowlist are each bounded by its own.
 */
export type Issuer =
  | { kind: 'admin' }
  | {
      kind: 'key';
      userId: number;
      scopes: readonly string[];
      environment: Environment;
      expiresAt: string | null;
      allowedIps: readonly string[] | null;
      /** The calling key's own limit; null: none (the user's only). */
      rateLimitPerMinute: number | null;
    };

export const ADMIN: Issuer = { kind: 'admin' };

export function tokenStatus(row: { revoked_at: string | null; expires_at: string | null }, now: string): TokenStatus {
  if (row.revoked_at !== null) return 'revoked';
  if (row.expires_at !== null && row.expires_at <= now) return 'expired';
  return 'active';
}

export const parseAllowedIps = (stored: string | null): string[] | null => (stored === null ? null : (JSON.parse(stored) as string[]));

const tokenTarget = (row: TokenMetadataRow) => ({ type: 'token' as const, id: row.id, userId: row.user_id });

/** What an audit entry records of a token: what it may do, never any part of its secret. */
function auditedFields(row: TokenMetadataRow): Record<string, unknown> {
  return {
    name: row.name,
    scopes: parseScopes(row.scopes),
    expires_at: row.expires_at,
    allowed_ips: parseAllowedIps(row.allowed_ips),
    rate_limit_per_minute: row.rate_limit_per_minute,
    // Not the content (the audit log is read by others than those who manage keys): that it changed.
    metadata: row.metadata === null ? null : { bytes: Buffer.byteLength(row.metadata), sha256: createHash('sha256').update(row.metadata).digest('hex').slice(0, 16) },
  };
}

const mintedFacts = (row: TokenMetadataRow) => ({ ...auditedFields(row), environment: row.environment, rotated_from: row.rotated_from });

const problem = (field: string, message: string): FieldProblem => ({ field, in: 'body', message });

export class TokensService {
  constructor(
    private readonly deps: {
      db: Db;
      clock: Clock;
      hasher: SecretHasher;
      tokenPrefix: string;
      users: UsersService;
      lastUse: LastUseRecorder;
      scopeCatalog: readonly string[];
      maxLifetimeSeconds: number | null;
      maxTokensPerUser: number;
    },
  ) {}

  toResponse(row: TokenMetadataRow, now = this.deps.clock.now().toISOString()): TokenResponse {
    const recent = this.deps.lastUse.pending(row.id);
    return {
      id: row.id,
      user_id: row.user_id,
      name: row.name,
      scopes: parseScopes(row.scopes),
      environment: row.environment,
      masked: maskToken(this.deps.tokenPrefix, row.environment, row.selector, row.last4),
      status: tokenStatus(row, now),
      allowed_ips: parseAllowedIps(row.allowed_ips),
      metadata: parseMetadata(row.metadata),
      rate_limit_per_minute: row.rate_limit_per_minute,
      created_at: row.created_at,
      expires_at: row.expires_at,
      revoked_at: row.revoked_at,
      last_used_at: recent?.at ?? row.last_used_at,
      last_used_ip: recent?.ip ?? row.last_used_ip,
      rotated_from: row.rotated_from,
      rotated_to: row.rotated_to,
    };
  }

  async mint(userId: number, input: MintInput, issuer: Issuer, audit: AuditContext): Promise<MintedTokenResponse> {
    const { clock, users, maxTokensPerUser } = this.deps;
    await users.requireRow(userId);
    const now = clock.now();
    const scopes = normalizeScopes(input.scopes, this.deps.scopeCatalog);
    const environment = input.environment ?? (issuer.kind === 'key' ? issuer.environment : 'live');
    const allowedIps = this.resolveAllowlist(input.allowed_ips, issuer);
    const expiresAt = this.resolveExpiry(input, now, issuer);
    this.checkWithinIssuer(issuer, scopes, environment);
    // The upstream trusts what metadata says about the caller: the caller cannot write it.
    if (issuer.kind !== 'admin' && input.metadata !== undefined) {
      throw validationError([problem('metadata', 'is set by the admin API only: the services behind forward auth trust it')]);
    }
    const metadata = serializeMetadata(input.metadata);
    const rateLimit = this.resolveRateLimit(input.rate_limit_per_minute, issuer);

    return this.insert(
      { userId, name: input.name ?? null, scopes, environment, allowedIps, metadata, rateLimit, now, expiresAt },
      async (trx) => {
        await lockUserForUpdate(trx, userId);
        const active = await tokens.countActiveTokensOfUser(trx, userId, now.toISOString());
        if (active >= maxTokensPerUser) {
          throw conflict(`This user already has ${active} active tokens, the most MAX_TOKENS_PER_USER allows; revoke one first.`, {
            limit: maxTokensPerUser,
            active,
          });
        }
      },
      async (trx, row) => {
        await recordAudit(trx, audit, row.created_at, { action: 'token.minted', target: tokenTarget(row), details: mintedFacts(row) });
      },
    );
  }

  /**
   * A new token with the same name, scopes, environment and allowlist, and the same lifetime counted
   * from now; the old one keeps working until the grace period ends (0: it stops now).
   */
  async rotate(id: number, gracePeriodSeconds: number | undefined, issuer: Issuer, audit: AuditContext): Promise<MintedTokenResponse> {
    const { clock, maxLifetimeSeconds } = this.deps;
    const old = await this.find(id, issuer);
    const now = clock.now();
    const nowIso = now.toISOString();
    const status = tokenStatus(old, nowIso);
    if (status !== 'active') throw conflict(`This token is ${status}; only an active token can be rotated. Mint a new one instead.`);
    if (old.rotated_to !== null) {
      throw conflict(`This token was already rotated to token ${old.rotated_to}; rotate that one instead.`, { rotated_to: old.rotated_to });
    }
    const scopes = parseScopes(old.scopes);
    const allowedIps = parseAllowedIps(old.allowed_ips);
    this.checkWithinIssuer(issuer, scopes, old.environment);
    if (issuer.kind === 'key' && issuer.allowedIps !== null && (allowedIps === null || !compiledAllowlist(JSON.stringify(issuer.allowedIps)).covers(allowedIps))) {
      throw new AppError(403, 'FORBIDDEN_IP', 'This token may be used from addresses this API key may not; it cannot rotate it.');
    }
    // Nor a key allowed more requests than the caller: rotating it would hand the caller its secret.
    if (issuer.kind === 'key' && issuer.rateLimitPerMinute !== null && (old.rate_limit_per_minute === null || old.rate_limit_per_minute > issuer.rateLimitPerMinute)) {
      throw new AppError(403, 'INSUFFICIENT_SCOPE', `This token may make more requests a minute than this API key (${issuer.rateLimitPerMinute}); it cannot rotate it.`);
    }

    let expiresMs = old.expires_at === null ? null : now.getTime() + (Date.parse(old.expires_at) - Date.parse(old.created_at));
    if (maxLifetimeSeconds !== null) expiresMs = Math.min(expiresMs ?? Infinity, now.getTime() + maxLifetimeSeconds * 1000);
    if (issuer.kind === 'key' && issuer.expiresAt !== null) expiresMs = Math.min(expiresMs ?? Infinity, Date.parse(issuer.expiresAt));
    const grace = gracePeriodSeconds ?? DEFAULT_GRACE_PERIOD_SECONDS;
    const oldEnds = new Date(Math.min(now.getTime() + grace * 1000, old.expires_at === null ? Infinity : Date.parse(old.expires_at))).toISOString();

    return this.insert(
      {
        userId: old.user_id,
        name: old.name,
        scopes,
        environment: old.environment,
        allowedIps,
        metadata: old.metadata,
        rateLimit: old.rate_limit_per_minute,
        now,
        expiresAt: expiresMs === null ? null : new Date(expiresMs).toISOString(),
        rotatedFrom: old.id,
      },
      undefined,
      async (trx, successor) => {
        const current = await tokens.findTokenById(trx, old.id);
        if (!(await tokens.markRotated(trx, old.id, successor.id, oldEnds))) {
          throw conflict('This token was rotated or revoked at the same moment; list the tokens and try again.');
        }
        await recordAudit(trx, audit, nowIso, {
          action: 'token.rotated',
          target: tokenTarget(old),
          details: { successor_id: successor.id, grace_period_seconds: grace, expires_at: { old: current?.expires_at ?? null, new: oldEnds }, successor: mintedFacts(successor) },
        });
      },
    );
  }

  async update(id: number, input: UpdateInput, audit: AuditContext): Promise<TokenResponse> {
    const { db, clock, maxLifetimeSeconds } = this.deps;
    const row = await this.find(id, ADMIN);
    const nowIso = clock.now().toISOString();
    const status = tokenStatus(row, nowIso);
    if (status !== 'active') throw conflict(`This token is ${status} and cannot be changed; mint a new one instead.`);
    // A token rotated out lives only for its grace period: its end may come sooner, never later.
    if (
      row.rotated_to !== null &&
      input.expires_at !== undefined &&
      (input.expires_at === null || parseBodyTime('expires_at', input.expires_at) > Date.parse(row.expires_at!))
    ) {
      throw conflict(`This token was rotated to token ${row.rotated_to}; its grace period cannot be extended.`, { rotated_to: row.rotated_to });
    }

    const patch: TokenUpdate = {};
    const problems: FieldProblem[] = [];
    if (input.name !== undefined) patch.name = input.name;
    if (input.scopes !== undefined) patch.scopes = serializeScopes(normalizeScopes(input.scopes, this.deps.scopeCatalog));
    if (input.allowed_ips !== undefined) {
      const allowed = this.resolveAllowlist(input.allowed_ips, ADMIN);
      patch.allowed_ips = allowed === null ? null : JSON.stringify(allowed);
    }
    if (input.metadata !== undefined) patch.metadata = serializeMetadata(input.metadata);
    if (input.rate_limit_per_minute !== undefined) patch.rate_limit_per_minute = input.rate_limit_per_minute;
    if (input.expires_at !== undefined) {
      const cap = maxLifetimeSeconds === null ? null : Date.parse(row.created_at) + maxLifetimeSeconds * 1000;
      if (input.expires_at === null) {
        if (cap !== null) problems.push(problem('expires_at', `cannot be removed: MAX_TOKEN_LIFETIME caps tokens at ${maxLifetimeSeconds} seconds`));
        patch.expires_at = null;
      } else {
        const at = parseBodyTime('expires_at', input.expires_at);
        if (at <= Date.parse(nowIso)) problems.push(problem('expires_at', 'must be in the future'));
        else if (cap !== null && at > cap) {
          problems.push(problem('expires_at', `must be at most ${new Date(cap).toISOString()} (MAX_TOKEN_LIFETIME after the token was created)`));
        }
        patch.expires_at = new Date(at).toISOString();
      }
    }
    if (problems.length > 0) throw validationError(problems);
    const updated = await writeTransaction(db, async (trx) => {
      // The entry compares with the row as this transaction sees it, not the read above: another
      // change may have landed in between.
      const before = await tokens.findTokenById(trx, id);
      const after = await tokens.updateToken(trx, id, patch);
      if (!before || !after) throw notFound('Token');
      const changed = changes(auditedFields(before), auditedFields(after));
      if (Object.keys(changed).length > 0) await recordAudit(trx, audit, nowIso, { action: 'token.updated', target: tokenTarget(after), details: changed });
      return after;
    });
    return this.toResponse(updated, nowIso);
  }

  async list(filter: TokenFilter, page: PageRequest): Promise<Page<TokenResponse>> {
    if (filter.userId !== undefined) await this.deps.users.requireRow(filter.userId);
    const now = this.deps.clock.now().toISOString();
    let usedIds: number[] = [];
    if (filter.neverUsed !== undefined) {
      // Listings show a use before it is written (toResponse reads `pending`), and never_used must agree
      // with the last_used_at they show. Writing what is pending first keeps the id list below short;
      // what is still pending after it (a failed flush, a use that came in meanwhile) is passed along.
      await this.deps.lastUse.flush();
      usedIds = this.deps.lastUse.pendingIds();
    }
    return toPage(await tokens.listTokens(this.deps.db, filter, page, now, usedIds), page, (row) => this.toResponse(row, now));
  }

  async get(id: number, issuer: Issuer = ADMIN): Promise<TokenResponse> {
    return this.toResponse(await this.find(id, issuer));
  }

  /** Recorded, not deleted: the next request with the token is told it was revoked. */
  async revoke(id: number, issuer: Issuer, audit: AuditContext): Promise<void> {
    const row = await this.find(id, issuer);
    const now = this.deps.clock.now().toISOString();
    await writeTransaction(this.deps.db, async (trx) => {
      // Revoking again changes nothing, and records nothing.
      if (await tokens.revokeToken(trx, id, now)) await recordAudit(trx, audit, now, { action: 'token.revoked', target: tokenTarget(row) });
    });
  }

  /** A user key asking for another user's token gets the same 404 as for a token that does not exist. */
  private async find(id: number, issuer: Issuer): Promise<TokenMetadataRow> {
    const row = await tokens.findTokenById(this.deps.db, id);
    if (!row || (issuer.kind === 'key' && row.user_id !== issuer.userId)) throw notFound('Token');
    return row;
  }

  private checkWithinIssuer(issuer: Issuer, scopes: readonly string[], environment: Environment): void {
    if (issuer.kind !== 'key') return;
    const missing = scopes.filter((s) => !issuer.scopes.includes(s));
    if (missing.length > 0) {
      throw insufficientScope(missing, `An API key can only grant scopes it has itself; it lacks ${missing.join(', ')}.`);
    }
    if (environment === 'live' && issuer.environment === 'test') {
      throw validationError([problem('environment', 'a test key can only mint and rotate test keys')]);
    }
  }

  /**
   * A key's own limit. A key minting one never hands out more than it may do itself: at or below its
   * own limit, which a new key without one inherits.
   */
  private resolveRateLimit(requested: number | null | undefined, issuer: Issuer): number | null {
    const own = issuer.kind === 'key' ? issuer.rateLimitPerMinute : null;
    if (requested === undefined) return own;
    if (own === null) return requested;
    if (requested === null) throw validationError([problem('rate_limit_per_minute', `cannot be null: this API key may make ${own} requests a minute, and keys it mints stay within it`)]);
    if (requested > own) throw validationError([problem('rate_limit_per_minute', `must be at most ${own}, this API key's own limit`)]);
    return requested;
  }

  private resolveAllowlist(requested: string[] | null | undefined, issuer: Issuer): string[] | null {
    const inherited = issuer.kind === 'key' ? issuer.allowedIps : null;
    if (requested === undefined) return inherited === null ? null : [...inherited];
    if (requested === null) {
      if (inherited !== null) throw validationError([problem('allowed_ips', 'cannot be null: this API key has an allowlist, and keys it mints stay within it')]);
      return null;
    }
    const entries = allowlistFromBody(requested);
    if (inherited !== null && !compiledAllowlist(JSON.stringify(inherited)).covers(entries)) {
      throw validationError([problem('allowed_ips', `must stay within this API key's own allowlist (${inherited.join(', ')})`)]);
    }
    return entries;
  }

  private resolveExpiry(input: MintInput, now: Date, issuer: Issuer): string | null {
    const { maxLifetimeSeconds } = this.deps;
    const { at: requested, field } = requestedExpiry(input, now);
    const cap = maxLifetimeSeconds === null ? null : now.getTime() + maxLifetimeSeconds * 1000;
    if (requested !== null && cap !== null && requested > cap) {
      throw validationError([problem(field, `must be at most ${maxLifetimeSeconds} seconds from now (MAX_TOKEN_LIFETIME)`)]);
    }
    const ceiling = issuer.kind === 'key' && issuer.expiresAt !== null ? Date.parse(issuer.expiresAt) : null;
    if (requested !== null && ceiling !== null && requested > ceiling) {
      throw validationError([problem(field, `cannot outlive the API key that mints it (it expires at ${issuer.kind === 'key' ? issuer.expiresAt : ''})`)]);
    }
    // Without a requested expiry, the tightest bound that applies, if any.
    const expires = requested ?? [cap, ceiling].filter((v): v is number => v !== null).reduce<number | null>((a, b) => (a === null ? b : Math.min(a, b)), null);
    return expires === null ? null : new Date(expires).toISOString();
  }

  private async insert(
    token: {
      userId: number;
      name: string | null;
      scopes: readonly string[];
      environment: Environment;
      allowedIps: readonly string[] | null;
      metadata: string | null;
      rateLimit: number | null;
      now: Date;
      expiresAt: string | null;
      rotatedFrom?: number;
    },
    before?: (trx: Parameters<typeof tokens.insertToken>[0]) => Promise<void>,
    after?: (trx: Parameters<typeof tokens.insertToken>[0], row: TokenMetadataRow) => Promise<void>,
  ): Promise<MintedTokenResponse> {
    const { db, hasher, tokenPrefix } = this.deps;
    // bcrypt runs before the transaction, so no write lock is held while it works.
    // A selector collision (62^12 values) is astronomically unlikely; retrying keeps it a non-event.
    for (let attempt = 1; ; attempt++) {
      const minted = generateToken(tokenPrefix, token.environment);
      const secretHash = await hasher.hash(minted.secret);
      try {
        const row = await writeTransaction(db, async (trx) => {
          await before?.(trx);
          const inserted = await tokens.insertToken(trx, {
            user_id: token.userId,
            name: token.name,
            selector: minted.selector,
            secret_hash: secretHash,
            last4: minted.last4,
            environment: token.environment,
            scopes: serializeScopes(token.scopes),
            created_at: token.now.toISOString(),
            expires_at: token.expiresAt,
            revoked_at: null,
            allowed_ips: token.allowedIps === null ? null : JSON.stringify(token.allowedIps),
            metadata: token.metadata,
            rate_limit_per_minute: token.rateLimit,
            rotated_from: token.rotatedFrom ?? null,
          });
          await after?.(trx, inserted);
          return inserted;
        });
        return { ...this.toResponse(row, token.now.toISOString()), token: minted.token };
      } catch (err) {
        if (!isUniqueViolation(err) || attempt >= 3) throw err;
      }
    }
  }
}
