import { validationError } from './errors';

/** Iterative, so a hostile body cannot exhaust the stack here (JSON.stringify would, with a 500). */
function nestedDeeperThan(value: unknown, max: number): boolean {
  const stack: Array<[unknown, number]> = [[value, 1]];
  while (stack.length > 0) {
    const [current, depth] = stack.pop()!;
    if (typeof current !== 'object' || current === null) continue;
    if (depth > max) return true;
    for (const child of Object.values(current)) stack.push([child, depth + 1]);
  }
  return false;
}

/**
 * A free-form JSON object a client stores with keyward (a user's `data`, a bot's `metadata`), as the
 * text kept in the database: bounded in depth and size so one client cannot grow the database, or the
 * server's stack, without limit. null and undefined are stored as NULL.
 */
export function boundedJson(
  field: string,
  value: Record<string, unknown> | null | undefined,
  limits: { maxBytes: number; maxDepth: number },
): string | null {
  if (value === undefined || value === null) return null;
  if (nestedDeeperThan(value, limits.maxDepth)) {
    throw validationError([{ field, in: 'body', message: `must not nest deeper than ${limits.maxDepth} levels` }]);
  }
  const text = JSON.stringify(value);
  if (Buffer.byteLength(text) > limits.maxBytes) {
    throw validationError([{ field, in: 'body', message: `must be at most ${limits.maxBytes} bytes as JSON` }]);
  }
  return text;
}
