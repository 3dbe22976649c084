import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Actor } from '../audit/audit';
import type { Guard } from '../http/operations';
import { AppError } from '../http/errors';
import { clientIpOf, contextOf } from '../http/request-context';
import type { RateLimits } from '../rate-limit/rate-limits';
import { insufficientScope } from '../tokens/scopes';
import type { AuthContext, TokenVerifier } from './token-verifier';

const CHALLENGE = { 'WWW-Authenticate': 'Bearer realm="keyward"' };

function presentedKey(req: IncomingMessage): string {
  const headerKey = req.headers['x-api-key'];
  const authorization = req.headers.authorization;
  const bearer = authorization !== undefined && /^bearer /i.test(authorization) ? authorization.slice(7).trim() : undefined;
  if (typeof headerKey === 'string' && bearer !== undefined && headerKey !== bearer) {
    throw new AppError(401, 'INVALID_API_KEY', 'X-API-Key and Authorization carry different keys; send one.', undefined, CHALLENGE);
  }
  const key = typeof headerKey === 'string' ? headerKey : bearer;
  if (key !== undefined && key !== '') return key;

  // Tokens are never read from a query string (it ends up in proxy logs and browser history).
  let hint = 'Send your API key in the X-API-Key header or as Authorization: Bearer <key>.';
  if (req.headers['x-admin-api-key'] !== undefined) hint = 'The admin key does not work on /v1; send a user API key in X-API-Key.';
  else if (authorization !== undefined) hint = 'Only Bearer authorization is accepted; send Authorization: Bearer <key> or X-API-Key.';
  else if (/[?&](api_key|apikey|key|token|access_token)=/i.test(req.url ?? '')) hint = 'API keys are not accepted in the query string; send the X-API-Key header.';
  throw new AppError(401, 'AUTHENTICATION_REQUIRED', hint, undefined, CHALLENGE);
}

/** Outcomes that mean the caller does not hold a valid key: they count against its address. */
const WRONG_KEY = new Set(['INVALID_API_KEY', 'RATE_LIMITED']);

/**
 * The one auth path for /v1: anything it does not understand is a refusal. In order: a key this
 * process has not verified before counts as a wrong key of its address until it proves good, and an
 * address over its limit gets 429 before any lookup or bcrypt (a key already verified passes); the key
 * is verified; the user's rate limit is counted; then the operation's scope (openapi.yaml's
 * x-required-scope), so nobody learns what a route needs without a valid key.
 */
export function requireUser(verifier: TokenVerifier, limits: RateLimits): Guard {
  return async (req, res, op) => {
    const ip = clientIpOf(res);
    const key = verifier.present(presentedKey(req));
    const known = verifier.knows(key);
    if (!known) {
      const refused = await limits.reserveAttempt(ip);
      if (refused) throw refused;
    }
    let auth: AuthContext;
    try {
      auth = await verifier.verify(key, ip);
    } catch (err) {
      const wrongKey = err instanceof AppError && WRONG_KEY.has(err.code);
      if (!known && !wrongKey) await limits.attemptSucceeded(ip);
      if (known && wrongKey) await limits.authFailed(ip);
      throw err;
    }
    if (!known) await limits.attemptSucceeded(ip);
    const context = contextOf(res);
    context.auth = auth;
    context.userId = auth.user.id;
    context.tokenId = auth.token.id;
    context.actor = { type: 'key', userId: auth.user.id, tokenId: auth.token.id } satisfies Actor;
    await limits.userRequest(auth.user.id, auth.user.rateLimitPerMinute, res, { id: auth.token.id, limit: auth.token.rateLimitPerMinute });
    if (op.requiredScope !== null && !auth.token.scopes.includes(op.requiredScope)) throw insufficientScope([op.requiredScope]);
  };
}

export const authOf = (res: ServerResponse): AuthContext => contextOf(res).auth as AuthContext;
