import { validationError } from '../http/errors';
import type { Handler } from '../http/operations';
import { input } from '../http/operations';
import { pageRequest } from '../http/pagination';
import type { AuditFilter, AuditLog } from './audit.service';

/**
 * A query's date-time as stored times are written (UTC, milliseconds), so that a time with an offset is
 * compared as that instant; also used by the token listing's expires_before.
 */
export function instant(field: string, value: unknown): string | undefined {
  if (value === undefined) return undefined;
  const ms = Date.parse(value as string);
  // The schema accepts a leap second (23:59:60), which Date cannot hold.
  if (Number.isNaN(ms)) throw validationError([{ field, in: 'query', message: 'is not a time keyward can represent' }]);
  return new Date(ms).toISOString();
}

function filterOf(query: Record<string, unknown>): AuditFilter {
  return {
    actor: query.actor as string | undefined,
    action: query.action as string | undefined,
    target: query.target as string | undefined,
    since: instant('since', query.since),
    until: instant('until', query.until),
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
