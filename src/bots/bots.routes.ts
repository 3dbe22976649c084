import { auditContextOf } from '../audit/audit';
import { authOf } from '../auth/user-auth';
import type { Handler } from '../http/operations';
import { input } from '../http/operations';
import { pageRequest } from '../http/pagination';
import type { BotFilter } from './bots.repository';
import type { UsersService } from '../users/users.service';
import type { AcquireInput, BotsService } from './bots.service';

const ADMIN = { kind: 'admin' } as const;

/** The user API for runners: acquire a slot, keep it alive, give it back. */
export function botsHandlers(bots: BotsService): Record<string, Handler> {
  const me = (res: Parameters<Handler>[1]) => ({ kind: 'user' as const, userId: authOf(res).user.id });
  return {
    acquireBot: async (_req, res) => {
      const { user, token } = authOf(res);
      const bot = await bots.acquire(user.id, token.id, (input(res).body ?? {}) as AcquireInput);
      res.status(201).location(`/v1/bots/${bot.id}`).json(bot);
    },
    listMyBots: async (_req, res) => {
      const { user } = authOf(res);
      const page = await bots.list({ userId: user.id, status: 'active' }, pageRequest(input(res).query));
      res.json({ ...page, concurrency: await bots.concurrency(user) });
    },
    getMyBot: async (_req, res) => {
      res.json(await bots.get(input(res).params.id as number, me(res)));
    },
    heartbeatBot: async (_req, res) => {
      const { params, body } = input(res);
      res.json(await bots.heartbeat(params.id as number, me(res), (body as { ttl_seconds?: number } | undefined)?.ttl_seconds));
    },
    releaseBot: async (req, res) => {
      await bots.release(input(res).params.id as number, me(res), auditContextOf(res));
      res.status(204).end();
    },
  };
}

/** The admin's view of every user's bots, and the force release. */
export function adminBotsHandlers(bots: BotsService, users: UsersService): Record<string, Handler> {
  return {
    listUserBots: async (_req, res) => {
      const { params, query } = input(res);
      await users.requireRow(params.id as number);
      res.json(await bots.list({ userId: params.id as number, status: query.status as BotFilter['status'] }, pageRequest(query)));
    },
    listBots: async (_req, res) => {
      const { query } = input(res);
      const filter: BotFilter = { userId: query.user_id as number | undefined, status: query.status as BotFilter['status'] };
      if (filter.userId !== undefined) await users.requireRow(filter.userId);
      res.json(await bots.list(filter, pageRequest(query)));
    },
    getBot: async (_req, res) => {
      res.json(await bots.get(input(res).params.id as number, ADMIN));
    },
    forceReleaseBot: async (req, res) => {
      await bots.release(input(res).params.id as number, ADMIN, auditContextOf(res));
      res.status(204).end();
    },
  };
}
