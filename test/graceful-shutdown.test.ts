import http from 'node:http';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { call, checkDatabaseFile, expectStatus, isEnvelope, prng, waitForLog, type Outcome } from './helpers/load';
import { assertBuilt, jsonLines, makeTempDir, removeTempDirs, startServer, stopAllServers, type ServerProcess } from './helpers/server-process';

/**
 * SIGTERM on the real server while it is busy. A request the server has begun (it answered 100
 * Continue, see helpers/load.ts) gets its whole answer; a request arriving on a kept-alive connection
 * after the signal gets 503 UNAVAILABLE with Connection: close; a new connection is refused once the
 * listener is closed; the process exits 0 within SHUTDOWN_TIMEOUT_SECONDS; and everything it
 * acknowledged, and the last use and usage it only held in memory, is in the file afterwards.
 *
 * A request the server had not read yet when the signal came (still in the socket, or in the listen
 * backlog) may be cut off: closing idle connections and the listener cannot tell it is there. Those
 * are counted, not failed; every request that reached the app is held to the rules above.
 */

const SHUTDOWN_TIMEOUT_SECONDS = 10;
const LIMIT = 3;
const SEED = Number(process.env.KEYWARD_SHUTDOWN_SEED ?? randomBytes(4).readUInt32BE(0));

afterEach(async () => {
  await stopAllServers();
});

afterAll(() => {
  removeTempDirs();
});

beforeAll(() => {
  assertBuilt();
});

interface Setup {
  server: ServerProcess;
  env: Record<string, string>;
  dir: string;
  dbPath: string;
  admin: Record<string, string>;
}

async function start(extraEnv: Record<string, string> = {}): Promise<Setup> {
  const dir = makeTempDir('shutdown');
  const dbPath = join(dir, 'data', 'keyward.db');
  const adminKey = randomBytes(32).toString('hex');
  const env = {
    ADMIN_API_TOKEN: adminKey,
    DATABASE_PATH: dbPath,
    BCRYPT_ROUNDS: '4',
    PORT: '0',
    HOST: '127.0.0.1',
    SHUTDOWN_TIMEOUT_SECONDS: String(SHUTDOWN_TIMEOUT_SECONDS),
    ADMIN_RATE_LIMIT_PER_MINUTE: '1000000',
    MAX_TOKENS_PER_USER: '100000',
    AUTH_FAILURES_PER_MINUTE: '10000000',
    ...extraEnv,
  };
  const server = await startServer({ env, cwd: dir });
  return { server, env, dir, dbPath, admin: { 'X-Admin-API-Key': adminKey } };
}

function describeOutcome(o: Outcome): string {
  return o.kind === 'response' ? `${o.status} ${JSON.stringify(o.body)}` : `error ${o.code}`;
}

/** The 503 a draining server gives a request on a kept-alive connection: the envelope, and the connection goes. */
function isDrainingAnswer(o: Outcome): boolean {
  return isEnvelope(o, 503, 'UNAVAILABLE') && o.kind === 'response' && o.headers.connection === 'close';
}

/**
 * Fresh connections until one is refused, each bounded (a hang is HANG). The drain is logged just
 * before the listener closes, so a connection racing that close may still be taken from the backlog
 * and then reset, or be answered 503; refused must follow at once, and nothing may hang.
 */
async function refusedSoon(port: number): Promise<{ refused: boolean; before: string[] }> {
  const before: string[] = [];
  for (let attempt = 0; attempt < 20; attempt++) {
    const o = await call({ port, method: 'GET', path: '/healthz', timeoutMs: 5_000 });
    if (o.kind === 'error' && o.code === 'ECONNREFUSED') return { refused: true, before };
    const seen = o.kind === 'error' ? o.code : isDrainingAnswer(o) ? '503 draining' : describeOutcome(o);
    before.push(seen);
    if (seen !== 'ECONNRESET' && seen !== '503 draining') break;
  }
  return { refused: false, before };
}

function expectRefusedSoon(result: { refused: boolean; before: string[] }): void {
  expect(result.refused).toBe(true);
  expect(result.before.length).toBeLessThanOrEqual(3);
  for (const seen of result.before) expect(['ECONNRESET', '503 draining']).toContain(seen);
}

type Op = 'me' | 'mint' | 'acquire';

