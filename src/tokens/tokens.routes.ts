import type { Handler } from '../http/operations';
import { input } from '../http/operations';
import { pageRequest } from '../http/pagination';
import type { MintInput, TokensService } from './tokens.service';

/** Admin token management; paths, auth and validation come from openapi.yaml by operationId. */
export function tokensHandlers(tokens: TokensService): Record<string, Handler> {
  return {
    mintToken: async (_req, res) => {
      const { params, body } = input(res);
      const minted = await tokens.mint(params.id as number, (body ?? {}) as MintInput);
      res.status(201).location(`/admin/tokens/${minted.id}`).json(minted);
    },
    listUserTokens: async (_req, res) => {
      const { params, query } = input(res);
      res.json(await tokens.listForUser(params.id as number, pageRequest(query)));
    },
    getToken: async (_req, res) => {
      res.json(await tokens.get(input(res).params.id as number));
    },
    revokeToken: async (_req, res) => {
      await tokens.revoke(input(res).params.id as number);
      res.status(204).end();
    },
  };
}
