import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';

/**
 * A file or folder shipped beside the code (openapi/, public/), found by walking up from this file, so
 * it works from src/ under jest, from dist/src/ and in the Docker image alike.
 */
export function findProjectPath(relative: string, start = __dirname): string {
  for (let dir = start; ; dir = dirname(dir)) {
    const candidate = join(dir, relative);
    if (existsSync(candidate)) return candidate;
    if (dirname(dir) === dir) throw new Error(`${relative} was not found above ${start}`);
  }
}
