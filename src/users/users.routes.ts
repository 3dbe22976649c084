import { auditContextOf } from '../audit/audit';
import type { Handler } from '../http/operations';
import { input } from '../http/operations';
import { pageRequest } from '../http/pagination';
import type { CreateUserInput, UpdateUserInput, UsersService } from './users.service';

/** Admin user management; paths, auth and validation come from openapi.yaml by operationId. */
export function usersHandlers(users: UsersService): Record<string, Handler> {
  return {
    createUser: async (req, res) => {
      const user = await users.create(input(res).body as CreateUserInput, auditContextOf(res));
      res.status(201).location(`/admin/users/${user.id}`).json(user);
    },
    listUsers: async (_req, res) => {
      const { query } = input(res);
      res.json(await users.list(pageRequest(query), { emailContains: query.email as string | undefined, externalId: query.external_id as string | undefined }));
    },
    getUser: async (_req, res) => {
      res.json(await users.get(input(res).params.id as number));
    },
    getUserByEmail: async (_req, res) => {
      res.json(await users.getByEmail(input(res).params.email as string));
    },
    updateUser: async (req, res) => {
      const { params, body } = input(res);
      res.json(await users.update(params.id as number, body as UpdateUserInput, auditContextOf(res)));
    },
    deleteUser: async (req, res) => {
      await users.delete(input(res).params.id as number, auditContextOf(res));
      res.status(204).end();
    },
  };
}
