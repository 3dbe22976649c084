import { authOf } from '../auth/user-auth';
import { sendJson } from '../http/json-response';
import { validationError } from '../http/errors';
import { input, type NodeHandler } from '../http/operations';
import { insufficientScope } from '../tokens/scopes';
import { parseMetadata } from '../tokens/tokens.service';

/** `?scope=a,b` (commas or spaces): every one must be held. */
function requiredScopes(raw: unknown): string[] {
  if (raw === undefined) return [];
  const scopes = String(raw)
    .split(/[\s,]+/)
    .filter((s) => s !== '');
  if (scopes.length === 0) throw validationError([{ field: 'scope', in: 'query', message: 'must name at least one scope' }]);
  return [...new Set(scopes)];
}

/**
 * Forward auth for gateways (nginx auth_request, Traefik forwardAuth, Caddy forward_auth): the user
 * guard has already done everything /v1 does (key, expiry, revocation, allowlist against the forwarded
 * address, rate limit); this adds the scopes the gateway asks for and says who the caller is in
 * headers the gateway copies to the upstream.
 */
export function forwardAuthHandlers(): Record<string, NodeHandler> {
  return {
    verifyKey: (_req, res) => {
      const { user, token } = authOf(res);
      const missing = requiredScopes(input(res).query.scope).filter((s) => !token.scopes.includes(s));
      if (missing.length > 0) throw insufficientScope(missing);
      res.setHeader('X-Keyward-User-Id', String(user.id));
      res.setHeader('X-Keyward-User-Email', user.email);
      res.setHeader('X-Keyward-Token-Id', String(token.id));
      res.setHeader('X-Keyward-Scopes', token.scopes.join(' '));
      res.setHeader('X-Keyward-Environment', token.environment);
      // These two are always sent, empty when there is none: Caddy's copy_headers passes a header
      // missing from the answer on as its unresolved placeholder ("{http.reverse_proxy.header.…}"),
      // which a service would take for a value. An empty one nginx drops, and Caddy and Traefik pass on empty.
      res.setHeader('X-Keyward-External-Id', user.externalId ?? '');
      // The key's metadata as one header: base64url of its JSON, so any object survives a header.
      res.setHeader('X-Keyward-Token-Metadata', token.metadataJson === null ? '' : Buffer.from(token.metadataJson).toString('base64url'));
      sendJson(res, 200, {
        user_id: user.id,
        email: user.email,
        external_id: user.externalId,
        token_id: token.id,
        scopes: token.scopes,
        environment: token.environment,
        metadata: parseMetadata(token.metadataJson),
      });
    },
  };
}
