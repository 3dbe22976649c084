import { isIP } from 'node:net';
import type { Request, RequestHandler, Response } from 'express';
import type { Actor } from '../audit/audit';
import type { Guard } from '../http/operations';
import { AppError } from '../http/errors';
import type { RateLimits } from '../rate-limit/rate-limits';
import { insufficientScope } from '../tokens/scopes';
import type { AuthContext, TokenVerifier } from './token-verifier';

const CHALLENGE = { 'WWW-Authenticate': 'Bearer realm="keyward"' };

function presentedKey(req: Request): string {
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
  else if (/[?&](api_key|apikey|key|token|access_token)=/i.test(req.originalUrl)) hint = 'API keys are not accepted in the query string; send the X-API-Key header.';
  throw new AppError(401, 'AUTHENTICATION_REQUIRED', hint, undefined, CHALLENGE);
}

/** The caller's address as TRUST_PROXY allows it to be known. */
export const clientIpOf = (req: Request): string => req.ip ?? req.socket.remoteAddress ?? '';

/**
 * With TRUST_PROXY, the caller's address comes from X-Forwarded-For, and a proxy that passes on what a
 * client wrote there (say, a hop count larger than the proxies in front) makes it any text the client
 * likes. Such a request is refused: a client address that is not an address would match no allowlist
 * and get per-address limits of its own for every spelling.
 */
export const requireClientAddress: RequestHandler = (req, _res, next) => {
  if (isIP(clientIpOf(req)) !== 0) return next();
  next(
    new AppError(400, 'VALIDATION_ERROR', 'X-Forwarded-For does not name the client by its IP address.', [
      { field: 'X-Forwarded-For', in: 'header', message: 'must list IP addresses' },
    ]),
  );
};

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
    const ip = clientIpOf(req);
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
    res.locals.auth = auth;
    res.locals.actor = { type: 'key', userId: auth.user.id, tokenId: auth.token.id } satisfies Actor;
    await limits.userRequest(auth.user.id, auth.user.rateLimitPerMinute, res);
    if (op.requiredScope !== null && !auth.token.scopes.includes(op.requiredScope)) throw insufficientScope([op.requiredScope]);
  };
}

export const authOf = (res: Response): AuthContext => res.locals.auth as AuthContext;
