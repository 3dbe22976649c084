import type { Handler } from '../http/operations';
import { input } from '../http/operations';
import { pageRequest } from '../http/pagination';
import type { AuditFilter, AuditLog } from './audit.service';

function filterOf(query: Record<string, unknown>): AuditFilter {
  return {
    actor: query.actor as string | undefined,
    action: query.action as string | undefined,
    target: query.target as string | undefined,
    since: query.since === undefined ? undefined : new Date(query.since as string).toISOString(),
    until: query.until === undefined ? undefined : new Date(query.until as string).toISOString(),
  };
}

/** The audit log, newest first; paths, auth and validation come from openapi.yaml by operationId. */
export function auditHandlers(audit: AuditLog): Record<string, Handler> {
  return {
    listAuditEvents: async (_req, res) => {
      const { query } = input(res);
      res.json(await audit.list(filterOf(query), pageRequest(query)));
    },
    listUserAuditEvents: async (_req, res) => {
      const { params, query } = input(res);
      // No 404: a deleted user's history stays readable, as the log outlives what it describes.
      res.json(await audit.list({ ...filterOf(query), userId: params.id as number }, pageRequest(query)));
    },
  };
}
