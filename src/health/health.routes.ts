import { sql } from 'kysely';
import type { Db } from '../../db/database';
import { unavailable } from '../http/errors';
import type { Handler } from '../http/operations';

export interface Lifecycle {
  /** Set on SIGTERM: readiness fails so load balancers stop sending, and new requests get 503. */
  draining: boolean;
}

export function healthHandlers(db: Db, lifecycle: Lifecycle): Record<string, Handler> {
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
      res.json({ status: 'ok' });
    },
  };
}
