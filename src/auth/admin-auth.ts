import { createHash, timingSafeEqual } from 'node:crypto';
import { type Actor, adminFingerprint } from '../audit/audit';
import { type AdminIdentity, type AdminKeyVerifier, rootIdentity } from '../admin-keys/admin-key-verifier';
import { AppError } from '../http/errors';
import type { Guard } from '../http/operations';
import type { RateLimits } from '../rate-limit/rate-limits';
import { clientIpOf, contextOf } from '../http/request-context';
import type { SsoAdmins } from '../sso/sso-auth';
import { insufficientScope } from '../tokens/scopes';

/** Outcomes that mean the caller does not hold a valid admin credential: they count against its address. */
const WRONG_KEY = new Set(['INVALID_ADMIN_KEY', 'RATE_LIMITED']);

/**
 * The one auth path for /admin. Every request from an address counts against the admin rate limit.
 * X-Admin-API-Key holds the root key (ADMIN_API_TOKEN, and ADMIN_API_TOKEN_NEXT while it is being
 * changed), which may do everything, or a named admin key (`kw_admin_…`), which may do what its
 * scopes allow. A request with no key from the sign-in proxy is a person's, admitted by group where
 * SSO admins are configured. Then the operation's admin scope (openapi.yaml's x-admin-scope) is checked.
 *
 * The root keys are compared on every request, both sides hashed to 32 bytes first, so the time
 * taken says neither which one matched nor how much of one did. An address that sent too many wrong
 * keys gets 429 for any key but a right one this process already knows.
 */
export function requireAdmin(rootDigests: readonly Buffer[], adminKeys: AdminKeyVerifier, limits: RateLimits, ssoAdmins?: SsoAdmins): Guard {
  const roots = rootDigests.map((digest) => ({ digest, actor: { type: 'admin', fingerprint: adminFingerprint(digest) } as Actor }));
  return async (req, res, op) => {
    const ip = clientIpOf(res);
    await limits.adminRequest(ip, res);
    const sent = req.headers['x-admin-api-key'];
    const viaSso = (typeof sent !== 'string' || sent === '') && ssoAdmins !== undefined && ssoAdmins.comesFromProxy(req);
    if (!viaSso && (typeof sent !== 'string' || sent === '')) {
      const userKey = req.headers['x-api-key'] !== undefined || req.headers.authorization !== undefined;
      throw new AppError(
        401,
        'AUTHENTICATION_REQUIRED',
        userKey
          ? 'User API keys do not work on /admin; send the admin key in X-Admin-API-Key.'
          : 'This API needs the admin key in the X-Admin-API-Key header.',
      );
    }
    const identity = viaSso ? ssoAdmins!.identify(req) : await authenticate(sent as string, ip);
    const context = contextOf(res);
    context.actor = identity.actor;
    context.admin = identity;
    // What this credential may do, on every answer it gets (GitHub's X-OAuth-Scopes): the console
    // offers only what the person may do, and a curl user sees it with -i.
    res.setHeader('X-Keyward-Admin-Scopes', identity.scopes.join(' '));
    if (!(identity.scopes as readonly string[]).includes(op.requiredScope!)) {
      throw insufficientScope([op.requiredScope!], `${viaSso ? 'SSO admins (SSO_ADMIN_SCOPES) lack' : 'This admin key lacks'} the scope ${op.requiredScope}.`);
    }
  };

  async function authenticate(sent: string, ip: string): Promise<AdminIdentity> {
    const sentDigest = createHash('sha256').update(sent).digest();
    let root: Actor | undefined;
    for (const key of roots) {
      if (timingSafeEqual(sentDigest, key.digest)) root = key.actor;
    }
    if (root) return rootIdentity(root);
    const key = adminKeys.present(sent, sentDigest);
    if (!adminKeys.knows(key)) {
      const blocked = await limits.blocked(ip);
      if (blocked) throw blocked;
    }
    try {
      return await adminKeys.verify(key, ip);
    } catch (err) {
      if (err instanceof AppError && WRONG_KEY.has(err.code)) await limits.authFailed(ip);
      throw err;
    }
  }
}