interface Sent {
  op: Op;
  transport: 'keep-alive' | 'fresh';
  outcome: Outcome;
  key?: { id: number };
}

test(`under load, SIGTERM finishes what was begun, refuses what comes after, exits 0 and loses nothing (seed ${SEED})`, async () => {
  const rand = prng(SEED);
  const { server, env, dir, dbPath, admin } = await start();
  const setupAgent = new http.Agent({ keepAlive: false });
  const api = (method: string, path: string, headers: Record<string, string>, body?: unknown) =>
    call({ port: server.port, method, path, headers, body, agent: setupAgent });

  const loadUser = expectStatus(await api('POST', '/admin/users', admin, { email: 'load@example.com', max_concurrent_bots: LIMIT, rate_limit_per_minute: 1_000_000 }), 201, 'user');
  const mintUser = expectStatus(await api('POST', '/admin/users', admin, { email: 'mint@example.com' }), 201, 'user');
  const keys: Array<{ id: number; token: string }> = [];
  for (let i = 0; i < 4; i++) {
    const minted = expectStatus(await api('POST', `/admin/users/${loadUser.id}/tokens`, admin, { scopes: ['bots:read', 'bots:write'] }), 201, 'key');
    keys.push({ id: minted.id, token: minted.token });
  }

  const keepAlive = new http.Agent({ keepAlive: true, maxSockets: 6 });
  const sent: Sent[] = [];
  let termAt = Infinity;
  let drainingSeen = false;
  let afterDrain = 0;
  let responses = 0;
  let onResponse = () => undefined as void;

  const one = async () => {
    const r = rand();
    const op: Op = r < 0.5 ? 'me' : r < 0.75 ? 'mint' : 'acquire';
    const transport = rand() < 0.7 ? 'keep-alive' : 'fresh';
    const key = keys[Math.floor(rand() * keys.length)]!;
    const base = { port: server.port, agent: transport === 'keep-alive' ? keepAlive : (false as const), expectContinue: true };
    const outcome =
      op === 'me'
        ? await call({ ...base, method: 'GET', path: '/v1/me', headers: { 'X-API-Key': key.token } })
        : op === 'mint'
          ? await call({ ...base, method: 'POST', path: `/admin/users/${mintUser.id}/tokens`, headers: admin, body: { name: 'load' } })
          : await call({ ...base, method: 'POST', path: '/v1/bots', headers: { 'X-API-Key': key.token }, body: { ttl_seconds: 600 } });
    sent.push({ op, transport, outcome, key: op === 'mint' ? undefined : key });
    if (outcome.kind === 'response') {
      responses++;
      onResponse();
    }
  };
  // Each worker keeps sending until it has sent a few requests after the server said it is draining,
  // so the load covers before, during and after the signal without spinning on refused connections.
  const worker = async () => {
    while (!drainingSeen || afterDrain < 30) {
      if (drainingSeen) afterDrain++;
      await one();
    }
  };

  const target = 40 + Math.floor(rand() * 60);
  const loaded = new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`only ${responses} responses within 20 s\n${server.logs}`)), 20_000);
    onResponse = () => {
      if (responses < target) return;
      clearTimeout(timer);
      onResponse = () => undefined;
      resolve();
    };
  });
  const workers = Array.from({ length: 10 }, () => worker());
  await loaded;

  termAt = performance.now();
  server.child.kill('SIGTERM');
  await waitForLog(server, 'shutting down: finishing in-flight requests');
  drainingSeen = true;
  const drainLoggedAt = performance.now();
  // Once the listener is closed, a new connection is refused at once rather than left hanging.
  const probes = await Promise.all([refusedSoon(server.port), refusedSoon(server.port), refusedSoon(server.port)]);
  await Promise.all(workers);
  const exit = await server.exited;
  const exitedAt = performance.now();
  keepAlive.destroy();
  setupAgent.destroy();

  expect(exit).toEqual({ code: 0, signal: null });
  expect(exitedAt - termAt).toBeLessThan(SHUTDOWN_TIMEOUT_SECONDS * 1000);
  for (const probe of probes) expectRefusedSoon(probe);
  expect(jsonLines(server.stdout).map((l) => l.msg)).toContain('stopped');

  const normal = (s: Sent) => {
    const o = s.outcome;
    if (o.kind !== 'response') return false;
    if (s.op === 'me') return o.status === 200 && o.body?.token?.id === s.key?.id;
    if (s.op === 'mint') return o.status === 201 && typeof o.body?.token === 'string';
    return o.status === 201 || isEnvelope(o, 429, 'CONCURRENCY_LIMIT_EXCEEDED');
  };
  const problems: string[] = [];
  const tally: Record<string, number> = {};
  for (const s of sent) {
    const o = s.outcome;
    const begunBefore = o.continuedAt !== null && o.continuedAt < termAt;
    const label = `${s.op} over ${s.transport} (${o.continuedAt === null ? 'not begun' : begunBefore ? 'begun before SIGTERM' : 'begun after SIGTERM'})`;
    const verdict = normal(s) ? 'normal' : isDrainingAnswer(o) ? '503 draining' : describeOutcome(o).slice(0, 60);
    tally[`${label}: ${verdict}`] = (tally[`${label}: ${verdict}`] ?? 0) + 1;
    if (o.kind === 'error' && o.code === 'HANG') problems.push(`${label}: no answer within the timeout`);
    else if (begunBefore && !normal(s)) problems.push(`${label}: ${describeOutcome(o)}`);
    else if (o.continuedAt !== null && !normal(s) && !isDrainingAnswer(o)) problems.push(`${label}: ${describeOutcome(o)}`);
    else if (o.continuedAt === null) {
      // Never read by the server: it cannot have been answered, and may only fail once the signal is out.
      if (o.kind === 'response') problems.push(`${label}: answered without 100 Continue: ${describeOutcome(o)}`);
      else if (!['ECONNREFUSED', 'ECONNRESET', 'EPIPE'].includes(o.code)) problems.push(`${label}: ${o.code}`);
    }
  }
  const begun = sent.filter((s) => s.outcome.continuedAt !== null && s.outcome.continuedAt < termAt && s.outcome.kind === 'response');
  const lateResponses = sent.filter((s) => s.outcome.kind === 'response' && s.outcome.continuedAt !== null && s.outcome.continuedAt < termAt);
  process.stdout.write(
    `graceful-shutdown seed ${SEED}: ${sent.length} requests, exit ${Math.round(exitedAt - termAt)} ms after SIGTERM ` +
      `(drain logged after ${Math.round(drainLoggedAt - termAt)} ms)\n${JSON.stringify(tally, null, 1)}\n`,
  );
  expect(problems).toEqual([]);
  expect(begun.length).toBe(lateResponses.length);
  // Every error (a connection cut or refused) happened to a request the server had not begun, after the signal.
  for (const s of sent) if (s.outcome.kind === 'error') expect(s.outcome.continuedAt).toBeNull();

  // Restart on the same file: every acknowledged mint is there, and so is what was held in memory.
  expect(checkDatabaseFile(dbPath)).toEqual({ integrity: ['ok'], foreignKeyViolations: [] });
  const again = await startServer({ env, cwd: dir });
  const api2 = (method: string, path: string, headers: Record<string, string>) => call({ port: again.port, method, path, headers });

  // Usage counts every request that passed authentication (the 503s never got that far), written at shutdown.
  const authenticated = sent.filter((s) => s.op !== 'mint' && normal(s)).length;
  const usage = expectStatus(await api2('GET', `/admin/users/${loadUser.id}/usage`, admin), 200, 'usage');
  expect(usage.totals.requests).toBe(authenticated);
  // Last use, likewise: every key that answered /v1/me has one.
  const usedKeys = new Set(sent.filter((s) => s.op === 'me' && normal(s)).map((s) => s.key!.id));
  for (const id of usedKeys) {
    const token = expectStatus(await api2('GET', `/admin/tokens/${id}`, admin), 200, `token ${id}`);
    expect({ id, used: token.last_used_at !== null }).toEqual({ id, used: true });
  }

  const minted = sent.filter((s) => s.op === 'mint' && normal(s)).map((s) => (s.outcome.kind === 'response' ? (s.outcome.body as { id: number; token: string }) : null)!);
  expect(minted.length).toBeGreaterThan(0);
  const lost: string[] = [];
  for (const m of minted) {
    const me = await api2('GET', '/v1/me', { 'X-API-Key': m.token });
    if (!(me.kind === 'response' && me.status === 200 && me.body.token.id === m.id)) lost.push(`token ${m.id}: ${describeOutcome(me)}`);
  }
  expect(lost).toEqual([]);
  const bots = expectStatus(await api2('GET', '/v1/bots', { 'X-API-Key': keys[0]!.token }), 200, 'bots');
  const admitted = sent.filter((s) => s.op === 'acquire' && s.outcome.kind === 'response' && s.outcome.status === 201).length;
  expect(bots.concurrency).toEqual({ limit: LIMIT, active: admitted });
  expect((await again.stop('SIGTERM')).code).toBe(0);
}, 90_000);

