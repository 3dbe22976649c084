import { MAX_ID } from '../../db/database';
import { validationError } from './errors';

/** Keyset pagination over ascending integer ids; the cursor is opaque to clients. */
export interface PageRequest {
  limit: number;
  afterId: number;
}

export interface Page<T> {
  data: T[];
  meta: { limit: number; next_cursor: string | null };
}

export function encodeCursor(id: number): string {
  return Buffer.from(`id:${id}`).toString('base64url');
}

export function pageRequest(query: Record<string, unknown>): PageRequest {
  const limit = query.limit as number;
  const cursor = query.cursor as string | undefined;
  if (cursor === undefined) return { limit, afterId: 0 };
  const match = /^id:(\d{1,10})$/.exec(Buffer.from(cursor, 'base64url').toString('utf8'));
  // Beyond MAX_ID no server issued it, and PostgreSQL would fail the comparison with its int4 ids.
  if (!match || Number(match[1]) > MAX_ID) throw validationError([{ field: 'cursor', in: 'query', message: 'is not a cursor this server issued' }]);
  return { limit, afterId: Number(match[1]) };
}

/** Repositories fetch limit + 1 rows; the extra one only tells whether a next page exists. */
export function toPage<R extends { id: number }, T>(rows: R[], page: PageRequest, map: (row: R) => T): Page<T> {
  const more = rows.length > page.limit;
  const items = more ? rows.slice(0, page.limit) : rows;
  const last = items.at(-1);
  return {
    data: items.map(map),
    meta: { limit: page.limit, next_cursor: more && last ? encodeCursor(last.id) : null },
  };
}
