import { createHash, timingSafeEqual } from 'node:crypto';
import { type Actor, adminFingerprint } from '../audit/audit';
import { AppError } from '../http/errors';
import type { Guard } from '../http/operations';
import type { RateLimits } from '../rate-limit/rate-limits';
import { clientIpOf, contextOf } from '../http/request-context';

/**
 * The one auth path for /admin. Every request from an address counts against the admin rate limit.
 * Both sides of the key comparison are hashed to 32 bytes first, so it takes the same time whatever
 * the length or content of what was sent. An address that sent too many wrong keys gets 429 for any
 * key but the right one.
 *
 * `keyDigests` is ADMIN_API_TOKEN and, while the admin key is being changed, ADMIN_API_TOKEN_NEXT.
 * Every one is compared on every request, so the time taken does not tell which (if any) matched;
 * the audit log names the key that was used by its fingerprint.
 */
export function requireAdmin(keyDigests: readonly Buffer[], limits: RateLimits): Guard {
  const keys = keyDigests.map((digest) => ({ digest, actor: { type: 'admin', fingerprint: adminFingerprint(digest) } as Actor }));
  return async (req, res) => {
    const ip = clientIpOf(res);
    await limits.adminRequest(ip, res);
    const sent = req.headers['x-admin-api-key'];
    if (typeof sent !== 'string' || sent === '') {
      const userKey = req.headers['x-api-key'] !== undefined || req.headers.authorization !== undefined;
      throw new AppError(
        401,
        'AUTHENTICATION_REQUIRED',
        userKey
          ? 'User API keys do not work on /admin; send the admin key in X-Admin-API-Key.'
          : 'This API needs the admin key in the X-Admin-API-Key header.',
      );
    }
    const sentDigest = createHash('sha256').update(sent).digest();
    let matched: Actor | undefined;
    for (const key of keys) {
      if (timingSafeEqual(sentDigest, key.digest)) matched = key.actor;
    }
    if (!matched) {
      const blocked = await limits.blocked(ip);
      if (blocked) throw blocked;
      await limits.authFailed(ip);
      throw new AppError(401, 'INVALID_ADMIN_KEY', 'The admin key is not valid.');
    }
    contextOf(res).actor = matched;
  };
}