/**
 * A mint the server has begun (it answered 100 Continue) whose body stops after `sendFirst` bytes;
 * resolves once those are written, with the answer still to come and the call that sends the rest.
 */
async function heldBackMint(options: {
  port: number;
  userId: number;
  admin: Record<string, string>;
  body: Record<string, unknown>;
  sendFirst: number;
  agent?: http.Agent;
}): Promise<{ mint: Promise<Outcome>; writeRest: () => void }> {
  let writeRest: () => void = () => undefined;
  let begun: () => void = () => undefined;
  const begunPromise = new Promise<void>((r) => (begun = r));
  const mint = call({
    port: options.port,
    method: 'POST',
    path: `/admin/users/${options.userId}/tokens`,
    headers: options.admin,
    body: options.body,
    agent: options.agent,
    expectContinue: true,
    writeBody: (req, body) => {
      req.write(body.subarray(0, options.sendFirst));
      writeRest = () => req.end(body.subarray(options.sendFirst));
      begun();
    },
  });
  await begunPromise;
  return { mint, writeRest: () => writeRest() };
}

describe('a slow request in flight at SIGTERM', () => {
  test('a body still trickling in is read to the end and answered, then the process exits 0', async () => {
    const { server, env, dir, admin } = await start();
    const user = expectStatus(await call({ port: server.port, method: 'POST', path: '/admin/users', headers: admin, body: { email: 'slow@example.com' } }), 201, 'user');

    const { mint, writeRest } = await heldBackMint({ port: server.port, userId: user.id, admin, body: { name: 'trickled', scopes: ['bots:read'] }, sendFirst: 10 });
    server.child.kill('SIGTERM');
    await waitForLog(server, 'shutting down: finishing in-flight requests');
    expectRefusedSoon(await refusedSoon(server.port));
    // The process is still there, waiting for the rest of the body.
    expect(server.child.exitCode).toBeNull();
    writeRest();
    const outcome = await mint;
    const minted = expectStatus(outcome, 201, 'trickled mint');
    expect(minted.name).toBe('trickled');
    expect(await server.exited).toEqual({ code: 0, signal: null });

    const again = await startServer({ env, cwd: dir });
    const me = await call({ port: again.port, method: 'GET', path: '/v1/me', headers: { 'X-API-Key': minted.token } });
    expect(expectStatus(me, 200, 'me').token.id).toBe(minted.id);
  }, 45_000);

  test('mints waiting on a slow bcrypt all finish; a kept-alive connection is then closed or answered 503 UNAVAILABLE', async () => {
    // Slow on purpose: each hash takes a noticeable time, and they queue behind BCRYPT_CONCURRENCY.
    const { server, env, dir, admin } = await start({ BCRYPT_ROUNDS: '11', BCRYPT_CONCURRENCY: '1' });
    const user = expectStatus(await call({ port: server.port, method: 'POST', path: '/admin/users', headers: admin, body: { email: 'bcrypt@example.com' } }), 201, 'user');

    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const continued: Array<Promise<void>> = [];
    const mints: Array<Promise<Outcome>> = [];
    for (let i = 0; i < 3; i++) {
      let begun: () => void = () => undefined;
      continued.push(new Promise<void>((r) => (begun = r)));
      // One on the kept-alive connection, the others on their own.
      mints.push(
        call({
          port: server.port,
          method: 'POST',
          path: `/admin/users/${user.id}/tokens`,
          headers: admin,
          body: { name: `slow-${i}` },
          agent: i === 0 ? agent : false,
          expectContinue: true,
          writeBody: (req, body) => {
            req.end(body);
            begun();
          },
        }),
      );
    }
    await Promise.all(continued);
    const termAt = performance.now();
    server.child.kill('SIGTERM');
    await waitForLog(server, 'shutting down: finishing in-flight requests');
    const outcomes = await Promise.all(mints);
    const answeredAt = performance.now();
    const minted = outcomes.map((o, i) => expectStatus(o, 201, `slow mint ${i}`) as { id: number; token: string; name: string });
    expect(minted.map((m) => m.name)).toEqual(['slow-0', 'slow-1', 'slow-2']);
    expect(server.child.exitCode).toBeNull();

    // The connection the first mint came on either ended with its answer (Connection: close), so the
    // next request needs a new connection and is refused; or it is still open, and the next request on
    // it is refused in the one envelope and the server then closes it. Never a reset, never a hang.
    const late = await call({ port: server.port, method: 'GET', path: '/v1/me', headers: { 'X-API-Key': minted[0]!.token }, agent });
    const first = outcomes[0]!;
    if (first.kind === 'response' && first.headers.connection === 'close') {
      expect(late.kind === 'error' && late.code).toBe('ECONNREFUSED');
    } else {
      expect(late.kind === 'response' && late.reusedSocket).toBe(true);
      expect(isDrainingAnswer(late)).toBe(true);
      expect(late.kind === 'response' && late.headers['retry-after']).toBe('1');
    }

    const exit = await server.exited;
    agent.destroy();
    expect(exit).toEqual({ code: 0, signal: null });
    process.stdout.write(
      `slow bcrypt: answers ${Math.round(answeredAt - termAt)} ms after SIGTERM, exit ${Math.round(performance.now() - termAt)} ms after\n`,
    );

    const again = await startServer({ env, cwd: dir });
    for (const m of minted) {
      const me = await call({ port: again.port, method: 'GET', path: '/v1/me', headers: { 'X-API-Key': m.token } });
      expect(expectStatus(me, 200, `me ${m.name}`).token.id).toBe(m.id);
    }
  }, 45_000);
});

