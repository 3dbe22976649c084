import { createHash, randomUUID } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { isIP } from 'node:net';
import proxyaddr from 'proxy-addr';
import type { TrustProxy } from '../config';
import type { Logger } from '../logger';
import { AppError, unavailable } from './errors';

// An incoming X-Request-Id is kept only if it is short and plain, so it cannot smuggle text into logs.
const SAFE_REQUEST_ID = /^[A-Za-z0-9._:-]{1,64}$/;
// …and only if it is not a credential sent in the wrong header: an id is logged, echoed and audited.
const TOKEN_SHAPE = /_(?:live|test|admin)_[A-Za-z0-9]{12}_[A-Za-z0-9]{6}/;

// Runs of 20+ letters and digits in an unmatched path are masked: a token pasted into a URL must not
// reach the log through a 404.
const TOKEN_LIKE = /[A-Za-z0-9]{20,}/g;

/**
 * What keyward knows about a request from its first byte to its log line, whichever way it is
 * answered (the verification lane or Express). It lives on `res.locals`, where Express keeps what it
 * finds there, so Express handlers and the lane read the same object; features keep their own data
 * (the verified key, the actor, the validated input) in further slots of it.
 */
export interface RequestContext {
  readonly requestId: string;
  /** The client's address as TRUST_PROXY reveals it. */
  readonly ip: string;
  readonly started: bigint;
  /** Set once the request matched an operation of the contract. */
  operationId: string | null;
  /** The operation's path template (`/admin/users/{id}`). */
  routePath: string | null;
  /** Who the request was let in as, for the log line; set by the guards. */
  userId: number | null;
  tokenId: number | null;
  /** The code of the error answered, if any. */
  errorCode: string | null;
  [slot: string]: unknown;
}

export function contextOf(res: ServerResponse): RequestContext {
  return (res as ServerResponse & { locals: RequestContext }).locals;
}

/** The caller's address as TRUST_PROXY allows it to be known. */
export const clientIpOf = (res: ServerResponse): string => contextOf(res).ip;

/** The path as logs may show it: the operation's template, never the values in it (emails, tokens). */
export function loggablePath(req: IncomingMessage, res: ServerResponse): string {
  const route = contextOf(res)?.routePath;
  if (route) return route;
  const url = req.url ?? '/';
  const query = url.indexOf('?');
  return (query < 0 ? url : url.slice(0, query)).replace(TOKEN_LIKE, '[redacted]');
}

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

/**
 * TRUST_PROXY as the function proxy-addr (and Express's `req.ip`) applies: nothing trusted, the
 * nearest `n` hops, or the named proxies. Express is handed the same function, so there is one rule.
 */
export function trustFunction(trust: TrustProxy): (address: string, hop: number) => boolean {
  if (trust === false) return () => false;
  if (typeof trust === 'number') return (_address, hop) => hop < trust;
  return proxyaddr.compile(trust);
}

export interface PipelineOptions {
  logger: Logger;
  /** Response headers every answer carries (helmet's, decided once at start-up). */
  headers: Map<string, string>;
  isDraining: () => boolean;
  observers?: readonly RequestObserver[];
  /** sha256 of secrets that must never be taken as a request id (the admin key). */
  secretDigests?: readonly Buffer[];
  trustProxy: TrustProxy;
}

/**
 * What every request gets before it is routed, whichever way it is then answered: a request id,
 * the client's address, helmet's security headers, `Cache-Control: no-store` (responses can hold a
 * freshly minted token), one structured log line and the observers when it finishes, a 503 once the
 * server is draining, and a 400 when X-Forwarded-For does not name an address.
 *
 * The log line names the operation and its path template, never the query string, a header value or a
 * body, so a credential sent anywhere cannot end up in the log.
 *
 * Returns the refusal to answer, if any; the caller sends it through the one error responder.
 */
export function requestPipeline(options: PipelineOptions): (req: IncomingMessage, res: ServerResponse) => AppError | undefined {
  const { isDraining } = options;
  // The request line holds only fields written here (never a header, query or body), so pino's
  // redaction pass, more than half of the line's cost, has nothing to do on it. Every other line
  // keeps it.
  const requestLog = options.logger.child({}, { redact: [] });
  const observers = options.observers ?? [];
  const secretDigests = options.secretDigests ?? [];
  const trust = trustFunction(options.trustProxy);
  const checksAddress = options.trustProxy !== false;
  const headers = new Map([...options.headers, ['Cache-Control', 'no-store']]);
  const acceptable = (id: string) =>
    SAFE_REQUEST_ID.test(id) && !TOKEN_SHAPE.test(id) && !secretDigests.some((d) => createHash('sha256').update(id).digest().equals(d));

  return (req, res) => {
    const started = process.hrtime.bigint();
    const incoming = req.headers['x-request-id'];
    const context: RequestContext = {
      requestId: typeof incoming === 'string' && acceptable(incoming) ? incoming : randomUUID(),
      // A socket already closed has no address; proxy-addr then has none to give.
      ip: (proxyaddr(req, trust) as string | undefined) ?? '',
      started,
      operationId: null,
      routePath: null,
      userId: null,
      tokenId: null,
      errorCode: null,
    };
    (res as ServerResponse & { locals: RequestContext }).locals = context;
    res.setHeaders(headers);
    res.setHeader('X-Request-Id', context.requestId);
    res.on('finish', () => {
      const status = res.statusCode;
      const durationMs = Number(process.hrtime.bigint() - started) / 1e6;
      const entry = {
        request_id: context.requestId,
        method: req.method,
        path: loggablePath(req, res),
        route: context.operationId,
        status,
        duration_ms: durationMs,
        user_id: context.userId,
        token_id: context.tokenId,
        error_code: context.errorCode,
      };
      if (status >= 500) requestLog.error(entry, 'request');
      else requestLog.info(entry, 'request');
      if (observers.length > 0) {
        const outcome: RequestOutcome = {
          route: context.routePath,
          method: req.method ?? '',
          status,
          seconds: durationMs / 1000,
          errorCode: context.errorCode,
          ip: context.ip,
        };
        for (const observe of observers) observe(outcome);
      }
    });
    if (isDraining()) {
      res.setHeader('Connection', 'close');
      return unavailable('The server is shutting down.');
    }
    // With TRUST_PROXY, a proxy that passes on what a client wrote in X-Forwarded-For (say, a hop
    // count larger than the proxies in front) makes the address any text the client likes. Such a
    // request is refused: it would match no allowlist and get per-address limits for every spelling.
    if (checksAddress && isIP(context.ip) === 0) {
      return new AppError(400, 'VALIDATION_ERROR', 'X-Forwarded-For does not name the client by its IP address.', [
        { field: 'X-Forwarded-For', in: 'header', message: 'must list IP addresses' },
      ]);
    }
    return undefined;
  };
}
