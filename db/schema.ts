import type { Generated, Insertable, Selectable, Updateable } from 'kysely';

/**
 * Times are ISO 8601 UTC strings with milliseconds (`2026-11-23T02:54:32.123Z`): they sort as text,
 * read the same in SQLite and PostgreSQL, and need no driver-specific parsing.
 */
export interface UsersTable {
  id: Generated<number>;
  email: string;
  /** Lower-cased email, unique; NULL once the user is deleted so the address can be used again. */
  email_lower: string | null;
  name: string | null;
  max_concurrent_bots: number;
  /** JSON text of the self-hoster's free-form object. */
  data: string | null;
  disabled_at: string | null;
  deleted_at: string | null;
  created_at: string;
  updated_at: string;
  /** Requests a minute on /v1; 0 blocks. Never NULL: there is no implicit "unlimited". */
  rate_limit_per_minute: Generated<number>;
  /** The person's subject at the identity provider (SSO), unique; NULL when not linked. */
  sso_subject: string | null;
}

export interface TokensTable {
  id: Generated<number>;
  user_id: number;
  name: string | null;
  /** Public part of the token, unique: the one indexed lookup that finds it. */
  selector: string;
  /** bcrypt hash of the secret part; the token itself is never stored. */
  secret_hash: string;
  last4: string;
  environment: 'live' | 'test';
  /** Space-separated scope names. */
  scopes: string;
  created_at: string;
  expires_at: string | null;
  revoked_at: string | null;
  /** JSON array of addresses and CIDR ranges the token may be used from; NULL means anywhere. */
  allowed_ips: string | null;
  /** The token this one replaced by rotation, and the one that replaced it. */
  rotated_from: number | null;
  rotated_to: number | null;
  /** Written in batches by the last-use recorder, never on the request path. */
  last_used_at: string | null;
  last_used_ip: string | null;
}

export type BotStatus = 'active' | 'released' | 'expired';

/** A lease on one of a user's `max_concurrent_bots` slots. */
export interface BotsTable {
  id: Generated<number>;
  user_id: number;
  /** The key that acquired it. */
  token_id: number | null;
  platform: string | null;
  native_meeting_id: string | null;
  label: string | null;
  /** JSON text of the runner's free-form object. */
  metadata: string | null;
  /** 'active' until released or expired; an active row past expires_at is expired, swept or not. */
  status: BotStatus;
  ttl_seconds: number;
  created_at: string;
  heartbeat_at: string;
  expires_at: string;
  ended_at: string | null;
  /** Who ended it: 'user' (release), 'admin' (force release) or 'expiry'. */
  ended_by: 'user' | 'admin' | 'expiry' | null;
}

export interface Database {
  users: UsersTable;
  tokens: TokensTable;
  bots: BotsTable;
}

export type UserRow = Selectable<UsersTable>;
export type NewUserRow = Insertable<UsersTable>;
export type UserUpdate = Updateable<UsersTable>;
export type TokenRow = Selectable<TokensTable>;
export type NewTokenRow = Insertable<TokensTable>;
export type TokenUpdate = Updateable<TokensTable>;
export type BotRow = Selectable<BotsTable>;
export type NewBotRow = Insertable<BotsTable>;
