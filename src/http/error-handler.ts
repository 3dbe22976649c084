import type { IncomingMessage, ServerResponse } from 'node:http';
import type { ErrorRequestHandler } from 'express';
import { isStorageUnavailable } from '../../db/database';
import type { Logger } from '../logger';
import { AppError, payloadTooLarge, unavailable } from './errors';
import { sendJson } from './json-response';
import { contextOf, loggablePath } from './request-context';

// body-parser reports its failures with a `type`; each maps to the code product.md gives it.
const BODY_ERRORS: Record<string, () => AppError> = {
  'entity.parse.failed': () => new AppError(400, 'INVALID_JSON', 'The request body is not valid JSON.'),
  'entity.too.large': payloadTooLarge,
  'encoding.unsupported': () => new AppError(415, 'UNSUPPORTED_MEDIA_TYPE', 'The request body encoding is not supported.'),
  'charset.unsupported': () => new AppError(415, 'UNSUPPORTED_MEDIA_TYPE', 'The request body must be UTF-8 JSON.'),
  'request.aborted': () => new AppError(400, 'VALIDATION_ERROR', 'The request body was not received completely.'),
  'request.size.invalid': () => new AppError(400, 'VALIDATION_ERROR', 'The request body does not match its Content-Length.'),
};

function statusOf(err: unknown): number | undefined {
  if (typeof err !== 'object' || err === null) return undefined;
  const status = (err as { status?: unknown; statusCode?: unknown }).status ?? (err as { statusCode?: unknown }).statusCode;
  return typeof status === 'number' ? status : undefined;
}

/** Turns anything thrown into an AppError; what is not understood becomes a 500. */
export function toAppError(err: unknown): AppError {
  if (err instanceof AppError) return err;
  if (isStorageUnavailable(err)) return unavailable();
  const type = typeof err === 'object' && err !== null ? (err as { type?: unknown }).type : undefined;
  if (typeof type === 'string' && BODY_ERRORS[type]) return BODY_ERRORS[type]();
  const status = statusOf(err);
  // Express's own 4xx (a path parameter that is not valid percent-encoding, say).
  if (status !== undefined && status >= 400 && status < 500) {
    return new AppError(400, 'VALIDATION_ERROR', 'The request could not be understood.');
  }
  return new AppError(500, 'INTERNAL_ERROR', 'Internal server error.');
}

/** The one envelope: `{error: {code, message, details, request_id}}`. */
export function sendError(res: ServerResponse, error: AppError): void {
  const context = contextOf(res);
  if (context) context.errorCode = error.code;
  for (const [name, value] of Object.entries(error.headers ?? {})) res.setHeader(name, value);
  // Refused before its body arrived (too large, wrong key): Node would otherwise read and discard the
  // rest of the body, up to HTTP_REQUEST_TIMEOUT_SECONDS of it, to keep the connection. Not worth it.
  if (!res.req.complete) res.setHeader('Connection', 'close');
  sendJson(res, error.status, {
    error: {
      code: error.code,
      message: error.expose ? error.message : 'Internal server error.',
      details: error.details ?? null,
      request_id: context?.requestId ?? null,
    },
  });
}

/** The one place where errors become responses, for the lane and for Express alike. */
export function errorResponder(logger: Logger): (err: unknown, req: IncomingMessage, res: ServerResponse) => void {
  return (err, req, res) => {
    const error = toAppError(err);
    if (error.status >= 500) {
      // The cause goes to the log, never to the client. Errors carry no credentials: nothing in
      // keyward puts a token or key into an error message.
      logger.error({ err, request_id: contextOf(res)?.requestId, path: loggablePath(req, res) }, 'request failed');
    }
    if (res.headersSent) {
      // Half a response is already on the wire; the only honest thing left is to cut the connection.
      req.socket.destroy();
      return;
    }
    sendError(res, error);
  };
}

export function errorHandler(logger: Logger): ErrorRequestHandler {
  const respond = errorResponder(logger);
  return (err: unknown, req, res, _next) => respond(err, req, res);
}
