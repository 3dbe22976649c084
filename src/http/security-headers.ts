import type { IncomingMessage, ServerResponse } from 'node:http';
import helmet, { type HelmetOptions } from 'helmet';

// No upgrade-insecure-requests: self-hosters often serve plain HTTP inside their network (TLS at the
// proxy), and the directive would make browsers fetch /docs' scripts over https and fail.
export const HELMET_OPTIONS: HelmetOptions = { contentSecurityPolicy: { directives: { upgradeInsecureRequests: null } } };

/**
 * helmet decides keyward's security headers. With these options none of them depends on the request,
 * so helmet runs once at start-up and every response gets the captured headers in one call, instead of
 * a dozen nested middlewares per request on the hot path. A test compares them with helmet's own output.
 */
export function securityHeaders(options: HelmetOptions = HELMET_OPTIONS): Map<string, string> {
  const headers = new Map<string, string>();
  const capture = {
    setHeader: (name: string, value: string | number | readonly string[]) => headers.set(name, String(value)),
    removeHeader: (name: string) => headers.delete(name),
  } as unknown as ServerResponse;
  let calledNext = false;
  helmet(options)({} as IncomingMessage, capture, (err?: unknown) => {
    if (err) throw err;
    calledNext = true;
  });
  if (!calledNext) throw new Error('helmet did not finish synchronously; its headers cannot be precomputed');
  return headers;
}
