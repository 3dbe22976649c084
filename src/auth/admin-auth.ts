import { createHash, timingSafeEqual } from 'node:crypto';
import { AppError } from '../http/errors';
import type { Guard } from '../http/operations';

/**
 * The one auth path for /admin. Both sides are hashed to 32 bytes first, so the comparison takes the
 * same time whatever the length or content of what was sent.
 */
export function requireAdmin(adminKeyDigest: Buffer): Guard {
  return (req) => {
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
    if (!timingSafeEqual(createHash('sha256').update(sent).digest(), adminKeyDigest)) {
      throw new AppError(401, 'INVALID_ADMIN_KEY', 'The admin key is not valid.');
    }
  };
}
