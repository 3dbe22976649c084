/** Every error a client can see. The code is API: clients switch on it, so never rename one. */
export type ErrorCode =
  | 'VALIDATION_ERROR'
  | 'INVALID_JSON'
  | 'AUTHENTICATION_REQUIRED'
  | 'INVALID_API_KEY'
  | 'API_KEY_EXPIRED'
  | 'API_KEY_REVOKED'
  | 'INVALID_ADMIN_KEY'
  | 'ADMIN_KEY_REVOKED'
  | 'ADMIN_KEY_EXPIRED'
  | 'INSUFFICIENT_SCOPE'
  | 'FORBIDDEN_IP'
  | 'USER_DISABLED'
  | 'SSO_ACCESS_DENIED'
  | 'CSRF_CHECK_FAILED'
  | 'NOT_FOUND'
  | 'METHOD_NOT_ALLOWED'
  | 'CONFLICT'
  | 'PAYLOAD_TOO_LARGE'
  | 'UNSUPPORTED_MEDIA_TYPE'
  | 'REQUEST_TIMEOUT'
  | 'RATE_LIMITED'
  | 'CONCURRENCY_LIMIT_EXCEEDED'
  | 'INSUFFICIENT_CREDITS'
  | 'INTERNAL_ERROR'
  | 'UNAVAILABLE';

export interface FieldProblem {
  field: string;
  in: 'body' | 'path' | 'query' | 'header';
  message: string;
}

/**
 * The one error family. `expose` is false for 5xx but 503: their message is replaced by a generic one
 * in the response and the original goes to the log only.
 */
export class AppError extends Error {
  readonly expose: boolean;

  constructor(
    readonly status: number,
    readonly code: ErrorCode,
    message: string,
    readonly details?: unknown,
    /** Extra response headers, e.g. Retry-After or Allow. */
    readonly headers?: Readonly<Record<string, string>>,
  ) {
    // A refusal (4xx) is an expected answer, not a fault: capturing its stack cost 3 µs of a refused
    // request and nobody reads it. Faults (5xx) keep theirs for the log.
    const stackTraceLimit = Error.stackTraceLimit;
    if (status < 500) Error.stackTraceLimit = 0;
    super(message);
    Error.stackTraceLimit = stackTraceLimit;
    this.name = 'AppError';
    // 503's messages are fixed texts that say to try again, never a cause.
    this.expose = status < 500 || code === 'UNAVAILABLE';
  }
}

export const validationError = (problems: FieldProblem[], message = 'The request is not valid.') =>
  new AppError(400, 'VALIDATION_ERROR', message, problems);

export const notFound = (what: string) => new AppError(404, 'NOT_FOUND', `${what} was not found.`);

export const conflict = (message: string, details?: unknown) => new AppError(409, 'CONFLICT', message, details);

export const BODY_LIMIT_BYTES = 64 * 1024;

export const payloadTooLarge = () => new AppError(413, 'PAYLOAD_TOO_LARGE', 'The request body is larger than 64 KiB.');

export const unavailable = (message = 'The service is temporarily unavailable; try again shortly.') =>
  new AppError(503, 'UNAVAILABLE', message, undefined, { 'Retry-After': '1' });
