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
  /** Balance spent by bot starts when CREDITS_PER_BOT is set; never negative. */
  credits: Generated<number>;
  /** The platform's own account id (printable ASCII, up to 256), unique among users not deleted. */
  external_id: string | null;
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
  /** JSON text of the admin's object for the upstream (forward auth), at most 1 KiB; never a secret. */
  metadata: string | null;
  /** Requests a minute with this key, besides the user's limit; NULL: the user's limit only. */
  rate_limit_per_minute: number | null;
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

/** One entry of the append-only audit log, written in the transaction of the change it describes. */
export interface AuditEventsTable {
  id: Generated<number>;
  at: string;
  actor_type: 'admin' | 'admin_key' | 'key' | 'sso' | 'anonymous' | 'system';
  actor_id: string;
  actor_user_id: number | null;
  actor_token_id: number | null;
  actor_email: string | null;
  /** An admin key's name when it made the change (it may be renamed or reused later: this is the name then). */
  actor_name: string | null;
  action: string;
  target_type: string | null;
  target_id: string | null;
  target_user_id: number | null;
  ip: string | null;
  request_id: string | null;
  /** JSON text. */
  details: string | null;
}

/** Requests (per token) and bot time (token_id 0: the user's) per UTC day. */
export interface UsageDailyTable {
  day: string;
  user_id: number;
  token_id: number;
  requests: Generated<number>;
  bot_seconds: Generated<number>;
}

/** A named, scoped key for /admin (issue 18). */
export interface AdminKeysTable {
  id: Generated<number>;
  name: string;
  selector: string;
  /** bcrypt hash of the secret part; the key itself is never stored. */
  secret_hash: string;
  last4: string;
  /** Space-separated admin scope names. */
  scopes: string;
  /** JSON array of addresses and CIDR ranges; NULL means anywhere. */
  allowed_ips: string | null;
  created_at: string;
  expires_at: string | null;
  revoked_at: string | null;
  /** The audit actor id of whoever minted it. */
  created_by: string;
  last_used_at: string | null;
  last_used_ip: string | null;
}

export interface Database {
  users: UsersTable;
  tokens: TokensTable;
  bots: BotsTable;
  audit_events: AuditEventsTable;
  usage_daily: UsageDailyTable;
  admin_keys: AdminKeysTable;
}

export type UserRow = Selectable<UsersTable>;
export type NewUserRow = Insertable<UsersTable>;
export type UserUpdate = Updateable<UsersTable>;
export type TokenRow = Selectable<TokensTable>;
export type NewTokenRow = Insertable<TokensTable>;
export type TokenUpdate = Updateable<TokensTable>;
export type AdminKeyRow = Selectable<AdminKeysTable>;
export type BotRow = Selectable<BotsTable>;
export type NewBotRow = Insertable<BotsTable>;
export type AuditEventRow = Selectable<AuditEventsTable>;
export type NewAuditEventRow = Insertable<AuditEventsTable>;
