import express, { type NextFunction, type Request, type RequestHandler, type Response, type Router } from 'express';
import type { AuthKind, OperationSpec } from '../openapi/spec';
import { AppError } from './errors';
import { buildValidator, type ValidatedInput } from './validation';

export type Handler = (req: Request, res: Response) => unknown;

const BODY_LIMIT = '64kb';
const JSON_TYPE = /^application\/(?:[\w.+-]+\+)?json\s*(?:;|$)/i;

function hasBody(req: Request): boolean {
  const length = req.headers['content-length'];
  return req.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0');
}

/** The validated, coerced input of the current operation. */
export function input(res: Response): ValidatedInput {
  return res.locals.input as ValidatedInput;
}

// Static segments before parameters, so /admin/users/email/{email} is tried before /admin/users/{id}/…
function compareSpecificity(a: OperationSpec, b: OperationSpec): number {
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
 * Mounts every operation of the contract: auth first (an anonymous caller learns nothing about the
 * body it sent), then the body, then validation, then the handler. Throws at start-up if the contract
 * and the handlers disagree in either direction.
 */
export function mountOperations(
  router: Router,
  operations: OperationSpec[],
  handlers: Record<string, Handler>,
  auth: Record<Exclude<AuthKind, 'none'>, RequestHandler>,
): void {
  const known = new Set(operations.map((o) => o.operationId));
  const orphans = Object.keys(handlers).filter((id) => !known.has(id));
  if (orphans.length > 0) throw new Error(`handlers without an operation in openapi.yaml: ${orphans.join(', ')}`);

  const jsonParser = express.json({ limit: BODY_LIMIT, strict: true, type: () => true });
  const sorted = [...operations].sort(compareSpecificity);

  for (const op of sorted) {
    const handler = handlers[op.operationId];
    if (!handler) throw new Error(`operation ${op.operationId} in openapi.yaml has no handler`);
    const validate = buildValidator(op);
    const chain: RequestHandler[] = [
      (_req, res, next) => {
        res.locals.operationId = op.operationId;
        res.locals.routePath = op.path;
        next();
      },
    ];
    if (op.auth !== 'none') chain.push(auth[op.auth]);
    if (op.requestBody) {
      chain.push((req, _res, next) => {
        if (!hasBody(req)) return next();
        if (!JSON_TYPE.test(req.headers['content-type'] ?? '')) {
          throw new AppError(415, 'UNSUPPORTED_MEDIA_TYPE', 'The request body must be JSON (Content-Type: application/json).');
        }
        jsonParser(req, _res, next);
      });
    }
    chain.push(async (req: Request, res: Response, next: NextFunction) => {
      res.locals.input = validate({ params: req.params, query: req.query as Record<string, unknown>, body: req.body, hasBody: hasBody(req) });
      await handler(req, res);
      if (!res.headersSent) next(new Error(`${op.operationId} sent no response`));
    });
    router[op.method](op.expressPath, ...chain);
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
