import { isUniqueViolation, type Db, writeTransaction } from '../../db/database';
import type { UserRow, UserUpdate } from '../../db/schema';
import { type AuditContext, changes, recordAudit } from '../audit/audit';
import { type Clock, isoNow } from '../clock';
import { conflict, notFound } from '../http/errors';
import { boundedJson } from '../http/json-limits';
import { type Page, type PageRequest, toPage } from '../http/pagination';
import { endLeasesOfUser } from '../bots/bots.repository';
import { revokeAllTokensOfUser } from '../tokens/tokens.repository';
import * as users from './users.repository';

export const DEFAULT_MAX_CONCURRENT_BOTS = 3;
/** The self-hoster's free-form `data` is bounded so one user cannot grow the database without limit. */
export const MAX_DATA_BYTES = 16 * 1024;

export interface UserResponse {
  id: number;
  email: string;
  name: string | null;
  max_concurrent_bots: number;
  /** Bots holding a slot right now. */
  active_bots: number;
  rate_limit_per_minute: number;
  /** Spent by bot starts when CREDITS_PER_BOT is set. */
  credits: number;
  /** The platform's own account id, if it gave one. */
  external_id: string | null;
  /** The linked single sign-on identity, if any. */
  sso_subject: string | null;
  data: Record<string, unknown> | null;
  disabled: boolean;
  disabled_at: string | null;
  created_at: string;
  updated_at: string;
}

export function toUserResponse(row: UserRow, activeBots: number): UserResponse {
  return {
    id: row.id,
    email: row.email,
    name: row.name,
    max_concurrent_bots: row.max_concurrent_bots,
    active_bots: activeBots,
    rate_limit_per_minute: row.rate_limit_per_minute,
    credits: row.credits,
    external_id: row.external_id,
    sso_subject: row.sso_subject,
    data: row.data === null ? null : (JSON.parse(row.data) as Record<string, unknown>),
    disabled: row.disabled_at !== null,
    disabled_at: row.disabled_at,
    created_at: row.created_at,
    updated_at: row.updated_at,
  };
}

export interface CreateUserInput {
  email: string;
  name?: string | null;
  max_concurrent_bots?: number;
  rate_limit_per_minute?: number;
  credits?: number;
  external_id?: string | null;
  data?: Record<string, unknown> | null;
}

export interface UpdateUserInput {
  name?: string | null;
  max_concurrent_bots?: number;
  rate_limit_per_minute?: number;
  credits?: number;
  external_id?: string | null;
  sso_subject?: string | null;
  data?: Record<string, unknown> | null;
  disabled?: boolean;
}

export const MAX_DATA_DEPTH = 32;

/** What an audit entry records of a user: every field an admin can set, as the API shows it. */
function auditedFields(row: UserRow): Record<string, unknown> {
  return {
    email: row.email,
    name: row.name,
    max_concurrent_bots: row.max_concurrent_bots,
    rate_limit_per_minute: row.rate_limit_per_minute,
    credits: row.credits,
    external_id: row.external_id,
    sso_subject: row.sso_subject,
    data: row.data === null ? null : (JSON.parse(row.data) as unknown),
    disabled: row.disabled_at !== null,
  };
}

const serializeData = (data: Record<string, unknown> | null | undefined) =>
  boundedJson('data', data, { maxBytes: MAX_DATA_BYTES, maxDepth: MAX_DATA_DEPTH });

export class UsersService {
  constructor(
    private readonly deps: {
      db: Db;
      clock: Clock;
      /** RATE_LIMIT_PER_MINUTE: what a user created without one gets. */
      defaultRateLimit: number;
      /** Active bots per user (the bots feature answers). */
      activeBots: (userIds: number[]) => Promise<Map<number, number>>;
    },
  ) {}

  private async respond(row: UserRow): Promise<UserResponse> {
    return toUserResponse(row, (await this.deps.activeBots([row.id])).get(row.id) ?? 0);
  }

  async create(input: CreateUserInput, audit: AuditContext): Promise<UserResponse> {
    const { db, clock } = this.deps;
    const emailLower = input.email.toLowerCase();
    const data = serializeData(input.data);
    await this.refuseDuplicate(emailLower);
    await this.refuseTakenExternalId(input.external_id);
    const now = isoNow(clock);
    try {
      const row = await writeTransaction(db, async (trx) => {
        const inserted = await users.insertUser(trx, {
          email: input.email,
          email_lower: emailLower,
          name: input.name ?? null,
          max_concurrent_bots: input.max_concurrent_bots ?? DEFAULT_MAX_CONCURRENT_BOTS,
          rate_limit_per_minute: input.rate_limit_per_minute ?? this.deps.defaultRateLimit,
          credits: input.credits ?? 0,
          external_id: input.external_id ?? null,
          data,
          disabled_at: null,
          deleted_at: null,
          created_at: now,
          updated_at: now,
        });
        await recordAudit(trx, audit, now, {
          action: 'user.created',
          target: { type: 'user', id: inserted.id, userId: inserted.id },
          details: auditedFields(inserted),
        });
        return inserted;
      });
      return toUserResponse(row, 0);
    } catch (err) {
      // Two admins creating the same email (or external id) at once: the unique index decides, the
      // loser gets 409.
      if (isUniqueViolation(err)) {
        await this.refuseDuplicate(emailLower);
        await this.refuseTakenExternalId(input.external_id);
      }
      throw err;
    }
  }

