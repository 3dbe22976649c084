import { randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';

/**
 * Token format (product.md): {prefix}_{env}_{selector}_{secret}{checksum}, where env is live or test
 * for user tokens and `admin` for admin keys: a person or a secret scanner tells them apart at a glance.
 *   selector: 12 base62, public, the indexed lookup key
 *   secret:   32 base62 from crypto.randomBytes (~190 bits), stored only as a bcrypt hash
 *   checksum: 6 base62 of CRC32 over everything before it, so typos and truncations are refused
 *             without touching the database, and secret scanners can recognise keyward tokens.
 */
export type Environment = 'live' | 'test';

const ALPHABET = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';
const SELECTOR_LENGTH = 12;
export const SECRET_LENGTH = 32;
const CHECKSUM_LENGTH = 6;
const MAX_PREFIX_LENGTH = 16;
/** Nothing longer can be a token; refusing it first keeps the regex and CRC off huge inputs. */
export const MAX_TOKEN_LENGTH = MAX_PREFIX_LENGTH + '_admin_'.length + SELECTOR_LENGTH + 1 + SECRET_LENGTH + CHECKSUM_LENGTH;

const TOKEN_PATTERN = /^([a-z][a-z0-9]{0,15})_(live|test|admin)_([0-9A-Za-z]{12})_([0-9A-Za-z]{32})([0-9A-Za-z]{6})$/;

export function randomBase62(length: number): string {
  let out = '';
  while (out.length < length) {
    for (const byte of randomBytes(length * 2)) {
      // 248 = 4 * 62: dropping bytes above it keeps every character equally likely.
      if (byte < 248 && out.length < length) out += ALPHABET[byte % 62];
    }
  }
  return out;
}

export function checksum(body: string): string {
  let n = crc32(body);
  let out = '';
  for (let i = 0; i < CHECKSUM_LENGTH; i++) {
    out = ALPHABET[n % 62] + out;
    n = Math.floor(n / 62);
  }
  return out;
}

export interface MintedToken {
  token: string;
  selector: string;
  secret: string;
  last4: string;
}

/** A user token (live or test) or an admin key. */
export function generateToken(prefix: string, environment: Environment | 'admin'): MintedToken {
  const selector = randomBase62(SELECTOR_LENGTH);
  const secret = randomBase62(SECRET_LENGTH);
  const body = `${prefix}_${environment}_${selector}_${secret}`;
  const token = body + checksum(body);
  return { token, selector, secret, last4: token.slice(-4) };
}

export interface ParsedToken {
  environment: Environment;
  selector: string;
  secret: string;
}

/** Pure string work: a string that is not a well-formed key of this server is refused here. */
function parseKey(candidate: string, prefix: string): { kind: Environment | 'admin'; selector: string; secret: string } | null {
  if (candidate.length > MAX_TOKEN_LENGTH) return null;
  const match = TOKEN_PATTERN.exec(candidate);
  if (!match || match[1] !== prefix) return null;
  const sum = match[5]!;
  if (checksum(candidate.slice(0, candidate.length - CHECKSUM_LENGTH)) !== sum) return null;
  return { kind: match[2] as Environment | 'admin', selector: match[3]!, secret: match[4]! };
}

/** A user token; an admin key is not one. */
export function parseToken(candidate: string, prefix: string): ParsedToken | null {
  const key = parseKey(candidate, prefix);
  return key && key.kind !== 'admin' ? { environment: key.kind, selector: key.selector, secret: key.secret } : null;
}

/** An admin key; a user token is not one. */
export function parseAdminKey(candidate: string, prefix: string): { selector: string; secret: string } | null {
  const key = parseKey(candidate, prefix);
  return key && key.kind === 'admin' ? { selector: key.selector, secret: key.secret } : null;
}

export function maskToken(prefix: string, environment: string, selector: string, last4: string): string {
  return `${prefix}_${environment}_${selector}_…${last4}`;
}
