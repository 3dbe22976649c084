import { type Db, hotRead } from '../../db/database';
import type { NewTokenRow, TokenRow, TokenUpdate } from '../../db/schema';
import type { PageRequest } from '../http/pagination';

/** Token metadata as listings show it: every column except the secret's hash. */
export type TokenMetadataRow = Omit<TokenRow, 'secret_hash'>;

const METADATA_COLUMNS = [
  'id',
  'user_id',
  'name',
  'selector',
  'last4',
  'environment',
  'scopes',
  'created_at',
  'expires_at',
  'revoked_at',
  'allowed_ips',
  'rotated_from',
  'rotated_to',
  'last_used_at',
  'last_used_ip',
  'metadata',
  'rate_limit_per_minute',
] as const;

export async function insertToken(db: Db, row: NewTokenRow): Promise<TokenMetadataRow> {
  return db.insertInto('tokens').values(row).returning(METADATA_COLUMNS).executeTakeFirstOrThrow();
}

export async function findTokenById(db: Db, id: number): Promise<TokenMetadataRow | undefined> {
  return db.selectFrom('tokens').select(METADATA_COLUMNS).where('id', '=', id).executeTakeFirst();
}

export type TokenStatus = 'active' | 'expired' | 'revoked';

export interface TokenFilter {
  userId?: number;
  status?: TokenStatus;
  environment?: 'live' | 'test';
  /** true: only tokens with no last use; false: only tokens used at least once. */
  neverUsed?: boolean;
  /** Only tokens with an expires_at strictly before this time (ISO, UTC, milliseconds). */
  expiresBefore?: string;
}

/**
 * Keyset-paginated by id; `now` decides which tokens count as expired. `usedIds`: tokens whose last use
 * is recorded but may not be written yet, used as far as `neverUsed` is concerned.
 */
export async function listTokens(db: Db, filter: TokenFilter, page: PageRequest, now: string, usedIds: readonly number[] = []): Promise<TokenMetadataRow[]> {
  let query = db.selectFrom('tokens').select(METADATA_COLUMNS).where('id', '>', page.afterId);
  if (filter.userId !== undefined) query = query.where('user_id', '=', filter.userId);
  if (filter.environment !== undefined) query = query.where('environment', '=', filter.environment);
  if (filter.neverUsed === true) {
    query = query.where('last_used_at', 'is', null);
    if (usedIds.length > 0) query = query.where('id', 'not in', usedIds);
  }
  if (filter.neverUsed === false) {
    query = query.where((eb) => eb.or([eb('last_used_at', 'is not', null), ...(usedIds.length > 0 ? [eb('id', 'in', usedIds)] : [])]));
  }
  // A token without expiry (null) is before no time: the comparison leaves it out on both databases.
  if (filter.expiresBefore !== undefined) query = query.where('expires_at', '<', filter.expiresBefore);
  if (filter.status === 'revoked') query = query.where('revoked_at', 'is not', null);
  if (filter.status === 'expired') query = query.where('revoked_at', 'is', null).where('expires_at', '<=', now);
  if (filter.status === 'active') {
    query = query.where('revoked_at', 'is', null).where((eb) => eb.or([eb('expires_at', 'is', null), eb('expires_at', '>', now)]));
  }
  return query.orderBy('id').limit(page.limit + 1).execute();
}

/**
 * Tokens that count against MAX_TOKENS_PER_USER: neither revoked nor expired, and not already replaced
 * by rotation (those are on their way out at the end of their grace period).
 */
export async function countActiveTokensOfUser(db: Db, userId: number, now: string): Promise<number> {
  const { n } = await db
    .selectFrom('tokens')
    .select((eb) => eb.fn.countAll<number>().as('n'))
    .where('user_id', '=', userId)
    .where('revoked_at', 'is', null)
    .where('rotated_to', 'is', null)
    .where((eb) => eb.or([eb('expires_at', 'is', null), eb('expires_at', '>', now)]))
    .executeTakeFirstOrThrow();
  return Number(n);
}

