import fc from 'fast-check';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parse } from 'yaml';
import { checksum } from '../../src/tokens/token-format';

/**
 * Shared arbitraries for the hostile-input suites (issue 9). Everything here is plain data: the suites
 * decide what a value means for the operation at hand.
 */

/** Text that has broken parsers, query builders and loggers elsewhere. */
export const NASTY_STRINGS: readonly string[] = [
  "' OR 1=1 --",
  '" OR ""="',
  "'; DROP TABLE users; --",
  '1; select pg_sleep(1)',
  "%' OR '1'='1",
  '\\',
  '\\\\',
  '%',
  '%%',
  '%zz',
  '%00',
  '%E0%A4%A',
  '%2F',
  '\u0000',
  'a\u0000b',
  '__proto__',
  'constructor',
  'prototype',
  'toString',
  'hasOwnProperty',
  '$ne',
  '{"$gt":""}',
  '../../etc/passwd',
  '..',
  '.',
  '<script>alert(1)</script>',
  '${7*7}',
  '{{7*7}}',
  '\ud800',
  '\udfff',
  'x\ud83dy',
  '\ud83d\ude00',
  'é',
  'İ',
  'ﬀ',
  '\u202e',
  '\ufeff',
  '\u00a0',
  '\r\n',
  'NaN',
  'Infinity',
  '-0',
  '1e308',
  '0x10',
  '1.5',
  ' 1',
  '1 ',
  '+1',
  '-1',
  '0',
  '1',
  '2',
  '9007199254740991',
  '9007199254740993',
  '99999999999999999999999999',
  '',
  ' ',
  'null',
  'true',
  '[]',
  '{}',
  'kw_live_',
  'user:1',
  'token:1',
  'token.*',
  'a@b.c',
  'A@EXAMPLE.COM',
  '2026-01-01',
  '2026-01-01T00:00:00.000Z',
  '0000-00-00T00:00:00Z',
  '9999-12-31T23:59:59.999Z',
  '10.0.0.0/8',
  '::/0',
  '0.0.0.0/0',
  '1.2.3.4/33',
  'fe80::1%eth0',
  '::ffff:127.0.0.1',
  'bots:read',
  'tokens:write',
];

/** One UTF-16 code unit that is not a valid character on its own, or a control character. */
const awkwardUnit = fc.oneof(
  fc.integer({ min: 0xd800, max: 0xdfff }).map((c) => String.fromCharCode(c)),
  fc.integer({ min: 0, max: 0x1f }).map((c) => String.fromCharCode(c)),
  fc.constantFrom('\u007f', '\u0085', '\u2028', '\u2029', '\ufffe', '\uffff'),
);

export const nastyString: fc.Arbitrary<string> = fc.oneof(
  { arbitrary: fc.constantFrom(...NASTY_STRINGS), weight: 4 },
  { arbitrary: fc.string({ maxLength: 20 }), weight: 2 },
  { arbitrary: fc.string({ unit: 'binary', maxLength: 20 }), weight: 2 },
  { arbitrary: fc.string({ unit: fc.oneof(awkwardUnit, fc.string({ unit: 'binary', minLength: 1, maxLength: 1 })), maxLength: 12 }), weight: 2 },
  // Past every maxLength the contract declares (254, 256, 1000) and then some.
  { arbitrary: fc.integer({ min: 101, max: 3000 }).map((n) => 'a'.repeat(n)), weight: 1 },
  { arbitrary: fc.tuple(fc.constantFrom(...NASTY_STRINGS), fc.integer({ min: 2, max: 200 })).map(([s, n]) => s.repeat(n)), weight: 1 },
);

export const nastyNumber: fc.Arbitrary<number> = fc.oneof(
  fc.constantFrom(0, -0, -1, 0.5, 1.5, -1.5, 1e308, -1e308, 2 ** 31, 2 ** 32, 2 ** 53, 2 ** 53 + 2, 2 ** 63, Number.MAX_VALUE, Number.MIN_VALUE, 1e-7, 100001, 1000001, 315360001, 604801, 9, 86401),
  fc.integer(),
  fc.double({ noNaN: true, noDefaultInfinity: true }),
);

