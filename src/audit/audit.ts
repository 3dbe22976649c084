import { createHash } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import type { Db } from '../../db/database';
import type { AuditEventRow } from '../../db/schema';
import { contextOf } from '../http/request-context';
import { normalizeClientIp } from '../tokens/ip-allowlist';

/**
 * Who did something. Set by each auth guard in the request context (`actor`), so every change can say who made
 * it without the service knowing about HTTP.
 */
export type Actor =
  | { type: 'admin'; fingerprint: string }
  | { type: 'admin_key'; id: number; name: string }
  | { type: 'key'; userId: number; tokenId: number }
  /** A signed-in person: on /sso as their keyward user, on /admin as an SSO admin (no user). */
  | { type: 'sso'; userId: number | null; subject: string; email: string }
  | { type: 'anonymous' }
  | { type: 'system' };

/** Who, from where, in which request: what every audit entry of a change carries. */
export interface AuditContext {
  actor: Actor;
  ip: string | null;
  requestId: string | null;
}

export const SYSTEM: AuditContext = { actor: { type: 'system' }, ip: null, requestId: null };

export type AuditTarget = { type: 'user' | 'token' | 'bot' | 'admin_key'; id: number; userId: number | null };

export interface AuditEvent {
  action: string;
  target?: AuditTarget;
  /** Changed fields as {old, new}, or the event's facts. Never a secret. */
  details?: Record<string, unknown>;
}

/**
 * Names the admin key without revealing it: the same key always has the same fingerprint, so entries
 * tell which ADMIN_API_TOKEN made a change after the key is replaced.
 */
export function adminFingerprint(adminKeyDigest: Buffer): string {
  return createHash('sha256').update('keyward admin key fingerprint\0').update(adminKeyDigest).digest('hex').slice(0, 16);
}

export function actorId(actor: Actor): string {
  switch (actor.type) {
    case 'admin':
      return `admin:${actor.fingerprint}`;
    case 'admin_key':
      return `admin_key:${actor.id}`;
    case 'key':
      return `token:${actor.tokenId}`;
    case 'sso':
      return `sso:${actor.subject}`;
    default:
      return actor.type;
  }
}

export function auditContextOf(res: ServerResponse): AuditContext {
  const context = contextOf(res);
  return {
    actor: (context.actor as Actor | undefined) ?? { type: 'anonymous' },
    ip: normalizeClientIp(context.ip) || null,
    requestId: context.requestId,
  };
}

/**
 * Writes one entry. Takes the transaction of the change it describes: both commit or neither does.
 */
export async function recordAudit(trx: Db, ctx: AuditContext, at: string, event: AuditEvent): Promise<void> {
  const { actor } = ctx;
  await trx
    .insertInto('audit_events')
    .values({
      at,
      actor_type: actor.type,
      actor_id: actorId(actor),
      actor_user_id: actor.type === 'key' || actor.type === 'sso' ? actor.userId : null,
      actor_token_id: actor.type === 'key' ? actor.tokenId : null,
      actor_email: actor.type === 'sso' ? actor.email : null,
      actor_name: actor.type === 'admin_key' ? actor.name : null,
      action: event.action,
      target_type: event.target?.type ?? null,
      target_id: event.target === undefined ? null : String(event.target.id),
      target_user_id: event.target?.userId ?? null,
      ip: ctx.ip,
      request_id: ctx.requestId,
      details: event.details === undefined ? null : JSON.stringify(event.details),
    })
    .execute();
}

/** The fields whose value differs, as {field: {old, new}}. */
export function changes(before: Record<string, unknown>, after: Record<string, unknown>): Record<string, { old: unknown; new: unknown }> {
  const out: Record<string, { old: unknown; new: unknown }> = {};
  for (const [field, value] of Object.entries(after)) {
    if (value === undefined) continue;
    if (JSON.stringify(before[field]) !== JSON.stringify(value)) out[field] = { old: before[field] ?? null, new: value };
  }
  return out;
}

export interface AuditEventResponse {
  id: number;
  at: string;
  action: string;
  actor: { type: string; id: string; user_id: number | null; token_id: number | null; email: string | null; name: string | null };
  target: { type: string; id: string; user_id: number | null } | null;
  ip: string | null;
  request_id: string | null;
  details: Record<string, unknown> | null;
}

export function toAuditResponse(row: AuditEventRow): AuditEventResponse {
  return {
    id: row.id,
    at: row.at,
    action: row.action,
    actor: { type: row.actor_type, id: row.actor_id, user_id: row.actor_user_id, token_id: row.actor_token_id, email: row.actor_email, name: row.actor_name },
    target: row.target_type === null ? null : { type: row.target_type, id: row.target_id ?? '', user_id: row.target_user_id },
    ip: row.ip,
    request_id: row.request_id,
    details: row.details === null ? null : (JSON.parse(row.details) as Record<string, unknown>),
  };
}
