// The module object itself (not an import-star copy), so jest.spyOn can replace randomBytes on it.
import nodeCrypto = require('node:crypto');
import { crc32 } from 'node:zlib';
import { AppError } from '../src/http/errors';
import { BUILT_IN_SCOPES, DEFAULT_SCOPES, normalizeScopes } from '../src/tokens/scopes';
import {
  checksum,
  generateToken,
  maskToken,
  MAX_TOKEN_LENGTH,
  parseAdminKey,
  parseToken,
  randomBase62,
  type MintedToken,
} from '../src/tokens/token-format';

const BASE62 = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';
const TOKEN_REGEX = /^([a-z][a-z0-9]{0,15})_(live|test)_([0-9A-Za-z]{12})_([0-9A-Za-z]{32})([0-9A-Za-z]{6})$/;

function decodeBase62(s: string): number {
  let n = 0;
  for (const ch of s) n = n * 62 + BASE62.indexOf(ch);
  return n;
}

/** A few fixed tokens are enough for the exhaustive mutation tests; they are random but always valid. */
const samples: MintedToken[] = [generateToken('kw', 'live'), generateToken('kw', 'test'), generateToken('kw', 'live')];

describe('generateToken', () => {
  it.each([
    ['kw', 'live'],
    ['kw', 'test'],
    ['acme', 'live'],
    ['abcdefghijklmnop', 'test'],
  ] as const)('mints {prefix}_{env}_{12 base62}_{32 base62}{6 base62} for prefix %s and env %s', (prefix, env) => {
    const minted = generateToken(prefix, env);
    const match = TOKEN_REGEX.exec(minted.token);
    expect(match).not.toBeNull();
    expect(match![1]).toBe(prefix);
    expect(match![2]).toBe(env);
    expect(match![3]).toBe(minted.selector);
    expect(match![4]).toBe(minted.secret);
    expect(minted.selector).toMatch(/^[0-9A-Za-z]{12}$/);
    expect(minted.secret).toMatch(/^[0-9A-Za-z]{32}$/);
    expect(minted.token).toBe(
      `${prefix}_${env}_${minted.selector}_${minted.secret}${checksum(`${prefix}_${env}_${minted.selector}_${minted.secret}`)}`,
    );
    expect(minted.token.length).toBeLessThanOrEqual(MAX_TOKEN_LENGTH);
  });

  it('round-trips through parseToken', () => {
    for (const env of ['live', 'test'] as const) {
      const minted = generateToken('kw', env);
      expect(parseToken(minted.token, 'kw')).toEqual({ environment: env, selector: minted.selector, secret: minted.secret });
    }
  });

  it('round-trips the longest allowed prefix: an admin key is exactly MAX_TOKEN_LENGTH, a user token one less', () => {
    const minted = generateToken('abcdefghijklmnop', 'test');
    expect(minted.token).toHaveLength(MAX_TOKEN_LENGTH - 1);
    expect(parseToken(minted.token, 'abcdefghijklmnop')).toEqual({
      environment: 'test',
      selector: minted.selector,
      secret: minted.secret,
    });
    const admin = generateToken('abcdefghijklmnop', 'admin');
    expect(admin.token).toHaveLength(MAX_TOKEN_LENGTH);
    expect(parseAdminKey(admin.token, 'abcdefghijklmnop')).toEqual({ selector: admin.selector, secret: admin.secret });
  });

  it('tells admin keys and user tokens apart: each parser refuses the other kind', () => {
    const admin = generateToken('kw', 'admin');
    const user = generateToken('kw', 'live');
    expect(admin.token).toMatch(/^kw_admin_[0-9A-Za-z]{12}_[0-9A-Za-z]{38}$/);
    expect(parseToken(admin.token, 'kw')).toBeNull();
    expect(parseAdminKey(user.token, 'kw')).toBeNull();
    expect(parseAdminKey(admin.token, 'other')).toBeNull();
    expect(parseAdminKey(admin.token.slice(0, -1) + (admin.token.endsWith('a') ? 'b' : 'a'), 'kw')).toBeNull();
  });

  it('reports the last 4 characters of the token as last4', () => {
    for (const minted of samples) {
      expect(minted.last4).toHaveLength(4);
      expect(minted.last4).toBe(minted.token.slice(-4));
    }
  });

  it('never repeats a token or a selector over 10,000 mints', () => {
    const tokens = new Set<string>();
    const selectors = new Set<string>();
    for (let i = 0; i < 10_000; i++) {
      const minted = generateToken('kw', 'live');
      tokens.add(minted.token);
      selectors.add(minted.selector);
    }
    expect(tokens.size).toBe(10_000);
    expect(selectors.size).toBe(10_000);
  });
});

