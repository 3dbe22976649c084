import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parse } from 'yaml';
import { isAdminScope } from '../admin-keys/admin-scopes';
import { findProjectPath } from '../project-files';

/**
 * openapi/openapi.yaml is the contract and also the routing table: every operation in it is mounted
 * with the auth its `security` names and the validation its schemas describe, and nothing else is.
 * So the document users read at /docs cannot drift from what the server does.
 */
export type AuthKind = 'admin' | 'user' | 'sso' | 'metrics' | 'none';

export type JsonSchema = Record<string, unknown>;

export interface ParameterSpec {
  name: string;
  in: 'path' | 'query' | 'header' | 'cookie';
  required: boolean;
  schema: JsonSchema;
}

export interface OperationSpec {
  operationId: string;
  method: 'get' | 'post' | 'put' | 'patch' | 'delete';
  path: string;
  expressPath: string;
  auth: AuthKind;
  /**
   * The scope the caller's credential needs. User operations: `x-required-scope`, a user scope, or
   * null where the operation declares `none`. Admin operations: `x-admin-scope`, an admin scope
   * (src/admin-keys/admin-scopes.ts), never none. Every such operation must declare one: deny by default.
   */
  requiredScope: string | null;
  parameters: ParameterSpec[];
  requestBody?: { required: boolean; schema: JsonSchema };
}

export interface OpenApiDocument {
  openapi: string;
  paths: Record<string, Record<string, unknown>>;
  components?: Record<string, Record<string, unknown>>;
  security?: Array<Record<string, string[]>>;
  [key: string]: unknown;
}

/** Which side of keyward each security scheme opens. */
export const SECURITY_SCHEMES: Record<string, Exclude<AuthKind, 'none'>> = {
  AdminApiKey: 'admin',
  UserApiKey: 'user',
  UserBearer: 'user',
  SsoProxy: 'sso',
  MetricsToken: 'metrics',
};

const METHODS = ['get', 'post', 'put', 'patch', 'delete'] as const;

export function findSpecFile(start = __dirname): string {
  return findProjectPath(join('openapi', 'openapi.yaml'), start);
}

let cached: OpenApiDocument | undefined;

export function loadSpec(): OpenApiDocument {
  cached ??= parse(readFileSync(findSpecFile(), 'utf8')) as OpenApiDocument;
  return cached;
}

/** Replaces every local $ref with a copy of its target; keyward's schemas have no cycles. */
export function dereference(doc: OpenApiDocument, value: unknown, depth = 0): unknown {
  if (depth > 32) throw new Error('openapi: $ref nesting is too deep (a cycle?)');
  if (Array.isArray(value)) return value.map((v) => dereference(doc, v, depth + 1));
  if (typeof value !== 'object' || value === null) return value;
  const ref = (value as { $ref?: unknown }).$ref;
  if (typeof ref === 'string') {
    if (!ref.startsWith('#/')) throw new Error(`openapi: only local $refs are supported, got ${ref}`);
    let target: unknown = doc;
    for (const part of ref.slice(2).split('/')) target = (target as Record<string, unknown> | undefined)?.[part];
    if (target === undefined) throw new Error(`openapi: $ref ${ref} points nowhere`);
    return dereference(doc, target, depth + 1);
  }
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value)) out[k] = dereference(doc, v, depth + 1);
  return out;
}

function authOf(operationId: string, security: Array<Record<string, string[]>>): AuthKind {
  const kinds = new Set<AuthKind>();
  for (const requirement of security) {
    for (const scheme of Object.keys(requirement)) {
      const kind = SECURITY_SCHEMES[scheme];
      if (!kind) throw new Error(`openapi: ${operationId} names unknown security scheme ${scheme}`);
      kinds.add(kind);
    }
  }
  if (kinds.size > 1) throw new Error(`openapi: ${operationId} mixes admin and user security`);
  return kinds.values().next().value ?? 'none';
}

function requiredScopeOf(operationId: string, auth: AuthKind, raw: Record<string, unknown>): string | null {
  const userScope = raw['x-required-scope'];
  const adminScope = raw['x-admin-scope'];
  if (auth !== 'user' && userScope !== undefined) throw new Error(`openapi: ${operationId} is not a user operation but declares x-required-scope`);
  if (auth !== 'admin' && adminScope !== undefined) throw new Error(`openapi: ${operationId} is not an admin operation but declares x-admin-scope`);
  if (auth === 'admin') {
    if (typeof adminScope !== 'string' || !isAdminScope(adminScope)) {
      throw new Error(`openapi: admin operation ${operationId} declares no x-admin-scope of src/admin-keys/admin-scopes.ts (got ${JSON.stringify(adminScope)})`);
    }
    return adminScope;
  }
  if (auth !== 'user') return null;
  if (typeof userScope !== 'string' || userScope === '') {
    throw new Error(`openapi: user operation ${operationId} declares no x-required-scope (a scope, or "none")`);
  }
  return userScope === 'none' ? null : userScope;
}

export function listOperations(doc: OpenApiDocument): OperationSpec[] {
  const operations: OperationSpec[] = [];
  for (const [path, item] of Object.entries(doc.paths)) {
    const shared = (item.parameters as unknown[] | undefined) ?? [];
    for (const method of METHODS) {
      const raw = item[method] as Record<string, unknown> | undefined;
      if (!raw) continue;
      const operationId = raw.operationId as string | undefined;
      if (!operationId) throw new Error(`openapi: ${method.toUpperCase()} ${path} has no operationId`);
      // Deny by default: an operation must say what protects it, even if that is "nothing".
      const security = (raw.security ?? doc.security) as Array<Record<string, string[]>> | undefined;
      if (!security) throw new Error(`openapi: ${operationId} declares no security`);
      const parameters = dereference(doc, [...shared, ...((raw.parameters as unknown[] | undefined) ?? [])]) as ParameterSpec[];
      const body = dereference(doc, raw.requestBody) as
        | { required?: boolean; content?: Record<string, { schema: JsonSchema }> }
        | undefined;
      const jsonSchema = body?.content?.['application/json']?.schema;
      if (body && !jsonSchema) throw new Error(`openapi: ${operationId} has a request body that is not application/json`);
      const auth = authOf(operationId, security);
      // The path decides which API an operation belongs to; its security must agree, so a /v1 route
      // cannot be opened (security: []) or handed to the admin key by a slip in the document.
      const expected: AuthKind | undefined = path.startsWith('/v1/')
        ? 'user'
        : path.startsWith('/admin/')
          ? 'admin'
          : path.startsWith('/sso/')
            ? 'sso'
            : path === '/metrics'
              ? 'metrics'
              : undefined;
      if (expected !== undefined && auth !== expected) {
        throw new Error(`openapi: ${operationId} is under ${path.split('/')[1]}/ but its security is ${auth === 'none' ? 'open' : auth}`);
      }
      operations.push({
        operationId,
        method,
        path,
        expressPath: path.replace(/\{([^}]+)\}/g, ':$1'),
        auth,
        requiredScope: requiredScopeOf(operationId, auth, raw),
        parameters,
        requestBody: jsonSchema ? { required: body?.required === true, schema: jsonSchema } : undefined,
      });
    }
  }
  return operations;
}
