import { createHash, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { type Actor, auditContextOf } from '../audit/audit';
import type { Config } from '../config';
import { AppError } from '../http/errors';
import { contextOf } from '../http/request-context';
import type { Guard } from '../http/operations';
import { isEmail } from '../http/validation';
import type { RateLimits } from '../rate-limit/rate-limits';
import { compiledAllowlist, normalizeClientIp } from '../tokens/ip-allowlist';
import type { SsoService, SsoIdentity, SsoUser } from './sso.service';
import type { AdminIdentity } from '../admin-keys/admin-key-verifier';

export interface SsoContext {
  user: SsoUser;
  identity: SsoIdentity;
}

const signIn = (message: string) => new AppError(401, 'AUTHENTICATION_REQUIRED', message);

const header = (req: IncomingMessage, name: string): string | undefined => {
  const value = req.headers[name.toLowerCase()];
  const text = Array.isArray(value) ? value[0] : value;
  return text === undefined || text.trim() === '' ? undefined : text.trim();
};

/**
 * Whether a browser's Origin names this host. A proxy that forwards `Host` without its port (nginx's
 * `$host`) leaves only the hostname to compare; the custom header above is the main defence anyway.
 */
function sameHost(origin: string, host: string): boolean {
  let url: URL;
  try {
    url = new URL(origin);
  } catch {
    return false;
  }
  const hasPort = /:\d+$/.test(host) && !host.endsWith(']');
  return hasPort ? url.host === host : url.host === host || url.hostname === host.replace(/^\[|\]$/g, '');
}

/**
 * Requests that change something must come from keyward's own page: a page on another site cannot
 * send a custom header without a CORS preflight keyward never approves, and browsers name the page's
 * origin, which must be this host. The proxy's sign-in cookie rides along with any cross-site request,
 * so without this a foreign page could mint keys for whoever visits it.
 */
function checkSameOrigin(req: IncomingMessage): void {
  if (req.method === 'GET' || req.method === 'HEAD') return;
  if (req.headers['x-keyward-csrf'] !== '1') {
    throw new AppError(403, 'CSRF_CHECK_FAILED', 'Changes need the X-Keyward-CSRF: 1 header, which only keyward\'s own page sends.');
  }
  const origin = req.headers.origin;
  if (origin !== undefined && !sameHost(origin, req.headers.host ?? '')) {
    throw new AppError(403, 'CSRF_CHECK_FAILED', 'This request comes from another site\'s page.');
  }
}

/**
 * The person the sign-in proxy vouches for on this request. Identity headers are believed only from
 * the proxy: by the connection's own address (never X-Forwarded-For, which anyone can write) and,
 * when SSO_SHARED_SECRET is set, with that secret. From anyone else the answer is 401, exactly as if
 * the person had not signed in. A change must also pass the same-origin check. /sso and the SSO
 * admins of /admin both read people this way.
 */
export function proxiedIdentity(config: Config): (req: IncomingMessage) => SsoIdentity {
  const proxies = config.ssoTrustedProxies.length > 0 ? compiledAllowlist(JSON.stringify(config.ssoTrustedProxies)) : undefined;
  const prefix = config.ssoHeaderPrefix;
  return (req) => {
    if (!proxies) throw signIn('Single sign-on is not enabled on this server (SSO_TRUSTED_PROXIES is empty).');
    const peer = normalizeClientIp(req.socket.remoteAddress ?? '');
    if (!proxies.allows(peer)) throw signIn('Sign in through your organisation\'s sign-in proxy.');
    if (config.ssoSharedSecretDigest) {
      const sent = header(req, 'X-Keyward-SSO-Secret') ?? '';
      if (!timingSafeEqual(createHash('sha256').update(sent).digest(), config.ssoSharedSecretDigest)) {
        throw signIn('Sign in through your organisation\'s sign-in proxy.');
      }
    }
    // Before anything is looked up, linked or provisioned for this person.
    checkSameOrigin(req);
    const email = header(req, `${prefix}Email`);
    if (email === undefined) throw signIn('The sign-in proxy sent no email for you; sign in again.');
    // Users are matched and provisioned by email, and domains are allowed by what follows the @.
    if (!isEmail(email)) throw signIn('The sign-in proxy sent something that is not an email address as your email; ask the admin to check its configuration.');
    const identity: SsoIdentity = {
      email,
      subject: header(req, `${prefix}User`) ?? email,
      username: header(req, `${prefix}Preferred-Username`) ?? null,
      groups: (header(req, `${prefix}Groups`) ?? '')
        .split(',')
        .map((g) => g.trim())
        .filter((g) => g !== ''),
    };
    // The same bounds the admin API puts on a subject and a name: what the proxy sends is stored.
    if (identity.subject.length > 256 || (identity.username?.length ?? 0) > 200 || identity.groups.length > 100 || identity.groups.some((g) => g.length > 256)) {
      throw signIn('The sign-in proxy sent an identity longer than keyward accepts (subject 256, username 200, 100 groups of 256 characters); ask the admin to check its configuration.');
    }
    return identity;
  };
}

/** The one auth path for /sso: the proxied person, mapped onto their keyward user. */
export function requireSso(config: Config, sso: SsoService, limits: RateLimits): Guard {
  const identify = proxiedIdentity(config);
  return async (req: IncomingMessage, res: ServerResponse) => {
    const identity = identify(req);
    const { ip, requestId } = auditContextOf(res);
    const user = await sso.userFor(identity, { ip, requestId });
    const context: SsoContext = { user, identity };
    const request = contextOf(res);
    request.sso = context;
    request.actor = { type: 'sso', userId: user.id, subject: identity.subject, email: identity.email } satisfies Actor;
    // Logs name the user like any other authenticated request.
    request.userId = user.id;
    await limits.userRequest(user.id, user.rate_limit_per_minute, res);
  };
}

/** Signed-in people acting on /admin: see ssoAdmins. */
export interface SsoAdmins {
  /** Whether the connection comes from the sign-in proxy, whose requests without an admin key are people's. */
  comesFromProxy(req: IncomingMessage): boolean;
  /** The person as an admin, or 401/403 (not signed in, not in an admin group, a change from another site). */
  identify(req: IncomingMessage): AdminIdentity;
}

/**
 * People whose proxied groups include one of SSO_ADMIN_GROUPS use /admin with no admin key, holding
 * SSO_ADMIN_SCOPES, under their own name. Undefined when SSO admins are not configured: it takes both
 * SSO_TRUSTED_PROXIES and SSO_ADMIN_GROUPS.
 */
export function ssoAdmins(config: Config): SsoAdmins | undefined {
  if (config.ssoAdminGroups.length === 0 || config.ssoTrustedProxies.length === 0) return undefined;
  const proxies = compiledAllowlist(JSON.stringify(config.ssoTrustedProxies));
  const identify = proxiedIdentity(config);
  return {
    comesFromProxy: (req) => proxies.allows(normalizeClientIp(req.socket.remoteAddress ?? '')),
    identify: (req) => {
      // Nobody signed in: most likely a script that forgot its key.
      if (header(req, `${config.ssoHeaderPrefix}Email`) === undefined) {
        throw signIn('This API needs the admin key in the X-Admin-API-Key header, or a person signed in through the sign-in proxy.');
      }
      const identity = identify(req);
      if (!identity.groups.some((group) => config.ssoAdminGroups.includes(group))) {
        throw new AppError(403, 'SSO_ACCESS_DENIED', 'You are signed in, but not in a group that may use the admin API (SSO_ADMIN_GROUPS).');
      }
      return { actor: { type: 'sso', userId: null, subject: identity.subject, email: identity.email }, scopes: config.ssoAdminScopes, expiresAt: null };
    },
  };
}

export const ssoOf = (res: ServerResponse): SsoContext => contextOf(res).sso as SsoContext;
