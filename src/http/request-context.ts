import { randomUUID } from 'node:crypto';
import type { Request, Response, NextFunction } from 'express';
import type { Logger } from '../logger';

// An incoming X-Request-Id is kept only if it is short and plain, so it cannot smuggle text into logs.
const SAFE_REQUEST_ID = /^[A-Za-z0-9._:-]{1,64}$/;

export function requestId(req: Request, res: Response, next: NextFunction): void {
  const incoming = req.headers['x-request-id'];
  const id = typeof incoming === 'string' && SAFE_REQUEST_ID.test(incoming) ? incoming : randomUUID();
  res.locals.requestId = id;
  res.setHeader('X-Request-Id', id);
  next();
}

// Runs of 20+ letters and digits in an unmatched path are masked: a token pasted into a URL must not
// reach the log through a 404.
const TOKEN_LIKE = /[A-Za-z0-9]{20,}/g;

/** The path as logs may show it. */
export function loggablePath(req: Request, res: Response): string {
  return (res.locals.routePath as string | undefined) ?? req.path.replace(TOKEN_LIKE, '[redacted]');
}

/**
 * One structured line per request. It names the operation and its path template (never the actual
 * values, which can hold emails), never the query string, a header value or a body, so a credential
 * sent anywhere cannot end up in the log.
 */
export function requestLog(logger: Logger) {
  return (req: Request, res: Response, next: NextFunction): void => {
    const started = process.hrtime.bigint();
    res.on('finish', () => {
      const auth = res.locals.auth as { user?: { id: number }; token?: { id: number } } | undefined;
      const status = res.statusCode;
      const entry = {
        request_id: res.locals.requestId as string,
        method: req.method,
        path: loggablePath(req, res),
        route: (res.locals.operationId as string | undefined) ?? null,
        status,
        duration_ms: Number(process.hrtime.bigint() - started) / 1e6,
        user_id: auth?.user?.id ?? null,
        token_id: auth?.token?.id ?? null,
        error_code: (res.locals.errorCode as string | undefined) ?? null,
      };
      if (status >= 500) logger.error(entry, 'request');
      else logger.info(entry, 'request');
    });
    next();
  };
}
