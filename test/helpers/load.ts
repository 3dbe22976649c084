import http from 'node:http';
import { performance } from 'node:perf_hooks';
import Database from 'better-sqlite3';
import type { ServerProcess } from './server-process';

/**
 * Plain node:http requests against a real server process, for tests that kill or stop it mid-load.
 * Every request resolves (never rejects) with what the client saw, and is bounded: a request still
 * open after its timeout is reported as HANG, which the tests treat as a failure.
 */

export type Outcome =
  | {
      kind: 'response';
      status: number;
      headers: http.IncomingHttpHeaders;
      body: any;
      /** performance.now() when the server sent 100 Continue, i.e. began handling the request. */
      continuedAt: number | null;
      reusedSocket: boolean;
    }
  | {
      kind: 'error';
      /** ECONNREFUSED, ECONNRESET (also "socket hang up"), EPIPE, ABORTED (response cut short), HANG… */
      code: string;
      continuedAt: number | null;
      reusedSocket: boolean;
    };

export interface CallOptions {
  port: number;
  method: string;
  path: string;
  headers?: Record<string, string>;
  body?: unknown;
  /** A keep-alive agent, or false for a fresh connection of its own. */
  agent?: http.Agent | false;
  /**
   * Sends `Expect: 100-continue` and the body only once the server answers 100. Node's server sends
   * the 100 and hands the request to the app in the same tick, so a request that saw it is one the
   * app has started on: the event that separates "in flight" from "sent, maybe never read".
   */
  expectContinue?: boolean;
  /** Called when the body is about to be written (after 100 Continue when expected); may delay it. */
  writeBody?: (req: http.ClientRequest, body: Buffer) => void;
  timeoutMs?: number;
}

export const DEFAULT_CALL_TIMEOUT_MS = 20_000;

export function call(options: CallOptions): Promise<Outcome> {
  return new Promise((resolve) => {
    const body = options.body === undefined ? undefined : Buffer.from(JSON.stringify(options.body));
    const headers: Record<string, string> = { ...(options.headers ?? {}) };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      headers['Content-Length'] = String(body.length);
    }
    if (options.expectContinue) headers.Expect = '100-continue';
    let continuedAt: number | null = null;
    let settled = false;
    const finish = (outcome: Outcome) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(outcome);
    };
    const req = http.request({
      host: '127.0.0.1',
      port: options.port,
      method: options.method,
      path: options.path,
      headers,
      agent: options.agent ?? false,
    });
    const timer = setTimeout(() => {
      finish({ kind: 'error', code: 'HANG', continuedAt, reusedSocket: req.reusedSocket });
      req.destroy();
    }, options.timeoutMs ?? DEFAULT_CALL_TIMEOUT_MS);
    const sendBody = () => {
      if (body === undefined) req.end();
      else if (options.writeBody) options.writeBody(req, body);
      else req.end(body);
    };
    req.on('continue', () => {
      continuedAt = performance.now();
      sendBody();
    });
    req.on('error', (err: NodeJS.ErrnoException) => {
      finish({ kind: 'error', code: err.code ?? err.message, continuedAt, reusedSocket: req.reusedSocket });
    });
    req.on('response', (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('aborted', () => finish({ kind: 'error', code: 'ABORTED', continuedAt, reusedSocket: req.reusedSocket }));
      res.on('error', () => finish({ kind: 'error', code: 'ABORTED', continuedAt, reusedSocket: req.reusedSocket }));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let parsed: unknown = text;
        if (text !== '' && /^application\/json/.test(res.headers['content-type'] ?? '')) {
          try {
            parsed = JSON.parse(text);
          } catch {
            parsed = text;
          }
        }
        finish({ kind: 'response', status: res.statusCode ?? 0, headers: res.headers, body: text === '' ? null : parsed, continuedAt, reusedSocket: req.reusedSocket });
      });
    });
    if (!options.expectContinue) sendBody();
  });
}

/** A response with this status, or a readable failure naming what came back instead. */
export function expectStatus(outcome: Outcome, status: number, what = ''): any {
  const seen = outcome.kind === 'response' ? `${outcome.status} ${JSON.stringify(outcome.body)}` : `error ${outcome.code}`;
  if (outcome.kind !== 'response' || outcome.status !== status) throw new Error(`${what}: expected ${status}, got ${seen}`);
  return outcome.body;
}

/** The one error envelope: `{error: {code, message, details, request_id}}`, request_id echoed in X-Request-Id. */
export function isEnvelope(outcome: Outcome, status: number, code: string): boolean {
  if (outcome.kind !== 'response' || outcome.status !== status) return false;
  const body = outcome.body as { error?: Record<string, unknown> } | null;
  if (body === null || typeof body !== 'object' || Object.keys(body).join() !== 'error' || !body.error) return false;
  return (
    body.error.code === code &&
    Object.keys(body.error).sort().join() === 'code,details,message,request_id' &&
    body.error.request_id === outcome.headers['x-request-id'] &&
    /^application\/json/.test(outcome.headers['content-type'] ?? '')
  );
}

/** Small, seedable and good enough to pick operations; the seed is printed so a run can be replayed. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Resolves once the server has logged a line with this `msg`; rejects after the timeout. */
export function waitForLog(server: ServerProcess, msg: string, timeoutMs = 10_000): Promise<void> {
  const seen = () => server.stdout.split('\n').some((line) => line.includes(`"msg":${JSON.stringify(msg)}`));
  if (seen()) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const onData = () => {
      if (!seen()) return;
      done();
      resolve();
    };
    const done = () => {
      clearTimeout(timer);
      server.child.stdout?.off('data', onData);
    };
    const timer = setTimeout(() => {
      done();
      reject(new Error(`the server did not log "${msg}" within ${timeoutMs} ms.\n${server.logs}`));
    }, timeoutMs);
    // Registered after the helper's own listener, so server.stdout already holds this chunk.
    server.child.stdout?.on('data', onData);
  });
}

/** SQLite's own verdict on the file, from a read-only connection of our own. */
export function checkDatabaseFile(path: string): { integrity: string[]; foreignKeyViolations: unknown[] } {
  const db = new Database(path, { readonly: true, fileMustExist: true });
  try {
    const integrity = (db.pragma('integrity_check') as Array<{ integrity_check: string }>).map((r) => r.integrity_check);
    const foreignKeyViolations = db.pragma('foreign_key_check') as unknown[];
    return { integrity, foreignKeyViolations };
  } finally {
    db.close();
  }
}

/** Runs `work` with a read-only connection to the file, closed afterwards. */
export function readDatabase<T>(path: string, work: (db: Database.Database) => T): T {
  const db = new Database(path, { readonly: true, fileMustExist: true });
  try {
    return work(db);
  } finally {
    db.close();
  }
}