  private async refuseDuplicate(emailLower: string): Promise<void> {
    const existing = await users.findUserByEmail(this.deps.db, emailLower);
    if (existing) throw conflict('A user with this email already exists.', { existing_id: existing.id });
  }

  /** 409 naming the user that has this external id, unless it is `exceptId`. */
  private async refuseTakenExternalId(externalId: string | null | undefined, exceptId?: number): Promise<void> {
    if (externalId === undefined || externalId === null) return;
    const holder = await users.findUserByExternalId(this.deps.db, externalId);
    if (holder && holder.id !== exceptId) throw conflict('Another user has this external_id.', { existing_id: holder.id });
  }

  async get(id: number): Promise<UserResponse> {
    return this.respond(await this.requireRow(id));
  }

  /** For other features that act on a user (minting tokens): 404 if there is no such live user. */
  async requireRow(id: number): Promise<UserRow> {
    const row = await users.findUserById(this.deps.db, id);
    if (!row) throw notFound('User');
    return row;
  }

  async getByEmail(email: string): Promise<UserResponse> {
    const row = await users.findUserByEmail(this.deps.db, email.toLowerCase());
    if (!row) throw notFound('User');
    return this.respond(row);
  }

  async list(page: PageRequest, filter: users.UserFilter = {}): Promise<Page<UserResponse>> {
    const rows = await users.listUsers(this.deps.db, page, filter);
    const active = await this.deps.activeBots(rows.map((r) => r.id));
    return toPage(rows, page, (row) => toUserResponse(row, active.get(row.id) ?? 0));
  }

  async update(id: number, input: UpdateUserInput, audit: AuditContext): Promise<UserResponse> {
    const { db, clock } = this.deps;
    const data = input.data === undefined ? undefined : serializeData(input.data);
    const now = isoNow(clock);
    let row: UserRow;
    try {
      row = await writeTransaction(db, async (trx) => {
        const current = await users.findUserById(trx, id);
        if (!current) throw notFound('User');
        const patch: UserUpdate = { updated_at: now };
        if (input.name !== undefined) patch.name = input.name;
        if (input.max_concurrent_bots !== undefined) patch.max_concurrent_bots = input.max_concurrent_bots;
        if (input.rate_limit_per_minute !== undefined) patch.rate_limit_per_minute = input.rate_limit_per_minute;
        if (input.credits !== undefined) patch.credits = input.credits;
        if (input.external_id !== undefined) patch.external_id = input.external_id;
        // A subject another user holds is refused by its unique index (below), the one check for it.
        if (input.sso_subject !== undefined) patch.sso_subject = input.sso_subject;
        if (data !== undefined) patch.data = data;
        // Disabling keeps the first time it happened; enabling clears it.
        if (input.disabled === true && current.disabled_at === null) patch.disabled_at = now;
        if (input.disabled === false) patch.disabled_at = null;
        const updated = await users.updateUser(trx, id, patch);
        if (!updated) throw notFound('User');
        const changed = changes(auditedFields(current), auditedFields(updated));
        if (Object.keys(changed).length > 0) {
          // Disabling and enabling are the changes an auditor looks for first: they name the entry.
          let action = 'user.updated';
          if (changed.disabled) action = updated.disabled_at === null ? 'user.enabled' : 'user.disabled';
          await recordAudit(trx, audit, now, { action, target: { type: 'user', id, userId: id }, details: changed });
        }
        return updated;
      });
    } catch (err) {
      // Linking a subject or an external id another user holds, also when two admins do it at once.
      if (!isUniqueViolation(err)) throw err;
      await this.refuseTakenExternalId(input.external_id, id);
      if (!input.sso_subject) throw err;
      const holder = await users.findUserBySsoSubject(db, input.sso_subject);
      throw conflict('Another user is linked to this SSO subject.', { existing_id: holder?.id ?? null });
    }
    return this.respond(row);
  }

  /**
   * Deleting a user revokes every token and releases every bot in the same transaction: no window
   * where they still work or hold slots.
   */
  async delete(id: number, audit: AuditContext): Promise<void> {
    const now = isoNow(this.deps.clock);
    const deleted = await writeTransaction(this.deps.db, async (trx) => {
      const current = await users.findUserById(trx, id);
      if (!current || !(await users.markUserDeleted(trx, id, now))) return false;
      const tokensRevoked = await revokeAllTokensOfUser(trx, id, now);
      const botsReleased = await endLeasesOfUser(trx, id, now);
      await recordAudit(trx, audit, now, {
        action: 'user.deleted',
        target: { type: 'user', id, userId: id },
        details: { email: current.email, tokens_revoked: tokensRevoked, bots_released: botsReleased },
      });
      return true;
    });
    if (!deleted) throw notFound('User');
  }
}
