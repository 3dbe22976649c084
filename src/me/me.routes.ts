import { authOf } from '../auth/user-auth';
import { sendJson } from '../http/json-response';
import type { NodeHandler } from '../http/operations';
import { parseMetadata } from '../tokens/tokens.service';

/** The user API's "who am I": the key's user and the key itself, as the caller is allowed to see them. */
export function meHandlers(): Record<string, NodeHandler> {
  return {
    getMe: (_req, res) => {
      const { user, token } = authOf(res);
      sendJson(res, 200, {
        user: { id: user.id, email: user.email, name: user.name, external_id: user.externalId, max_concurrent_bots: user.maxConcurrentBots },
        token: {
          id: token.id,
          name: token.name,
          scopes: token.scopes,
          environment: token.environment,
          masked: token.masked,
          expires_at: token.expiresAt,
          allowed_ips: token.allowedIps,
          metadata: parseMetadata(token.metadataJson),
          rate_limit_per_minute: token.rateLimitPerMinute,
        },
      });
    },
  };
}
