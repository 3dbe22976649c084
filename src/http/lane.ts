import type { IncomingMessage, ServerResponse } from 'node:http';
import { parse } from 'node:querystring';
import type { OperationSpec } from '../openapi/spec';
import type { OperationRunner } from './operations';

/**
 * Express 5's "simple" query parser (node:querystring). Express is handed this same function, so a
 * query reads the same whichever way its request is answered.
 */
export const parseQuery = (text: string | null | undefined): Record<string, unknown> => parse(text ?? '');

/**
 * The verification lane: the operations a gateway calls on every request of the platform behind it
 * (`/v1/me`, `/auth/verify`) answered at the node:http level, before Express's per-request machinery
 * (router, request and response prototypes, `res.json`'s send path). It only finds the operation:
 * the request context, the guard, validation, the handler and the error responder are the pieces
 * Express's routes run too (docs/decisions/0008-verification-lane.md).
 *
 * A request the lane does not take exactly (another method, another spelling of the path, a query
 * Express would read differently) goes on to Express, which runs the same operation or answers 404/405.
 *
 * Returns whether it took the request.
 */
export function verificationLane(
  runners: Map<OperationSpec, OperationRunner>,
  operationIds: readonly string[],
  onError: (err: unknown, req: IncomingMessage, res: ServerResponse) => void,
): (req: IncomingMessage, res: ServerResponse) => boolean {
  const routes = new Map<string, OperationRunner>();
  for (const id of operationIds) {
    const entry = [...runners].find(([op]) => op.operationId === id);
    if (!entry) throw new Error(`verification lane: no operation ${id} in openapi.yaml`);
    const [op, run] = entry;
    // Only reads with nothing to route on: no path parameters, no body.
    if (op.method !== 'get' || op.path.includes('{') || op.requestBody) {
      throw new Error(`verification lane: ${id} is not a GET without path parameters or body`);
    }
    routes.set(op.path, run);
  }

  return (req, res) => {
    if (req.method !== 'GET' && req.method !== 'HEAD') return false;
    const url = req.url ?? '';
    const q = url.indexOf('?');
    const run = routes.get(q < 0 ? url : url.slice(0, q));
    if (run === undefined) return false;
    const query = q < 0 ? '' : url.slice(q + 1);
    // A fragment is not part of a request target; Express's URL parser drops it, so leave it to Express.
    if (query.includes('#')) return false;
    run(req, res, {}, parseQuery(query)).catch((err: unknown) => onError(err, req, res));
    return true;
  };
}
