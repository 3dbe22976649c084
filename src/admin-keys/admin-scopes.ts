/**
 * What an admin credential may do on /admin, one scope per kind of resource and access. Every /admin
 * operation names the one it needs in openapi.yaml (`x-admin-scope`); the root key (ADMIN_API_TOKEN)
 * holds them all.
 */
export const ADMIN_SCOPES = [
  'users:read',
  'users:write',
  'tokens:read',
  'tokens:write',
  'bots:read',
  'bots:write',
  'audit:read',
  'usage:read',
  'backup:create',
  'admin-keys:read',
  'admin-keys:write',
] as const;

export type AdminScope = (typeof ADMIN_SCOPES)[number];

export const isAdminScope = (scope: string): scope is AdminScope => (ADMIN_SCOPES as readonly string[]).includes(scope);
