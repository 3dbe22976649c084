import { isUniqueViolation, type Db, writeTransaction } from '../../db/database';
import type { UserRow, UserUpdate } from '../../db/schema';
import { type Clock, isoNow } from '../clock';
import { conflict, notFound, validationError } from '../http/errors';
import { type Page, type PageRequest, toPage } from '../http/pagination';
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
  data: Record<string, unknown> | null;
  disabled: boolean;
  disabled_at: string | null;
  created_at: string;
  updated_at: string;
}

export function toUserResponse(row: UserRow): UserResponse {
  return {
    id: row.id,
    email: row.email,
    name: row.name,
    max_concurrent_bots: row.max_concurrent_bots,
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
  data?: Record<string, unknown> | null;
}

export interface UpdateUserInput {
  name?: string | null;
  max_concurrent_bots?: number;
  data?: Record<string, unknown> | null;
  disabled?: boolean;
}

export const MAX_DATA_DEPTH = 32;

/** Iterative, so a hostile body cannot exhaust the stack here (JSON.stringify would, with a 500). */
function nestedDeeperThan(value: unknown, max: number): boolean {
  const stack: Array<[unknown, number]> = [[value, 1]];
  while (stack.length > 0) {
    const [current, depth] = stack.pop()!;
    if (typeof current !== 'object' || current === null) continue;
    if (depth > max) return true;
    for (const child of Object.values(current)) stack.push([child, depth + 1]);
  }
  return false;
}

function serializeData(data: Record<string, unknown> | null | undefined): string | null {
  if (data === undefined || data === null) return null;
  if (nestedDeeperThan(data, MAX_DATA_DEPTH)) {
    throw validationError([{ field: 'data', in: 'body', message: `must not nest deeper than ${MAX_DATA_DEPTH} levels` }]);
  }
  const text = JSON.stringify(data);
  if (Buffer.byteLength(text) > MAX_DATA_BYTES) {
    throw validationError([{ field: 'data', in: 'body', message: `must be at most ${MAX_DATA_BYTES} bytes as JSON` }]);
  }
  return text;
}

export class UsersService {
  constructor(private readonly deps: { db: Db; clock: Clock }) {}

  async create(input: CreateUserInput): Promise<UserResponse> {
    const { db, clock } = this.deps;
    const emailLower = input.email.toLowerCase();
    const data = serializeData(input.data);
    await this.refuseDuplicate(emailLower);
    const now = isoNow(clock);
    try {
      const row = await users.insertUser(db, {
        email: input.email,
        email_lower: emailLower,
        name: input.name ?? null,
        max_concurrent_bots: input.max_concurrent_bots ?? DEFAULT_MAX_CONCURRENT_BOTS,
        data,
        disabled_at: null,
        deleted_at: null,
        created_at: now,
        updated_at: now,
      });
      return toUserResponse(row);
    } catch (err) {
      // Two admins creating the same email at once: the unique index decides, the loser gets 409.
      if (isUniqueViolation(err)) await this.refuseDuplicate(emailLower);
      throw err;
    }
  }

  private async refuseDuplicate(emailLower: string): Promise<void> {
    const existing = await users.findUserByEmail(this.deps.db, emailLower);
    if (existing) throw conflict('A user with this email already exists.', { existing_id: existing.id });
  }

  async get(id: number): Promise<UserResponse> {
    return toUserResponse(await this.requireRow(id));
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
    return toUserResponse(row);
  }

  async list(page: PageRequest, emailContains?: string): Promise<Page<UserResponse>> {
    return toPage(await users.listUsers(this.deps.db, page, emailContains), page, toUserResponse);
  }

  async update(id: number, input: UpdateUserInput): Promise<UserResponse> {
    const { db, clock } = this.deps;
    const current = await this.requireRow(id);
    const now = isoNow(clock);
    const patch: UserUpdate = { updated_at: now };
    if (input.name !== undefined) patch.name = input.name;
    if (input.max_concurrent_bots !== undefined) patch.max_concurrent_bots = input.max_concurrent_bots;
    if (input.data !== undefined) patch.data = serializeData(input.data);
    // Disabling keeps the first time it happened; enabling clears it.
    if (input.disabled === true && current.disabled_at === null) patch.disabled_at = now;
    if (input.disabled === false) patch.disabled_at = null;
    const row = await users.updateUser(db, id, patch);
    if (!row) throw notFound('User');
    return toUserResponse(row);
  }

  /** Deleting a user revokes every token in the same transaction: no window where they still work. */
  async delete(id: number): Promise<void> {
    const now = isoNow(this.deps.clock);
    const deleted = await writeTransaction(this.deps.db, async (trx) => {
      if (!(await users.markUserDeleted(trx, id, now))) return false;
      await revokeAllTokensOfUser(trx, id, now);
      return true;
    });
    if (!deleted) throw notFound('User');
  }
}
