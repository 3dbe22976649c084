import { type Db, hotRead } from '../../db/database';
import type { NewTokenRow, TokenRow } from '../../db/schema';
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
] as const;

export async function insertToken(db: Db, row: NewTokenRow): Promise<TokenMetadataRow> {
  return db.insertInto('tokens').values(row).returning(METADATA_COLUMNS).executeTakeFirstOrThrow();
}

export async function findTokenById(db: Db, id: number): Promise<TokenMetadataRow | undefined> {
  return db.selectFrom('tokens').select(METADATA_COLUMNS).where('id', '=', id).executeTakeFirst();
}

export async function listTokensOfUser(db: Db, userId: number, page: PageRequest): Promise<TokenMetadataRow[]> {
  return db
    .selectFrom('tokens')
    .select(METADATA_COLUMNS)
    .where('user_id', '=', userId)
    .where('id', '>', page.afterId)
    .orderBy('id')
    .limit(page.limit + 1)
    .execute();
}

/** Idempotent: a token already revoked keeps the time it was first revoked. */
export async function revokeToken(db: Db, id: number, now: string): Promise<void> {
  await db.updateTable('tokens').set({ revoked_at: now }).where('id', '=', id).where('revoked_at', 'is', null).execute();
}

export async function revokeAllTokensOfUser(db: Db, userId: number, now: string): Promise<void> {
  await db.updateTable('tokens').set({ revoked_at: now }).where('user_id', '=', userId).where('revoked_at', 'is', null).execute();
}

/** What verifying a request needs, in one indexed lookup by selector. */
export interface CredentialRow {
  token_id: number;
  token_name: string | null;
  secret_hash: string;
  environment: string;
  scopes: string;
  last4: string;
  expires_at: string | null;
  revoked_at: string | null;
  user_id: number;
  email: string;
  user_name: string | null;
  max_concurrent_bots: number;
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
      'users.id as user_id',
      'users.email',
      'users.name as user_name',
      'users.max_concurrent_bots',
      'users.disabled_at',
      'users.deleted_at',
    ])
    .where('tokens.selector', '=', selector);
}