describe('randomBase62', () => {
  it.each([0, 1, 12, 32, 1000])('returns exactly %i base62 characters', (length) => {
    const out = randomBase62(length);
    expect(out).toHaveLength(length);
    expect(out).toMatch(/^[0-9A-Za-z]*$/);
  });

  it('uses every base62 character, each roughly equally often', () => {
    // 62,000 characters: each is expected 1,000 times (standard deviation about 31), so the bounds
    // below are more than 9 standard deviations wide and cannot fail for an unbiased generator, but
    // a missing character or a modulo bias towards a quarter of the alphabet would.
    const counts = new Map<string, number>();
    for (const ch of randomBase62(62_000)) counts.set(ch, (counts.get(ch) ?? 0) + 1);
    expect([...counts.keys()].sort()).toEqual([...BASE62].sort());
    for (const ch of BASE62) {
      expect(counts.get(ch)).toBeGreaterThan(700);
      expect(counts.get(ch)).toBeLessThan(1300);
    }
  });

  it('maps random bytes without bias: bytes 248-255 are dropped, the rest cover the alphabet 4 times each', () => {
    // Deterministic: feed the biased bytes 248..255 first, then 0..247, then zeros. An unbiased mapping
    // skips the first eight and spells the alphabet four times; byte % 62 alone would start with "01234567".
    const bytes = [248, 249, 250, 251, 252, 253, 254, 255, ...Array.from({ length: 248 }, (_, i) => i)];
    const spy = jest.spyOn(nodeCrypto, 'randomBytes').mockImplementation(((size: number) => {
      const all = Buffer.alloc(size);
      bytes.slice(0, size).forEach((b, i) => (all[i] = b));
      return all;
    }) as unknown as typeof nodeCrypto.randomBytes);
    try {
      const out = randomBase62(248);
      expect(out).toBe(BASE62.repeat(4));
    } finally {
      spy.mockRestore();
    }
  });
});

describe('checksum', () => {
  it('is the CRC32 of the body in 6 base62 characters', () => {
    for (let i = 0; i < 2000; i++) {
      const body = `kw_live_${String(i).padStart(12, '0')}_${'A'.repeat(32)}`;
      const sum = checksum(body);
      expect(sum).toMatch(/^[0-9A-Za-z]{6}$/);
      expect(decodeBase62(sum)).toBe(crc32(body));
    }
  });

  it('is 6 characters even when the CRC is 0', () => {
    expect(crc32('')).toBe(0);
    expect(checksum('')).toBe('000000');
  });

  it('keeps its leading zeros for a body whose CRC is small, and such a token still parses', () => {
    // Search a fixed sequence of bodies for one with CRC < 62^3, i.e. a checksum starting with "000".
    // About 1 in 18,000 bodies qualifies; the search is deterministic, so it finds the same one every run.
    const secret = 'Q'.repeat(32);
    let body: string | undefined;
    for (let i = 0; i < 5_000_000 && body === undefined; i++) {
      const candidate = `kw_live_${i.toString(36).padStart(12, '0')}_${secret}`;
      if (crc32(candidate) < 62 ** 3) body = candidate;
    }
    expect(body).toBeDefined();
    const sum = checksum(body!);
    expect(sum).toHaveLength(6);
    expect(sum.startsWith('000')).toBe(true);
    expect(parseToken(body! + sum, 'kw')).toEqual({ environment: 'live', selector: body!.slice(8, 20), secret });
  });
});

