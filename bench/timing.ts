/**
 * npm run bench:timing [-- --quick]
 *
 * Can an attacker tell keys apart by how long keyward takes to refuse them? Measured the way an
 * attacker would: one request at a time over HTTP against the built server (default bcrypt cost),
 * with the classes of key interleaved in random order so drift on a shared machine hits all alike.
 *
 * - Admin key: a wrong key, a key right but for its last character, right but for its first, and one
 *   of another length (plus the comparison alone, in this process, in nanoseconds).
 * - API keys: an unknown selector, a real selector with a wrong secret, and a real selector with the
 *   right secret but for its last character.
 *
 * For each pair of classes it reports the medians and how well the best time threshold tells them
 * apart: 50 % is a coin toss (no usable difference), 100 % tells every request apart.
 * KEYWARD_TIMING_SERVER=path/to/server.js measures another build (for example the one before a fix).
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { checksum, randomBase62 } from '../src/tokens/token-format';
import { children, startProcess } from './processes';

const ROOT = join(__dirname, '..', '..');
const QUICK = process.argv.includes('--quick');
const SAMPLES = QUICK ? 40 : 300;
const ADMIN_KEY = randomBytes(32).toString('hex');
const SERVER = process.env.KEYWARD_TIMING_SERVER || join(ROOT, 'dist', 'src', 'server.js');
/** Wrong secrets sent per real selector, under the ten a token tolerates a minute before 429. */
const TRIES_PER_TOKEN = 8;

const log = (msg: string) => process.stderr.write(`bench:timing: ${msg}\n`);

function shuffle<T>(xs: T[]): T[] {
  for (let i = xs.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [xs[i], xs[j]] = [xs[j]!, xs[i]!];
  }
  return xs;
}

const quantile = (xs: number[], q: number) => {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? NaN;
};

/**
 * The accuracy of the best single threshold at telling sample set `a` from `b` (either side may be
 * the slower): what an attacker gets from one request's time.
 */
function thresholdAccuracy(a: number[], b: number[]): number {
  const all = [...a.map((t) => ({ t, inA: true })), ...b.map((t) => ({ t, inA: false }))].sort((x, y) => x.t - y.t);
  let aBelow = 0;
  let bBelow = 0;
  let best = 0.5;
  for (const { inA } of all) {
    if (inA) aBelow++;
    else bBelow++;
    // "below the threshold means a": correct = a below + b above, and the mirror rule.
    const accuracy = (aBelow / a.length + (b.length - bBelow) / b.length) / 2;
    best = Math.max(best, accuracy, 1 - accuracy);
  }
  return best;
}

async function timed(url: string, headers: Record<string, string>, expected: number): Promise<number> {
  const start = process.hrtime.bigint();
  const res = await fetch(url, { headers });
  await res.arrayBuffer();
  const ms = Number(process.hrtime.bigint() - start) / 1e6;
  if (res.status !== expected) throw new Error(`${url}: expected ${expected}, got ${res.status}`);
  return ms;
}

/** Runs every class's requests in one shuffled sequence; returns each class's times in ms. */
async function interleaved(classes: Record<string, Array<() => Promise<number>>>): Promise<Record<string, number[]>> {
  const jobs = shuffle(Object.entries(classes).flatMap(([name, runs]) => runs.map((run) => ({ name, run }))));
  const out: Record<string, number[]> = Object.fromEntries(Object.keys(classes).map((name) => [name, []]));
  for (const { name, run } of jobs) out[name]!.push(await run());
  return out;
}

function withSecret(selector: string, secret: string): string {
  const body = `kw_live_${selector}_${secret}`;
  return body + checksum(body);
}