/** Keys that mean something to JavaScript objects rather than to keyward. */
export const NASTY_KEYS = ['__proto__', 'constructor', 'prototype', 'toString', 'valueOf', 'hasOwnProperty', '', ' ', 'a.b', '$where', '\u0000'];
export const nastyKey: fc.Arbitrary<string> = fc.oneof(fc.constantFrom(...NASTY_KEYS), nastyString);

/** Any JSON value, hostile leaves included. Objects are built key by key, so `__proto__` stays an own key. */
export const nastyJson: fc.Arbitrary<unknown> = fc.letrec<{ value: unknown }>((tie) => ({
  value: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    nastyString,
    nastyNumber,
    fc.boolean(),
    fc.constant(null),
    fc.array(tie('value'), { maxLength: 4 }),
    fc.array(fc.tuple(nastyKey, tie('value')), { maxLength: 4 }).map(ownObject),
  ),
})).value;

/** An object whose keys are all own data properties, even `__proto__` (JSON.parse does the same). */
export function ownObject(entries: Array<[string, unknown]>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of entries) Object.defineProperty(out, k, { value: v, enumerable: true, writable: true, configurable: true });
  return out;
}

/** JSON texts that are not JSON, or are JSON shaped to hurt: deep, huge, duplicated, prototype-polluting. */
export const nastyJsonText: fc.Arbitrary<string> = fc.oneof(
  fc.constantFrom(
    '{',
    '{"a":}',
    'nul',
    "{'a':1}",
    '{"a":1,}',
    '\u0000',
    '{"name":"a\u0000b"}',
    '\ufeff{}',
    '{} x',
    '[]',
    '""',
    '0',
    'null',
    '{"name":"a","name":1}',
    '{"__proto__":{"polluted":"yes"}}',
    '{"constructor":{"prototype":{"polluted":"yes"}}}',
    '{"__proto__":{"toString":"x"},"email":"x@example.com"}',
    '{"a":1e999}',
    '{"a":-1e999}',
    '{"a":123456789012345678901234567890}',
    '{"a":"\\ud800"}',
    '{"a":"\\u0000"}',
  ),
  // Nested arrays and objects, under and over the 64 KiB body limit.
  fc.integer({ min: 1, max: 40_000 }).map((n) => '['.repeat(n) + ']'.repeat(n)),
  fc.integer({ min: 1, max: 10_000 }).map((n) => '{"a":'.repeat(n) + '1' + '}'.repeat(n)),
  fc.integer({ min: 60_000, max: 70_000 }).map((n) => JSON.stringify({ name: 'x'.repeat(n) })),
  nastyString,
);

/**
 * A string as it can travel in an HTTP header: its UTF-8 bytes, one latin1 character each (what the
 * server will read back), without the control characters Node refuses to send.
 */
export function headerSafe(text: string): string {
  return Buffer.from(text, 'utf8').toString('latin1').replace(/[^\t\x20-\x7e\x80-\xff]/g, '');
}

/** What Node leaves of a header value: leading and trailing spaces and tabs are not part of it. */
export function asReceived(headerValue: string): string {
  return headerValue.replace(/^[ \t]+|[ \t]+$/g, '');
}

