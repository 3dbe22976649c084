import { sql } from 'kysely';
import type { Db } from '../../db/database';
import { unavailable } from '../http/errors';
import type { Handler } from '../http/operations';
import type { StoreState } from '../rate-limit/counters';

export interface Lifecycle {
  /** Set on SIGTERM: readiness fails so load balancers stop sending, and new requests get 503. */
  draining: boolean;
}

export function healthHandlers(db: Db, lifecycle: Lifecycle, rateLimitStore: () => StoreState): Record<string, Handler> {
  return {
    getHealth: (_req, res) => {
      res.json({ status: 'ok' });
    },
    getReadiness: async (_req, res) => {
      if (lifecycle.draining) throw unavailable('The server is shutting down.');
      try {
        await sql`select 1`.execute(db);
      } catch {
        throw unavailable('The database is not answering.');
      }
      // A rate-limit store that does not answer leaves the API working (each instance counts its
      // own limits), so readiness stays 200 and says so.
      res.json({ status: 'ok', rate_limit_store: rateLimitStore() });
    },
  };
}
