import express, { type Request, type Response, type Router } from 'express';
import type { AuthKind, OperationSpec } from '../openapi/spec';
import { AppError, BODY_LIMIT_BYTES, payloadTooLarge } from './errors';
import { buildValidator, type ValidatedInput } from './validation';

export type Handler = (req: Request, res: Response) => unknown;
/** An auth check for one operation: returns when the caller may go on, throws an AppError otherwise. */
export type Guard = (req: Request, res: Response, op: OperationSpec) => void | Promise<void>;

const JSON_TYPE = /^application\/(?:[\w.+-]+\+)?json\s*(?:;|$)/i;

function hasBody(req: Request): boolean {
  const length = req.headers['content-length'];
  return req.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0');
}

/** The validated, coerced input of the current operation. */
export function input(res: Response): ValidatedInput {
  return res.locals.input as ValidatedInput;
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

/**
 * Mounts every operation of the contract as one route handler: auth first (an anonymous caller learns
 * nothing about the body it sent), then the body, then validation, then the handler. Throws at
 * start-up if the contract and the handlers disagree in either direction.
 */
export function mountOperations(
  router: Router,
  operations: OperationSpec[],
  handlers: Record<string, Handler>,
  guards: Record<Exclude<AuthKind, 'none'>, Guard>,
): void {
  const known = new Set(operations.map((o) => o.operationId));
  const orphans = Object.keys(handlers).filter((id) => !known.has(id));
  if (orphans.length > 0) throw new Error(`handlers without an operation in openapi.yaml: ${orphans.join(', ')}`);

  const jsonParser = express.json({ limit: BODY_LIMIT_BYTES, strict: true, type: () => true });
  const parseJson = (req: Request, res: Response) =>
    new Promise<void>((resolve, reject) => jsonParser(req, res, (err?: unknown) => (err ? reject(err) : resolve())));
  const sorted = [...operations].sort(compareSpecificity);

  for (const op of sorted) {
    const handler = handlers[op.operationId];
    if (!handler) throw new Error(`operation ${op.operationId} in openapi.yaml has no handler`);
    const validate = buildValidator(op);
    const guard = op.auth === 'none' ? undefined : guards[op.auth];
    router[op.method](op.expressPath, async (req: Request, res: Response) => {
      res.locals.operationId = op.operationId;
      res.locals.routePath = op.path;
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
      res.locals.input = validate({ params: req.params, query: req.query as Record<string, unknown>, body: req.body, hasBody: withBody });
      await handler(req, res);
      if (!res.headersSent) throw new Error(`${op.operationId} sent no response`);
    });
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