/** Percent-encodes the UTF-8 bytes of any string, lone surrogates included (encodeURIComponent throws on those). */
export function percentEncode(text: string): string {
  let out = '';
  for (const byte of Buffer.from(text, 'utf8')) {
    const c = String.fromCharCode(byte);
    out += /[A-Za-z0-9\-_.~]/.test(c) ? c : `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

/** Characters Node lets through unescaped in a request path; '/', '?' and '#' would change its shape. */
export function rawPathSafe(text: string): string {
  return Buffer.from(text, 'utf8').toString('latin1').replace(/[^\x21-\x7e]|[/?#]/g, '');
}

const BASE62 = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';
export const base62Char = fc.constantFrom(...BASE62.split(''));

export interface TokenParts {
  prefix: string;
  env: string;
  selector: string;
  secret: string;
}

export function splitToken(token: string): TokenParts {
  const [prefix, env, selector, rest] = token.split('_') as [string, string, string, string];
  return { prefix, env, selector, secret: rest.slice(0, 32) };
}

export const joinToken = (p: TokenParts): string => {
  const body = `${p.prefix}_${p.env}_${p.selector}_${p.secret}`;
  return body + checksum(body);
};

const replaceAt = (s: string, i: number, c: string) => s.slice(0, i) + c + s.slice(i + 1);
const flipCase = (c: string) => (c === c.toUpperCase() ? c.toLowerCase() : c.toUpperCase());

/** A description of a change to a real token, so a failing case says what was done to it. */
export type TokenMutation =
  | { kind: 'replace-char'; at: number; with: string }
  | { kind: 'flip-case'; at: number }
  | { kind: 'truncate'; keep: number }
  | { kind: 'extend'; with: string }
  | { kind: 'swap-env'; recompute: boolean }
  | { kind: 'prefix'; prefix: string; recompute: boolean }
  | { kind: 'selector-char'; at: number; with: string }
  | { kind: 'secret-char'; at: number; with: string }
  | { kind: 'new-secret'; secret: string }
  | { kind: 'wrap'; before: string; after: string };

export const tokenMutation: fc.Arbitrary<TokenMutation> = fc.oneof(
  fc.record({ kind: fc.constant('replace-char' as const), at: fc.nat({ max: 80 }), with: fc.oneof(base62Char, fc.string({ unit: 'binary', minLength: 1, maxLength: 1 })) }),
  fc.record({ kind: fc.constant('flip-case' as const), at: fc.nat({ max: 80 }) }),
  fc.record({ kind: fc.constant('truncate' as const), keep: fc.nat({ max: 80 }) }),
  fc.record({ kind: fc.constant('extend' as const), with: fc.oneof(fc.string({ minLength: 1, maxLength: 8 }), fc.string({ unit: base62Char, minLength: 1, maxLength: 8 })) }),
  fc.record({ kind: fc.constant('swap-env' as const), recompute: fc.boolean() }),
  fc.record({
    kind: fc.constant('prefix' as const),
    prefix: fc.oneof(fc.constantFrom('', 'KW', 'kx', 'k', 'kwkw', 'sk', 'kw1', 'a'.repeat(17)), fc.stringMatching(/^[a-z][a-z0-9]{0,15}$/)),
    recompute: fc.boolean(),
  }),
  fc.record({ kind: fc.constant('selector-char' as const), at: fc.nat({ max: 11 }), with: base62Char }),
  fc.record({ kind: fc.constant('secret-char' as const), at: fc.nat({ max: 31 }), with: base62Char }),
  fc.record({ kind: fc.constant('new-secret' as const), secret: fc.string({ unit: base62Char, minLength: 32, maxLength: 32 }) }),
  fc.record({ kind: fc.constant('wrap' as const), before: fc.constantFrom('', ' ', '\t', '"', "'", '\u00a0', '\ufeff', 'Bearer '), after: fc.constantFrom('', ' ', '\n', '"', ',', ';', '\u0000') }),
);

/** Applies a mutation. Changes to the selector, secret or environment may recompute the checksum (a forger would). */
export function mutateToken(token: string, m: TokenMutation): string {
  const parts = splitToken(token);
  switch (m.kind) {
    case 'replace-char': {
      const at = m.at % token.length;
      return replaceAt(token, at, m.with);
    }
    case 'flip-case': {
      const at = m.at % token.length;
      return replaceAt(token, at, flipCase(token[at]!));
    }
    case 'truncate':
      return token.slice(0, m.keep % token.length);
    case 'extend':
      return token + m.with;
    case 'swap-env': {
      const env = parts.env === 'live' ? 'test' : 'live';
      return m.recompute ? joinToken({ ...parts, env }) : token.replace(`_${parts.env}_`, `_${env}_`);
    }
    case 'prefix':
      return m.recompute ? joinToken({ ...parts, prefix: m.prefix }) : m.prefix + token.slice(parts.prefix.length);
    case 'selector-char':
      return joinToken({ ...parts, selector: replaceAt(parts.selector, m.at, m.with) });
    case 'secret-char':
      return joinToken({ ...parts, secret: replaceAt(parts.secret, m.at, m.with) });
    case 'new-secret':
      return joinToken({ ...parts, secret: m.secret });
    case 'wrap':
      return m.before + token + m.after;
  }
}

/** A response as bytes, whatever its type (the backup is a binary file), so every check sees all of it. */
export interface RawResponse {
  status: number;
  headers: Record<string, unknown>;
  raw: Buffer;
}

/** Makes supertest hand back the body as bytes instead of parsing it. */
export async function rawResponse(req: import('supertest').Test): Promise<RawResponse> {
  const res = await req.buffer(true).parse((stream, done) => {
    const chunks: Buffer[] = [];
    stream.on('data', (c: Buffer) => chunks.push(c));
    stream.on('end', () => done(null, Buffer.concat(chunks)));
  });
  return { status: res.status, headers: res.headers as Record<string, unknown>, raw: res.body as Buffer };
}

/**
 * The one error envelope, checked without throwing so a property can report every problem at once:
 * exactly {error: {code, message, details, request_id}}, a code the contract lists, JSON, and the
 * request id the X-Request-Id header carries.
 */
export function envelopeProblems(res: RawResponse, knownCodes: readonly string[]): string[] {
  const problems: string[] = [];
  const type = String(res.headers['content-type'] ?? '');
  if (!/^application\/json/.test(type)) problems.push(`content-type is ${JSON.stringify(type)}, not JSON`);
  let body: unknown;
  try {
    body = JSON.parse(res.raw.toString('utf8'));
  } catch {
    return [...problems, `body is not JSON: ${JSON.stringify(res.raw.toString('utf8').slice(0, 200))}`];
  }
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return [...problems, `body is not an object: ${JSON.stringify(body)}`];
  const keys = Object.keys(body).sort();
  if (keys.join() !== 'error') problems.push(`body keys are ${JSON.stringify(keys)}, not ["error"]`);
  const error = (body as { error?: unknown }).error;
  if (typeof error !== 'object' || error === null || Array.isArray(error)) return [...problems, `error is not an object: ${JSON.stringify(error)}`];
  const e = error as Record<string, unknown>;
  const errorKeys = Object.keys(e).sort();
  if (errorKeys.join() !== 'code,details,message,request_id') problems.push(`error keys are ${JSON.stringify(errorKeys)}`);
  if (typeof e.code !== 'string' || !knownCodes.includes(e.code)) problems.push(`error.code ${JSON.stringify(e.code)} is not one the contract lists`);
  if (typeof e.message !== 'string' || e.message === '') problems.push('error.message is not a non-empty string');
  const requestId = res.headers['x-request-id'];
  if (typeof requestId !== 'string' || requestId === '') problems.push('no X-Request-Id header');
  else if (e.request_id !== requestId) problems.push(`error.request_id ${JSON.stringify(e.request_id)} is not the X-Request-Id ${requestId}`);
  return problems;
}

export function errorCodeOf(res: RawResponse): string | null {
  try {
    const code = (JSON.parse(res.raw.toString('utf8')) as { error?: { code?: unknown } }).error?.code;
    return typeof code === 'string' ? code : null;
  } catch {
    return null;
  }
}

/** No secret may come back, in the body (as UTF-8 or as raw bytes) or in any header. */
export function leakProblems(res: RawResponse, secrets: ReadonlyArray<{ name: string; value: string }>): string[] {
  const body = res.raw.toString('latin1');
  const headers = JSON.stringify(res.headers);
  const problems: string[] = [];
  for (const { name, value } of secrets) {
    if (body.includes(value)) problems.push(`the response body contains ${name}`);
    if (headers.includes(value)) problems.push(`a response header contains ${name}`);
  }
  return problems;
}

/** openapi/openapi.yaml as data, read here without the server's own loader. */
export function loadContract(): { paths: Record<string, Record<string, unknown>>; components: Record<string, Record<string, unknown>> } {
  const file = join(__dirname, '..', '..', 'openapi', 'openapi.yaml');
  return parse(readFileSync(file, 'utf8')) as ReturnType<typeof loadContract>;
}

/** The error codes the contract promises clients. */
export function contractErrorCodes(): string[] {
  const error = loadContract().components.schemas!['Error'] as { properties: { error: { properties: { code: { enum: string[] } } } } };
  return error.properties.error.properties.code.enum;
}
