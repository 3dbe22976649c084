import { authOf } from '../auth/user-auth';
import type { Handler } from '../http/operations';
import type { UsersService } from '../users/users.service';

/**
 * A user's balance (GET /v1/credits). The admin sets it with PATCH /admin/users/{id} `credits`; bot
 * starts spend CREDITS_PER_BOT from it inside their admission transaction (src/bots).
 */
export function creditsHandlers(users: UsersService, creditsPerBot: number): Record<string, Handler> {
  return {
    getMyCredits: async (_req, res) => {
      const user = await users.requireRow(authOf(res).user.id);
      res.json({ credits: user.credits, credits_per_bot: creditsPerBot });
    },
  };
}
