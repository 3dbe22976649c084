import { authOf } from '../auth/user-auth';
import type { AuthContext } from '../auth/token-verifier';
import { auditContextOf } from '../audit/audit';
import { instant } from '../audit/audit.routes';
import type { Handler } from '../http/operations';
import { input } from '../http/operations';
import { pageRequest } from '../http/pagination';
import type { TokenFilter } from './tokens.repository';
import { ADMIN, type Issuer, type MintInput, type TokensService, type UpdateInput } from './tokens.service';

/** Admin token management; paths, auth and validation come from openapi.yaml by operationId. */
export function tokensHandlers(tokens: TokensService): Record<string, Handler> {
  return {
    mintToken: async (req, res) => {
      const { params, body } = input(res);
      const minted = await tokens.mint(params.id as number, (body ?? {}) as MintInput, ADMIN, auditContextOf(res));
      res.status(201).location(`/admin/tokens/${minted.id}`).json(minted);
    },
    listUserTokens: async (_req, res) => {
      const { params, query } = input(res);
      res.json(await tokens.list({ userId: params.id as number }, pageRequest(query)));
    },
    listTokens: async (_req, res) => {
      const { query } = input(res);
      const filter: TokenFilter = {
        userId: query.user_id as number | undefined,
        status: query.status as TokenFilter['status'],
        environment: query.environment as TokenFilter['environment'],
        neverUsed: query.never_used as boolean | undefined,
        expiresBefore: instant('expires_before', query.expires_before),
      };
      res.json(await tokens.list(filter, pageRequest(query)));
    },
    getToken: async (_req, res) => {
      res.json(await tokens.get(input(res).params.id as number));
    },
    updateToken: async (req, res) => {
      const { params, body } = input(res);
      res.json(await tokens.update(params.id as number, body as UpdateInput, auditContextOf(res)));
    },
    rotateToken: async (req, res) => {
      const { params, body } = input(res);
      const grace = (body as { grace_period_seconds?: number } | undefined)?.grace_period_seconds;
      const minted = await tokens.rotate(params.id as number, grace, ADMIN, auditContextOf(res));
      res.status(201).location(`/admin/tokens/${minted.id}`).json(minted);
    },
    revokeToken: async (req, res) => {
      await tokens.revoke(input(res).params.id as number, ADMIN, auditContextOf(res));
      res.status(204).end();
    },
  };
}

/** The calling key as an issuer: it acts on its own user's tokens, within its own limits. */
function issuerOf(auth: AuthContext): Issuer {
  return {
    kind: 'key',
    userId: auth.user.id,
    scopes: auth.token.scopes,
    environment: auth.token.environment,
    expiresAt: auth.token.expiresAt,
    allowedIps: auth.token.allowedIps,
    rateLimitPerMinute: auth.token.rateLimitPerMinute,
  };
}

/** Self-service keys under /v1/tokens: the same operations, bounded by the calling key. */
export function selfServiceTokensHandlers(tokens: TokensService): Record<string, Handler> {
  return {
    listMyTokens: async (_req, res) => {
      res.json(await tokens.list({ userId: authOf(res).user.id }, pageRequest(input(res).query)));
    },
    mintMyToken: async (req, res) => {
      const auth = authOf(res);
      const minted = await tokens.mint(auth.user.id, (input(res).body ?? {}) as MintInput, issuerOf(auth), auditContextOf(res));
      res.status(201).location(`/v1/tokens/${minted.id}`).json(minted);
    },
    getMyToken: async (_req, res) => {
      res.json(await tokens.get(input(res).params.id as number, issuerOf(authOf(res))));
    },
    rotateMyToken: async (req, res) => {
      const { params, body } = input(res);
      const grace = (body as { grace_period_seconds?: number } | undefined)?.grace_period_seconds;
      const minted = await tokens.rotate(params.id as number, grace, issuerOf(authOf(res)), auditContextOf(res));
      res.status(201).location(`/v1/tokens/${minted.id}`).json(minted);
    },
    revokeMyToken: async (req, res) => {
      await tokens.revoke(input(res).params.id as number, issuerOf(authOf(res)), auditContextOf(res));
      res.status(204).end();
    },
  };
}
