import pino, { type DestinationStream, type Logger } from 'pino';
import type { LogLevel } from './config';

export type { Logger };

/**
 * Credentials must never reach a log line, whatever a future caller passes in. These paths cover the
 * headers and body fields that can carry one; request logs also never include query strings or bodies.
 */
export const REDACT_PATHS = [
  'req.headers["x-api-key"]',
  'req.headers["x-admin-api-key"]',
  'req.headers.authorization',
  'req.headers.cookie',
  'headers["x-api-key"]',
  'headers["x-admin-api-key"]',
  'headers.authorization',
  'headers.cookie',
  'token',
  'secret',
  'secret_hash',
  'secretHash',
  '*.token',
  '*.secret',
  '*.secret_hash',
  '*.secretHash',
];

/**
 * Without an explicit destination, logs go to stdout asynchronously: a synchronous write per request
 * line was the largest single cost of the hot path. Lines written while a write is in flight are
 * coalesced into the next one; pino flushes what is pending when the process exits.
 */
export function createLogger(level: LogLevel, destination?: DestinationStream): Logger {
  return pino(
    {
      level,
      base: { service: 'keyward' },
      timestamp: pino.stdTimeFunctions.isoTime,
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
      formatters: { level: (label) => ({ level: label }) },
    },
    destination ?? pino.destination({ dest: 1, sync: false }),
  );
}