export async function updateToken(db: Db, id: number, changes: TokenUpdate): Promise<TokenMetadataRow | undefined> {
  return db.updateTable('tokens').set(changes).where('id', '=', id).returning(METADATA_COLUMNS).executeTakeFirst();
}

/**
 * Links a token to its successor and shortens its life to the grace period, only if nobody rotated or
 * revoked it meanwhile. Returns false when the guard did not match.
 */
export async function markRotated(db: Db, id: number, successorId: number, expiresAt: string): Promise<boolean> {
  const result = await db
    .updateTable('tokens')
    .set({ rotated_to: successorId, expires_at: expiresAt })
    .where('id', '=', id)
    .where('rotated_to', 'is', null)
    .where('revoked_at', 'is', null)
    .executeTakeFirst();
  return result.numUpdatedRows === 1n;
}

/** Idempotent: a token already revoked keeps the time it was first revoked. */
/** False when it was already revoked. */
export async function revokeToken(db: Db, id: number, now: string): Promise<boolean> {
  const result = await db.updateTable('tokens').set({ revoked_at: now }).where('id', '=', id).where('revoked_at', 'is', null).executeTakeFirst();
  return result.numUpdatedRows === 1n;
}

/** Returns how many were still unrevoked. */
export async function revokeAllTokensOfUser(db: Db, userId: number, now: string): Promise<number> {
  const result = await db.updateTable('tokens').set({ revoked_at: now }).where('user_id', '=', userId).where('revoked_at', 'is', null).executeTakeFirst();
  return Number(result.numUpdatedRows);
}

/** What verifying a request needs, in one indexed lookup by selector. */
export interface CredentialRow {
  token_id: number;
  token_name: string | null;
  secret_hash: string;
  environment: 'live' | 'test';
  scopes: string;
  last4: string;
  expires_at: string | null;
  revoked_at: string | null;
  allowed_ips: string | null;
  metadata: string | null;
  token_rate_limit_per_minute: number | null;
  user_id: number;
  email: string;
  user_name: string | null;
  max_concurrent_bots: number;
  rate_limit_per_minute: number;
  external_id: string | null;
  disabled_at: string | null;
  deleted_at: string | null;
}

// This lookup runs on every authenticated request. Building and compiling the query costs more than
// executing it, so it is compiled once per database (by that database's own dialect, so it stays
// portable) and run through the seam's hot-read path with the selector as its only parameter.
const compiledLookups = new WeakMap<Db, (parameters: readonly unknown[]) => Promise<CredentialRow | undefined>>();

export async function findCredentialBySelector(db: Db, selector: string): Promise<CredentialRow | undefined> {
  let lookup = compiledLookups.get(db);
  if (lookup === undefined) {
    const compiled = credentialQuery(db, selector).compile();
    if (compiled.parameters.length !== 1) throw new Error('the credential lookup must take exactly one parameter');
    lookup = hotRead<CredentialRow>(db, compiled);
    compiledLookups.set(db, lookup);
  }
  return lookup([selector]);
}

function credentialQuery(db: Db, selector: string) {
  return db
    .selectFrom('tokens')
    .innerJoin('users', 'users.id', 'tokens.user_id')
    .select([
      'tokens.id as token_id',
      'tokens.name as token_name',
      'tokens.secret_hash',
      'tokens.environment',
      'tokens.scopes',
      'tokens.last4',
      'tokens.expires_at',
      'tokens.revoked_at',
      'tokens.allowed_ips',
      'tokens.metadata',
      'tokens.rate_limit_per_minute as token_rate_limit_per_minute',
      'users.id as user_id',
      'users.email',
      'users.name as user_name',
      'users.max_concurrent_bots',
      'users.rate_limit_per_minute',
      'users.external_id',
      'users.disabled_at',
      'users.deleted_at',
    ])
    .where('tokens.selector', '=', selector);
}