describe('parseToken refuses', () => {
  it('every single-character substitution anywhere in the token', () => {
    const replacements = [...BASE62, '_', '-', '.', ' ', '+', '/', '='];
    for (const { token } of samples) {
      let tried = 0;
      for (let i = 0; i < token.length; i++) {
        for (const ch of replacements) {
          if (ch === token[i]) continue;
          const mutated = token.slice(0, i) + ch + token.slice(i + 1);
          const parsed = parseToken(mutated, 'kw');
          if (parsed !== null) throw new Error(`accepted ${mutated} (position ${i} changed to ${ch})`);
          tried++;
        }
      }
      expect(tried).toBeGreaterThan(token.length * 60);
    }
  });

  it('the token with any one character removed', () => {
    for (const { token } of samples) {
      for (let i = 0; i < token.length; i++) {
        expect(parseToken(token.slice(0, i) + token.slice(i + 1), 'kw')).toBeNull();
      }
    }
  });

  it('the token truncated by one at either end', () => {
    for (const { token } of samples) {
      expect(parseToken(token.slice(0, -1), 'kw')).toBeNull();
      expect(parseToken(token.slice(1), 'kw')).toBeNull();
    }
  });

  it('the token with one extra character anywhere', () => {
    for (const { token } of samples) {
      for (let i = 0; i <= token.length; i++) {
        for (const ch of ['0', 'a', 'Z', '_']) {
          expect(parseToken(token.slice(0, i) + ch + token.slice(i), 'kw')).toBeNull();
        }
      }
    }
  });

  it('a valid token of another prefix', () => {
    const acme = generateToken('acme', 'live');
    expect(parseToken(acme.token, 'acme')).not.toBeNull();
    expect(parseToken(acme.token, 'kw')).toBeNull();
    const kw = generateToken('kw', 'live');
    expect(parseToken(kw.token, 'acme')).toBeNull();
    expect(parseToken(kw.token, 'k')).toBeNull();
    expect(parseToken(kw.token, 'kwx')).toBeNull();
  });

  it('a live token relabelled test (and the reverse) without a new checksum', () => {
    const live = generateToken('kw', 'live');
    const test = generateToken('kw', 'test');
    expect(parseToken(live.token.replace('kw_live_', 'kw_test_'), 'kw')).toBeNull();
    expect(parseToken(test.token.replace('kw_test_', 'kw_live_'), 'kw')).toBeNull();
  });

  it('an environment other than live or test, even with a correct checksum', () => {
    const body = `kw_prod_${'a'.repeat(12)}_${'b'.repeat(32)}`;
    expect(parseToken(body + checksum(body), 'kw')).toBeNull();
  });

  it('the empty string', () => {
    expect(parseToken('', 'kw')).toBeNull();
  });

  it('a 10 MB string, including one that starts with a valid token', () => {
    const { token } = samples[0]!;
    expect(parseToken('a'.repeat(10 * 1024 * 1024), 'kw')).toBeNull();
    expect(parseToken(token + 'A'.repeat(10 * 1024 * 1024), 'kw')).toBeNull();
    expect(parseToken(`kw_live_${'A'.repeat(10 * 1024 * 1024)}`, 'kw')).toBeNull();
  });

  it('unicode look-alikes of any character', () => {
    const cyrillic: Record<string, string> = {
      a: '\u0430', e: '\u0435', o: '\u043e', p: '\u0440', c: '\u0441', x: '\u0445', y: '\u0443', k: '\u043a',
      A: '\u0410', B: '\u0412', E: '\u0415', K: '\u041a', M: '\u041c', H: '\u041d', O: '\u041e', P: '\u0420',
      C: '\u0421', T: '\u0422', X: '\u0425', '0': '\u041e', '3': '\u0417',
    };
    for (const { token } of samples) {
      for (let i = 0; i < token.length; i++) {
        const ch = token[i]!;
        // Fullwidth forms (U+FF01..U+FF5E) of every ASCII character, and Cyrillic homoglyphs where one exists.
        const lookAlikes = [String.fromCharCode(ch.charCodeAt(0) + 0xfee0)];
        if (cyrillic[ch] !== undefined) lookAlikes.push(cyrillic[ch]);
        for (const lookAlike of lookAlikes) {
          expect(parseToken(token.slice(0, i) + lookAlike + token.slice(i + 1), 'kw')).toBeNull();
        }
      }
      // The whole token in fullwidth, which NFKC would fold back to ASCII.
      const fullwidth = [...token].map((c) => String.fromCharCode(c.charCodeAt(0) + 0xfee0)).join('');
      expect(fullwidth.normalize('NFKC')).toBe(token);
      expect(parseToken(fullwidth, 'kw')).toBeNull();
    }
  });

  it('whitespace around the token', () => {
    const { token } = samples[0]!;
    for (const ws of [' ', '\t', '\n', '\r\n', '\u00a0', '\u200b', '\ufeff']) {
      expect(parseToken(ws + token, 'kw')).toBeNull();
      expect(parseToken(token + ws, 'kw')).toBeNull();
      expect(parseToken(ws + token + ws, 'kw')).toBeNull();
    }
  });

  it('a token written with "Bearer " in front of it', () => {
    expect(parseToken(`Bearer ${samples[0]!.token}`, 'kw')).toBeNull();
  });
});

