import { isUniqueViolation, type Db } from '../../db/database';
import { type Clock, isoNow } from '../clock';
import { notFound } from '../http/errors';
import { type Page, type PageRequest, toPage } from '../http/pagination';
import type { UsersService } from '../users/users.service';
import type { SecretHasher } from './secret-hasher';
import { normalizeScopes, parseScopes, serializeScopes } from './scopes';
import { generateToken, maskToken } from './token-format';
import * as tokens from './tokens.repository';

export interface TokenResponse {
  id: number;
  user_id: number;
  name: string | null;
  scopes: string[];
  environment: string;
  masked: string;
  created_at: string;
  expires_at: string | null;
  revoked_at: string | null;
}

/** The only response that ever carries the token itself. */
export interface MintedTokenResponse extends Omit<TokenResponse, 'revoked_at'> {
  token: string;
}

export interface MintInput {
  name?: string | null;
  scopes?: string[];
  expires_in?: number;
}

export class TokensService {
  constructor(
    private readonly deps: { db: Db; clock: Clock; hasher: SecretHasher; tokenPrefix: string; users: UsersService },
  ) {}

  toResponse(row: tokens.TokenMetadataRow): TokenResponse {
    return {
      id: row.id,
      user_id: row.user_id,
      name: row.name,
      scopes: parseScopes(row.scopes),
      environment: row.environment,
      masked: maskToken(this.deps.tokenPrefix, row.environment, row.selector, row.last4),
      created_at: row.created_at,
      expires_at: row.expires_at,
      revoked_at: row.revoked_at,
    };
  }

  async mint(userId: number, input: MintInput): Promise<MintedTokenResponse> {
    const { db, clock, hasher, tokenPrefix, users } = this.deps;
    await users.requireRow(userId);
    const scopes = normalizeScopes(input.scopes);
    const now = clock.now();
    const expiresAt = input.expires_in === undefined ? null : new Date(now.getTime() + input.expires_in * 1000).toISOString();
    // A selector collision (62^12 values) is astronomically unlikely; retrying keeps it a non-event.
    for (let attempt = 1; ; attempt++) {
      const minted = generateToken(tokenPrefix, 'live');
      const secretHash = await hasher.hash(minted.secret);
      try {
        const row = await tokens.insertToken(db, {
          user_id: userId,
          name: input.name ?? null,
          selector: minted.selector,
          secret_hash: secretHash,
          last4: minted.last4,
          environment: 'live',
          scopes: serializeScopes(scopes),
          created_at: now.toISOString(),
          expires_at: expiresAt,
          revoked_at: null,
        });
        const { revoked_at: _revoked, ...metadata } = this.toResponse(row);
        return { ...metadata, token: minted.token };
      } catch (err) {
        if (!isUniqueViolation(err) || attempt >= 3) throw err;
      }
    }
  }

  async listForUser(userId: number, page: PageRequest): Promise<Page<TokenResponse>> {
    await this.deps.users.requireRow(userId);
    return toPage(await tokens.listTokensOfUser(this.deps.db, userId, page), page, (row) => this.toResponse(row));
  }

  async get(id: number): Promise<TokenResponse> {
    const row = await tokens.findTokenById(this.deps.db, id);
    if (!row) throw notFound('Token');
    return this.toResponse(row);
  }

  /** Recorded, not deleted: the next request with the token is told it was revoked. */
  async revoke(id: number): Promise<void> {
    const { db, clock } = this.deps;
    if (!(await tokens.findTokenById(db, id))) throw notFound('Token');
    await tokens.revokeToken(db, id, isoNow(clock));
  }
}
