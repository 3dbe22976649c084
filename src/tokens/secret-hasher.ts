import bcrypt from 'bcrypt';

/** The slow hash behind tokens. An interface so tests can count calls around the real bcrypt. */
export interface SecretHasher {
  hash(secret: string): Promise<string>;
  verify(secret: string, hash: string): Promise<boolean>;
}

// bcrypt's promise API runs in libuv's thread pool: ~55 ms of CPU per check that never blocks the
// event loop.
export function bcryptHasher(rounds: number): SecretHasher {
  return {
    hash: (secret) => bcrypt.hash(secret, rounds),
    verify: (secret, hash) => bcrypt.compare(secret, hash),
  };
}
