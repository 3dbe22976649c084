import { createHash } from 'node:crypto';
import { DigestCache } from '../src/auth/digest-cache';

const digest = (s: string) => createHash('sha256').update(s).digest();

describe('DigestCache', () => {
  test('returns what was stored, per id', () => {
    const cache = new DigestCache(10);
    cache.set(1, digest('a'));
    cache.set(2, digest('b'));
    expect(cache.get(1)).toEqual(digest('a'));
    expect(cache.get(2)).toEqual(digest('b'));
    expect(cache.get(3)).toBeUndefined();
  });

  test('evicts the least recently used entry and reuses its slot without corrupting the others', () => {
    const cache = new DigestCache(3);
    for (let i = 1; i <= 3; i++) cache.set(i, digest(`t${i}`));
    cache.get(1); // 2 is now the oldest
    cache.set(4, digest('t4'));
    expect(cache.get(2)).toBeUndefined();
    cache.set(5, digest('t5')); // evicts 3
    expect(cache.get(3)).toBeUndefined();
    expect(cache.size).toBe(3);
    for (const i of [1, 4, 5]) expect({ i, d: cache.get(i) }).toEqual({ i, d: digest(`t${i}`) });
  });

  test('never returns another id\'s digest over many evictions and reads', () => {
    const cache = new DigestCache(50);
    for (let i = 0; i < 5_000; i++) {
      cache.set(i, digest(`x${i}`));
      // Reads refresh recency, so which ids survive varies; what is returned must always be right.
      for (const back of [0, 1, 7, 25, 49, 120]) {
        const got = i - back >= 0 ? cache.get(i - back) : undefined;
        if (got !== undefined) expect(got).toEqual(digest(`x${i - back}`));
      }
      expect(cache.get(i)).toEqual(digest(`x${i}`));
      expect(cache.size).toBeLessThanOrEqual(50);
    }
    expect(cache.size).toBe(50);
  });

  test('overwrites an existing id in place', () => {
    const cache = new DigestCache(2);
    cache.set(1, digest('old'));
    cache.set(1, digest('new'));
    expect(cache.get(1)).toEqual(digest('new'));
    expect(cache.size).toBe(1);
  });

  test('refuses anything but a 32-byte digest', () => {
    expect(() => new DigestCache(2).set(1, Buffer.alloc(16))).toThrow('sha256 digests only');
  });
});

describe('finding a digest without its token id', () => {
  const digest = (n: number) => createHash('sha256').update(`token-${n}`).digest();

  test('knows exactly the digests it holds, through evictions and overwrites', () => {
    const cache = new DigestCache(64);
    const held = new Map<number, Buffer>();
    let seed = 7;
    const random = (n: number) => {
      // An LCG's low bits cycle quickly: take the high ones.
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return Math.floor((seed / 2 ** 31) * n);
    };
    for (let step = 0; step < 20_000; step++) {
      const id = random(200);
      const value = digest(random(400));
      cache.set(id, value);
      held.set(id, value);
      // Mirror the LRU: whatever the cache no longer holds is gone from the reference too.
      for (const known of [...held.keys()]) if (cache.get(known) === undefined) held.delete(known);
      if (step % 97 === 0) {
        for (let n = 0; n < 400; n++) {
          const d = digest(n);
          expect(cache.has(d)).toBe([...held.values()].some((v) => v.equals(d)));
        }
      }
    }
    expect(cache.size).toBe(64);
    expect(held.size).toBe(64);
  });

  test('answers false for a digest it never saw, and after the token is evicted', () => {
    const cache = new DigestCache(2);
    cache.set(1, digest(1));
    expect(cache.has(digest(1))).toBe(true);
    expect(cache.has(digest(2))).toBe(false);
    cache.set(2, digest(2));
    cache.set(3, digest(3));
    expect(cache.has(digest(1))).toBe(false);
    expect([cache.has(digest(2)), cache.has(digest(3))]).toEqual([true, true]);
  });
});
