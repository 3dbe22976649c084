import { authOf } from '../auth/user-auth';
import type { Handler } from '../http/operations';
import { input } from '../http/operations';
import type { UsersService } from '../users/users.service';
import type { UsageService } from './usage';

export function usageHandlers(usage: UsageService, users: UsersService): Record<string, Handler> {
  return {
    getUserUsage: async (_req, res) => {
      const { params, query } = input(res);
      await users.requireRow(params.id as number);
      res.json(await usage.forUser(params.id as number, query.from as string | undefined, query.to as string | undefined));
    },
    getMyUsage: async (_req, res) => {
      const { query } = input(res);
      res.json(await usage.forUser(authOf(res).user.id, query.from as string | undefined, query.to as string | undefined));
    },
  };
}