/** The comparison requireAdmin makes, alone, for keys of each class: ns per comparison. */
function adminComparisonNs(): Record<string, number> {
  const digest = createHash('sha256').update(ADMIN_KEY).digest();
  const keys = {
    right: ADMIN_KEY,
    wrong: randomBytes(32).toString('hex'),
    'right but the last character': ADMIN_KEY.slice(0, -1) + (ADMIN_KEY.endsWith('0') ? '1' : '0'),
    'another length': randomBytes(8).toString('hex'),
  };
  const n = QUICK ? 20_000 : 200_000;
  const totals: Record<string, bigint> = Object.fromEntries(Object.keys(keys).map((k) => [k, 0n]));
  for (let round = 0; round < 10; round++) {
    for (const [name, key] of shuffle(Object.entries(keys))) {
      const start = process.hrtime.bigint();
      for (let i = 0; i < n / 10; i++) timingSafeEqual(createHash('sha256').update(key).digest(), digest);
      totals[name]! += process.hrtime.bigint() - start;
    }
  }
  return Object.fromEntries(Object.entries(totals).map(([name, total]) => [name, Number(total) / n]));
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'keyward-timing-'));
  const server = await startProcess(
    'keyward',
    [SERVER],
    {
      ADMIN_API_TOKEN: ADMIN_KEY,
      DATABASE_PATH: join(dir, 'timing.db'),
      LOG_LEVEL: 'warn',
      // The limits would answer 429 long before enough samples: they are not what is measured here.
      AUTH_FAILURES_PER_MINUTE: '10000000',
      ADMIN_RATE_LIMIT_PER_MINUTE: '1000000',
      RATE_LIMIT_PER_MINUTE: '1000000',
      MAX_TOKENS_PER_USER: '100000',
    },
    dir,
    '/readyz',
  );
  const admin = { 'X-Admin-API-Key': ADMIN_KEY, 'Content-Type': 'application/json' };
  const user = (await (await fetch(`${server.base}/admin/users`, { method: 'POST', headers: admin, body: JSON.stringify({ email: 'timing@example.com' }) })).json()) as { id: number };

  // Each real selector takes TRIES_PER_TOKEN wrong secrets: enough tokens for both classes that use one.
  const tokensNeeded = Math.ceil((2 * SAMPLES) / TRIES_PER_TOKEN) + 1;
  log(`minting ${tokensNeeded} tokens`);
  const pool: Array<{ selector: string; secret: string; left: number; usedLast: Set<string> }> = [];
  for (let i = 0; i < tokensNeeded; i++) {
    const { token } = (await (await fetch(`${server.base}/admin/users/${user.id}/tokens`, { method: 'POST', headers: admin })).json()) as { token: string };
    const [, , selector, rest] = token.split('_') as [string, string, string, string];
    pool.push({ selector, secret: rest.slice(0, 32), left: TRIES_PER_TOKEN, usedLast: new Set() });
  }
  const nextReal = () => {
    const entry = pool.find((p) => p.left > 0)!;
    entry.left--;
    return entry;
  };
  const me = `${server.base}/v1/me`;
  const times = (make: () => string) => Array.from({ length: SAMPLES }, () => () => timed(me, { 'X-API-Key': make() }, 401));

  // Warm up: the first requests pay for JIT, connection set-up and the decoy hash.
  for (let i = 0; i < 10; i++) await timed(me, { 'X-API-Key': withSecret(randomBase62(12), randomBase62(32)) }, 401);

  log(`API keys: ${SAMPLES} requests per class`);
  const apiKeys = await interleaved({
    'unknown selector': times(() => withSecret(randomBase62(12), randomBase62(32))),
    // The same class twice: how far apart two samples of one thing look here is the noise floor.
    'unknown selector (control)': times(() => withSecret(randomBase62(12), randomBase62(32))),
    'real selector, wrong secret': times(() => withSecret(nextReal().selector, randomBase62(32))),
    'real selector, secret wrong in its last character': times(() => {
      const entry = nextReal();
      // One character from the right secret, and never the same wrong one twice for a selector (the
      // refused-key memory would answer a repeat without bcrypt).
      let last: string;
      do last = randomBase62(1);
      while (last === entry.secret[31] || entry.usedLast.has(last));
      entry.usedLast.add(last);
      return withSecret(entry.selector, entry.secret.slice(0, 31) + last);
    }),
  });

  const adminUrl = `${server.base}/admin/users/999999999`;
  const adminTimes = (make: () => string, expected: number) =>
    Array.from({ length: SAMPLES }, () => () => timed(adminUrl, { 'X-Admin-API-Key': make() }, expected));
  log(`admin key: ${SAMPLES} requests per class`);
  const adminKeys = await interleaved({
    'wrong key': adminTimes(() => randomBytes(32).toString('hex'), 401),
    'wrong key (control)': adminTimes(() => randomBytes(32).toString('hex'), 401),
    'right but the last character': adminTimes(() => ADMIN_KEY.slice(0, -1) + (ADMIN_KEY.endsWith('0') ? '1' : '0'), 401),
    'right but the first character': adminTimes(() => (ADMIN_KEY.startsWith('0') ? '1' : '0') + ADMIN_KEY.slice(1), 401),
    'another length': adminTimes(() => randomBytes(20).toString('hex'), 401),
  });
  const comparison = adminComparisonNs();
  for (const c of children) c.kill('SIGTERM');
  rmSync(dir, { recursive: true, force: true });

  const row = (name: string, xs: number[]) =>
    `| ${name} | ${quantile(xs, 0.1).toFixed(2)} | ${quantile(xs, 0.5).toFixed(2)} | ${quantile(xs, 0.9).toFixed(2)} |`;
  const pair = (label: string, a: number[], b: number[]) =>
    `| ${label} | ${(quantile(b, 0.5) / quantile(a, 0.5)).toFixed(3)} | ${(100 * thresholdAccuracy(a, b)).toFixed(1)} % |`;
  const [unknown, unknownControl, wrongSecret, lastChar] = Object.values(apiKeys) as [number[], number[], number[], number[]];
  const [wrongAdmin, adminControl, adminLast, adminFirst, adminLength] = Object.values(adminKeys) as [number[], number[], number[], number[], number[]];
  const lines = [
    `# Timing of refusals (${QUICK ? 'quick' : 'full'} run)`,
    '',
    `${new Date().toISOString()} · ${cpus().length} × ${cpus()[0]?.model.trim()} · node ${process.version} · ${SAMPLES} requests per class, interleaved · server ${SERVER === join(ROOT, 'dist', 'src', 'server.js') ? 'this build' : SERVER}`,
    '',
    '| class | p10 ms | median ms | p90 ms |',
    '| --- | --- | --- | --- |',
    ...Object.entries(apiKeys).map(([name, xs]) => row(`API key: ${name}`, xs)),
    ...Object.entries(adminKeys).map(([name, xs]) => row(`admin key: ${name}`, xs)),
    '',
    '| pair | median ratio (second / first) | best threshold tells them apart |',
    '| --- | --- | --- |',
    pair('control: unknown selector → unknown selector', unknown, unknownControl),
    pair('unknown selector → real selector, wrong secret', unknown, wrongSecret),
    pair('real selector: wrong secret → secret wrong in its last character', wrongSecret, lastChar),
    pair('control: admin wrong key → wrong key', wrongAdmin, adminControl),
    pair('admin: wrong key → right but the last character', wrongAdmin, adminLast),
    pair('admin: wrong key → right but the first character', wrongAdmin, adminFirst),
    pair('admin: wrong key → another length', wrongAdmin, adminLength),
    '',
    'The admin comparison alone (sha256 of what was sent, timingSafeEqual against the key\'s digest), ns per comparison:',
    '',
    ...Object.entries(comparison).map(([name, ns]) => `- ${name}: ${ns.toFixed(0)} ns`),
    '',
  ];
  const text = lines.join('\n');
  mkdirSync(join(ROOT, 'bench', 'results'), { recursive: true });
  writeFileSync(join(ROOT, 'bench', 'results', 'timing.md'), text);
  process.stdout.write(`${text}\n`);
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:timing failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  for (const c of children) c.kill('SIGKILL');
  process.exit(1);
});
