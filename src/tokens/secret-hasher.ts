import bcrypt from 'bcrypt';

/** The slow hash behind tokens. An interface so tests can count calls around the real bcrypt. */
export interface SecretHasher {
  hash(secret: string): Promise<string>;
  verify(secret: string, hash: string): Promise<boolean>;
}

/** Runs at most `concurrency` of the given tasks at once; the others wait in arrival order. */
export function concurrencyLimit(concurrency: number) {
  let running = 0;
  const waiting: Array<() => void> = [];
  return async <T>(work: () => Promise<T>): Promise<T> => {
    if (running >= concurrency) await new Promise<void>((resolve) => waiting.push(resolve));
    running++;
    try {
      return await work();
    } finally {
      running--;
      waiting.shift()?.();
    }
  };
}

/**
 * bcrypt's promise API runs in libuv's thread pool (~55 ms of CPU per check at cost 10), so it never
 * blocks the event loop, but it does compete with it for cores. At most `concurrency` hashes run at
 * once; the rest wait their turn, so a burst of new tokens or mints cannot starve warm traffic.
 */
export function bcryptHasher(rounds: number, concurrency: number): SecretHasher {
  const limited = concurrencyLimit(concurrency);
  return {
    hash: (secret) => limited(() => bcrypt.hash(secret, rounds)),
    verify: (secret, hash) => limited(() => bcrypt.compare(secret, hash)),
  };
}
