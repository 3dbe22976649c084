import type { IncomingMessage, ServerResponse } from 'node:http';
import express, { type Request, type Response, type Router } from 'express';
import type { AuthKind, OperationSpec } from '../openapi/spec';
import { AppError, BODY_LIMIT_BYTES, payloadTooLarge } from './errors';
import { contextOf } from './request-context';
import { buildValidator, type ValidatedInput } from './validation';

/** A handler that uses Express's request and response (res.json, req.params…). */
export type Handler = (req: Request, res: Response) => unknown;
/**
 * A handler that needs nothing but Node's request and response: the verification lane can answer
 * its operation without Express. Every such handler is also an Express handler.
 */
export type NodeHandler = (req: IncomingMessage, res: ServerResponse) => unknown;
/** An auth check for one operation: returns when the caller may go on, throws an AppError otherwise. */
export type Guard = (req: IncomingMessage, res: ServerResponse, op: OperationSpec) => void | Promise<void>;
export type Guards = Record<Exclude<AuthKind, 'none'>, Guard>;

/** Runs one operation for a request whose path parameters and query are already parsed. */
export type OperationRunner = (req: IncomingMessage, res: ServerResponse, params: Record<string, unknown>, query: Record<string, unknown>) => Promise<void>;

const JSON_TYPE = /^application\/(?:[\w.+-]+\+)?json\s*(?:;|$)/i;

function hasBody(req: IncomingMessage): boolean {
  const length = req.headers['content-length'];
  return req.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0');
}

/** The validated, coerced input of the current operation. */
export function input(res: ServerResponse): ValidatedInput {
  return contextOf(res).input as ValidatedInput;
}

const jsonParser = express.json({ limit: BODY_LIMIT_BYTES, strict: true, type: () => true });
const parseJson = (req: IncomingMessage, res: ServerResponse) =>
  new Promise<void>((resolve, reject) => jsonParser(req as Request, res as Response, (err?: unknown) => (err ? reject(err) : resolve())));

/**
 * One operation of the contract, in order: auth first (an anonymous caller learns nothing about the
 * body it sent), then the body, then validation, then the handler. Express's routes and the
 * verification lane both run operations through this, so each rule is written once.
 */
export function operationRunner(op: OperationSpec, handler: Handler | NodeHandler, guard: Guard | undefined): OperationRunner {
  const validate = buildValidator(op);
  return async (req, res, params, query) => {
    const context = contextOf(res);
    context.operationId = op.operationId;
    context.routePath = op.path;
    if (guard) await guard(req, res, op);
    const withBody = hasBody(req);
    if (op.requestBody && withBody) {
      if (!JSON_TYPE.test(req.headers['content-type'] ?? '')) {
        throw new AppError(415, 'UNSUPPORTED_MEDIA_TYPE', 'The request body must be JSON (Content-Type: application/json).');
      }
      // body-parser would read (and discard) a body it has already refused by its Content-Length
      // before answering; refuse it here without reading a byte of it.
      if (Number(req.headers['content-length']) > BODY_LIMIT_BYTES) throw payloadTooLarge();
      await parseJson(req, res);
    }
    context.input = validate({ params, query, body: (req as { body?: unknown }).body, hasBody: withBody });
    await (handler as NodeHandler)(req, res);
    if (!res.headersSent) throw new Error(`${op.operationId} sent no response`);
  };
}

// The user API first: it is the hot path, and Express tries routes in order. Then static segments
// before parameters, so /admin/users/email/{email} is tried before /admin/users/{id}/…
function compareSpecificity(a: OperationSpec, b: OperationSpec): number {
  const aUser = a.auth === 'user';
  if (aUser !== (b.auth === 'user')) return aUser ? -1 : 1;
  const as = a.path.split('/');
  const bs = b.path.split('/');
  for (let i = 0; i < Math.min(as.length, bs.length); i++) {
    const aParam = as[i]!.startsWith('{');
    const bParam = bs[i]!.startsWith('{');
    if (aParam !== bParam) return aParam ? 1 : -1;
  }
  return 0;
}

/** The runner of every operation, checking at start-up that the contract and the handlers agree in both directions. */
export function operationRunners(operations: OperationSpec[], handlers: Record<string, Handler | NodeHandler>, guards: Guards): Map<OperationSpec, OperationRunner> {
  const known = new Set(operations.map((o) => o.operationId));
  const orphans = Object.keys(handlers).filter((id) => !known.has(id));
  if (orphans.length > 0) throw new Error(`handlers without an operation in openapi.yaml: ${orphans.join(', ')}`);
  const runners = new Map<OperationSpec, OperationRunner>();
  for (const op of operations) {
    const handler = handlers[op.operationId];
    if (!handler) throw new Error(`operation ${op.operationId} in openapi.yaml has no handler`);
    runners.set(op, operationRunner(op, handler, op.auth === 'none' ? undefined : guards[op.auth]));
  }
  return runners;
}

/** Mounts every operation on Express's router, and a 405 naming the allowed methods on each path. */
export function mountOperations(router: Router, runners: Map<OperationSpec, OperationRunner>): void {
  const sorted = [...runners.keys()].sort(compareSpecificity);
  for (const op of sorted) {
    const run = runners.get(op)!;
    router[op.method](op.expressPath, (req: Request, res: Response) => run(req, res, req.params, req.query as Record<string, unknown>));
  }

  const methodsByPath = new Map<string, string[]>();
  for (const op of sorted) methodsByPath.set(op.expressPath, [...(methodsByPath.get(op.expressPath) ?? []), op.method.toUpperCase()]);
  for (const [path, methods] of methodsByPath) {
    const allow = [...methods, ...(methods.includes('GET') ? ['HEAD'] : [])].join(', ');
    router.all(path, () => {
      throw new AppError(405, 'METHOD_NOT_ALLOWED', `This path accepts ${allow}.`, { allow: allow.split(', ') }, { Allow: allow });
    });
  }
}