describe('maskToken', () => {
  it('shows the prefix, environment, selector and last 4 characters, and nothing of the secret', () => {
    const minted = generateToken('kw', 'live');
    const masked = maskToken('kw', 'live', minted.selector, minted.last4);
    expect(masked).toBe(`kw_live_${minted.selector}_\u2026${minted.token.slice(-4)}`);
    expect(masked).toMatch(/^kw_live_[0-9A-Za-z]{12}_…[0-9A-Za-z]{4}$/);
    expect(masked).not.toContain(minted.secret.slice(0, 8));
  });

  it('matches the example in the contract', () => {
    expect(maskToken('kw', 'live', '3kTq9ZpLx2Aa', 'WXYZ')).toBe('kw_live_3kTq9ZpLx2Aa_…WXYZ');
  });
});

describe('normalizeScopes', () => {
  it('gives bots:read and bots:write when no scopes are requested', () => {
    expect(normalizeScopes(undefined)).toEqual(['bots:read', 'bots:write']);
  });

  it('returns a fresh array, so a caller cannot change the default', () => {
    const first = normalizeScopes(undefined);
    first.push('tokens:write');
    expect(normalizeScopes(undefined)).toEqual(['bots:read', 'bots:write']);
    expect(DEFAULT_SCOPES).toEqual(['bots:read', 'bots:write']);
  });

  it('folds duplicates and sorts', () => {
    expect(normalizeScopes(['tokens:write', 'bots:read', 'tokens:write', 'bots:read', 'bots:write'])).toEqual([
      'bots:read',
      'bots:write',
      'tokens:write',
    ]);
  });

  it('gives equal results for equal sets in any order', () => {
    expect(normalizeScopes(['tokens:read', 'bots:write'])).toEqual(normalizeScopes(['bots:write', 'tokens:read', 'bots:write']));
  });

  it('accepts scopes from a catalog that extends the built-in one', () => {
    expect(normalizeScopes(['reports:read', 'bots:read'], [...BUILT_IN_SCOPES, 'reports:read'])).toEqual(['bots:read', 'reports:read']);
  });

  function scopeError(requested: string[]): AppError {
    try {
      normalizeScopes(requested);
    } catch (err) {
      expect(err).toBeInstanceOf(AppError);
      return err as AppError;
    }
    throw new Error(`normalizeScopes accepted ${JSON.stringify(requested)}`);
  }

  it('refuses an unknown scope with a 400 VALIDATION_ERROR whose details name the valid scopes', () => {
    const err = scopeError(['bots:read', 'admin:everything']);
    expect(err.status).toBe(400);
    expect(err.code).toBe('VALIDATION_ERROR');
    expect(Array.isArray(err.details)).toBe(true);
    const details = err.details as Array<{ field: string; message: string }>;
    expect(details).toHaveLength(1);
    expect(details[0]!.field).toBe('scopes');
    expect(details[0]!.message).toContain('admin:everything');
    for (const scope of BUILT_IN_SCOPES) expect(details[0]!.message).toContain(scope);
  });

  it('reports each unknown scope, and scope names are case-sensitive', () => {
    const details = scopeError(['nope', 'BOTS:READ']).details as Array<{ message: string }>;
    expect(details).toHaveLength(2);
    expect(details[0]!.message).toContain('"nope"');
    expect(details[1]!.message).toContain('"BOTS:READ"');
  });
});
