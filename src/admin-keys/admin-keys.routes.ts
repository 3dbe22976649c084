import { auditContextOf } from '../audit/audit';
import type { Handler } from '../http/operations';
import { input } from '../http/operations';
import { pageRequest } from '../http/pagination';
import { adminIdentityOf } from './admin-key-verifier';
import type { AdminKeysService, CreateAdminKeyInput } from './admin-keys.service';

/** /admin/admin-keys; paths, auth, scopes and validation come from openapi.yaml by operationId. */
export function adminKeysHandlers(keys: AdminKeysService): Record<string, Handler> {
  return {
    createAdminKey: async (_req, res) => {
      const created = await keys.create(input(res).body as CreateAdminKeyInput, adminIdentityOf(res), auditContextOf(res));
      res.status(201).location(`/admin/admin-keys/${created.id}`).json(created);
    },
    listAdminKeys: async (_req, res) => {
      res.json(await keys.list(pageRequest(input(res).query)));
    },
    getAdminKey: async (_req, res) => {
      res.json(await keys.get(input(res).params.id as number));
    },
    revokeAdminKey: async (_req, res) => {
      await keys.revoke(input(res).params.id as number, auditContextOf(res));
      res.status(204).end();
    },
  };
}
