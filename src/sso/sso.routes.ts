import { auditContextOf } from '../audit/audit';
import type { Handler } from '../http/operations';
import { input } from '../http/operations';
import { pageRequest } from '../http/pagination';
import type { Issuer, MintInput, TokensService } from '../tokens/tokens.service';
import { toUserResponse } from '../users/users.service';
import { type SsoContext, ssoOf } from './sso-auth';

/**
 * A signed-in person manages their own keys by the same rules as a key with tokens:write, as if they
 * held a live, unrestricted key with exactly SSO_USER_SCOPES.
 */
function issuerOf(context: SsoContext, scopes: readonly string[]): Issuer {
  return { kind: 'key', userId: context.user.id, scopes, environment: 'live', expiresAt: null, allowedIps: null, rateLimitPerMinute: null };
}

export function ssoHandlers(tokens: TokensService, ssoUserScopes: readonly string[]): Record<string, Handler> {
  return {
    getSsoMe: (_req, res) => {
      const { user, identity } = ssoOf(res);
      const { active_bots: _omitted, ...profile } = toUserResponse(user, 0);
      res.json({ user: profile, identity, allowed_scopes: ssoUserScopes });
    },
    listSsoTokens: async (_req, res) => {
      res.json(await tokens.list({ userId: ssoOf(res).user.id }, pageRequest(input(res).query)));
    },
    mintSsoToken: async (req, res) => {
      const context = ssoOf(res);
      const minted = await tokens.mint(context.user.id, (input(res).body ?? {}) as MintInput, issuerOf(context, ssoUserScopes), auditContextOf(res));
      res.status(201).location(`/sso/tokens/${minted.id}`).json(minted);
    },
    rotateSsoToken: async (req, res) => {
      const { params, body } = input(res);
      const grace = (body as { grace_period_seconds?: number } | undefined)?.grace_period_seconds;
      const minted = await tokens.rotate(params.id as number, grace, issuerOf(ssoOf(res), ssoUserScopes), auditContextOf(res));
      res.status(201).location(`/sso/tokens/${minted.id}`).json(minted);
    },
    revokeSsoToken: async (req, res) => {
      await tokens.revoke(input(res).params.id as number, issuerOf(ssoOf(res), ssoUserScopes), auditContextOf(res));
      res.status(204).end();
    },
  };
}