describe('bounded by SHUTDOWN_TIMEOUT_SECONDS', () => {
  test('a body that never finishes is cut off when the timeout runs out, and the process still exits 0', async () => {
    const { server, admin } = await start({ SHUTDOWN_TIMEOUT_SECONDS: '2' });
    const user = expectStatus(await call({ port: server.port, method: 'POST', path: '/admin/users', headers: admin, body: { email: 'stuck@example.com' } }), 201, 'user');
    // The rest of the body is never sent.
    const { mint: stuck } = await heldBackMint({ port: server.port, userId: user.id, admin, body: { name: 'never-finished' }, sendFirst: 5 });
    const termAt = performance.now();
    server.child.kill('SIGTERM');
    expect(await server.exited).toEqual({ code: 0, signal: null });
    const took = performance.now() - termAt;
    expect(took).toBeGreaterThanOrEqual(1_900);
    expect(took).toBeLessThan(6_000);
    const outcome = await stuck;
    expect(outcome.kind === 'error' && outcome.code).toBe('ECONNRESET');
    expect(jsonLines(server.stdout).map((l) => l.msg)).toEqual(
      expect.arrayContaining(['in-flight requests did not finish in time; closing their connections', 'stopped']),
    );
  });

  // Without Connection: close on those answers, the kept-alive connection would sit idle for
  // keepAliveTimeout (5 s + Node's 1 s) and hold server.close(), and the exit, that long after the work.
  test('the answer to a request in flight at SIGTERM closes its kept-alive connection, so the exit follows the work', async () => {
    const { server, admin } = await start();
    const user = expectStatus(await call({ port: server.port, method: 'POST', path: '/admin/users', headers: admin, body: { email: 'linger@example.com' } }), 201, 'user');
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const { mint, writeRest } = await heldBackMint({ port: server.port, userId: user.id, admin, body: { name: 'in-flight' }, sendFirst: 5, agent });
    server.child.kill('SIGTERM');
    await waitForLog(server, 'shutting down: finishing in-flight requests');
    writeRest();
    const outcome = await mint;
    const answeredAt = performance.now();
    expectStatus(outcome, 201, 'in-flight mint');
    try {
      expect(outcome.kind === 'response' && outcome.headers.connection).toBe('close');
      expect(await server.exited).toEqual({ code: 0, signal: null });
      expect(performance.now() - answeredAt).toBeLessThan(2_000);
    } finally {
      agent.destroy();
    }
  });
});
