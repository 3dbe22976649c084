import type { Request, Response } from 'express';
import type { Guard } from '../http/operations';
import { AppError } from '../http/errors';
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

/**
 * The one auth path for /v1: anything it does not understand is a refusal. The key is verified first,
 * then the operation's scope (openapi.yaml's x-required-scope), so nobody learns what a route needs
 * without a valid key.
 */
export function requireUser(verifier: TokenVerifier): Guard {
  return async (req, res, op) => {
    const auth = await verifier.verify(presentedKey(req), req.ip ?? req.socket.remoteAddress ?? '');
    res.locals.auth = auth;
    if (op.requiredScope !== null && !auth.token.scopes.includes(op.requiredScope)) throw insufficientScope([op.requiredScope]);
  };
}

export const authOf = (res: Response): AuthContext => res.locals.auth as AuthContext;
