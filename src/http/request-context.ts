import { createHash, randomUUID } from 'node:crypto';
import type { NextFunction, Request, Response } from 'express';
import type { Logger } from '../logger';
import { unavailable } from './errors';

// An incoming X-Request-Id is kept only if it is short and plain, so it cannot smuggle text into logs.
const SAFE_REQUEST_ID = /^[A-Za-z0-9._:-]{1,64}$/;
// …and only if it is not a credential sent in the wrong header: an id is logged, echoed and audited.
const TOKEN_SHAPE = /_(?:live|test)_[A-Za-z0-9]{12}_[A-Za-z0-9]{6}/;

// Runs of 20+ letters and digits in an unmatched path are masked: a token pasted into a URL must not
// reach the log through a 404.
const TOKEN_LIKE = /[A-Za-z0-9]{20,}/g;

/** The path as logs may show it: the operation's template, never the values in it (emails, tokens). */
export function loggablePath(req: Request, res: Response): string {
  return (res.locals.routePath as string | undefined) ?? req.path.replace(TOKEN_LIKE, '[redacted]');
}

/**
 * What every request gets before routing, in one middleware (each Express layer costs time on the hot
 * path): helmet's security headers, a request id, `Cache-Control: no-store` (responses can hold a
 * freshly minted token), one
 * structured log line when it finishes, and a 503 once the server is draining.
 *
 * The log line names the operation and its path template, never the query string, a header value or a
 * body, so a credential sent anywhere cannot end up in the log.
 */
/** What a finished request tells the features that watch them (metrics, the audit of failed sign-ins). */
export interface RequestOutcome {
  /** The operation's path template (`/admin/users/{id}`), or null for a path that matched none. */
  route: string | null;
  method: string;
  status: number;
  seconds: number;
  errorCode: string | null;
  /** The client's address as TRUST_PROXY reveals it. */
  ip: string;
}

export type RequestObserver = (outcome: RequestOutcome) => void;

export function requestContext(
  logger: Logger,
  headers: Map<string, string>,
  isDraining: () => boolean,
  observers: readonly RequestObserver[] = [],
  /** sha256 of secrets that must never be taken as a request id (the admin key). */
  secretDigests: readonly Buffer[] = [],
) {
  const acceptable = (id: string) =>
    SAFE_REQUEST_ID.test(id) && !TOKEN_SHAPE.test(id) && !secretDigests.some((d) => createHash('sha256').update(id).digest().equals(d));
  return (req: Request, res: Response, next: NextFunction): void => {
    const started = process.hrtime.bigint();
    const incoming = req.headers['x-request-id'];
    const requestId = typeof incoming === 'string' && acceptable(incoming) ? incoming : randomUUID();
    res.locals.requestId = requestId;
    res.setHeaders(headers);
    res.setHeader('X-Request-Id', requestId);
    res.setHeader('Cache-Control', 'no-store');
    res.on('finish', () => {
      const auth = res.locals.auth as { user?: { id: number }; token?: { id: number } } | undefined;
      const status = res.statusCode;
      const durationMs = Number(process.hrtime.bigint() - started) / 1e6;
      const errorCode = (res.locals.errorCode as string | undefined) ?? null;
      const entry = {
        request_id: requestId,
        method: req.method,
        path: loggablePath(req, res),
        route: (res.locals.operationId as string | undefined) ?? null,
        status,
        duration_ms: durationMs,
        user_id: auth?.user?.id ?? null,
        token_id: auth?.token?.id ?? null,
        error_code: errorCode,
      };
      if (status >= 500) logger.error(entry, 'request');
      else logger.info(entry, 'request');
      if (observers.length > 0) {
        const outcome: RequestOutcome = {
          route: (res.locals.routePath as string | undefined) ?? null,
          method: req.method,
          status,
          seconds: durationMs / 1000,
          errorCode,
          ip: req.ip ?? req.socket.remoteAddress ?? '',
        };
        for (const observe of observers) observe(outcome);
      }
    });
    if (isDraining()) {
      res.setHeader('Connection', 'close');
      throw unavailable('The server is shutting down.');
    }
    next();
  };
}
