import { bcryptHasher, concurrencyLimit } from '../src/tokens/secret-hasher';

describe('bcrypt concurrency limit', () => {
  test('runs at most N tasks at once and every task still completes, in arrival order', async () => {
    const limited = concurrencyLimit(2);
    let running = 0;
    let peak = 0;
    const started: number[] = [];
    const task = (i: number) =>
      limited(async () => {
        started.push(i);
        running++;
        peak = Math.max(peak, running);
        await new Promise((r) => setTimeout(r, 5));
        running--;
        return i;
      });
    expect(await Promise.all([0, 1, 2, 3, 4, 5].map(task))).toEqual([0, 1, 2, 3, 4, 5]);
    expect(peak).toBe(2);
    expect(started).toEqual([0, 1, 2, 3, 4, 5]);
  });

  test('a failing task frees its slot', async () => {
    const limited = concurrencyLimit(1);
    await expect(limited(() => Promise.reject(new Error('boom')))).rejects.toThrow('boom');
    expect(await limited(async () => 'next')).toBe('next');
  });

  test('the limited bcrypt hasher still hashes and verifies', async () => {
    const hasher = bcryptHasher(4, 1);
    const [a, b] = await Promise.all([hasher.hash('secret-a'), hasher.hash('secret-b')]);
    expect(await Promise.all([hasher.verify('secret-a', a), hasher.verify('secret-a', b)])).toEqual([true, false]);
  });
});
