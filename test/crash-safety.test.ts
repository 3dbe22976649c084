import http from 'node:http';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { call, checkDatabaseFile, expectStatus, isEnvelope, prng, readDatabase, type Outcome } from './helpers/load';
import { assertBuilt, makeTempDir, removeTempDirs, startServer, stopAllServers, type ServerProcess } from './helpers/server-process';

/**
 * The real server killed with SIGKILL while mints, revocations and bot admissions are in flight, five
 * times over on the same SQLite file. What the server acknowledged must still hold after each restart,
 * requests that never got an answer may have happened or not (nothing else), a bot slot is never
 * counted twice, and SQLite finds the file intact. SQLite-only by nature: the process owns the file.
 *
 * A SIGKILL loses the process, not the operating system's page cache, so this proves the commit
 * protocol (nothing acknowledged before it is committed, nothing half-written), not fsync: a power
 * cut is what synchronous=FULL is for, and no test here can pull the plug.
 */

const LIMIT = 3;
const ROUNDS = 5;
const WORKERS = 12;
/** Longer than the whole file runs: a lease must not run out between a kill and the next check. */
const BOT_TTL = 900;
const SEED = Number(process.env.KEYWARD_CRASH_SEED ?? randomBytes(4).readUInt32BE(0));
const rand = prng(SEED);

type Pending = 'none' | 'pending' | 'acked' | 'unknown';

interface KnownToken {
  id: number;
  token: string;
  revoke: Pending;
}

interface KnownBot {
  id: number;
  release: Pending;
}

interface RoundStats {
  round: number;
  inFlightAtKill: number;
  acked: { mint: number; revoke: number; acquire: number; release: number };
  unknown: { mint: number; revoke: number; acquire: number; release: number };
  refused429: number;
  /** Tokens found on disk that no answer told us about: the kill fell between commit and response. */
  committedUnanswered: number;
}

let dir: string;
let dbPath: string;
let adminKey: string;
let env: Record<string, string>;
let server: ServerProcess;
let agent: http.Agent;

beforeAll(() => {
  assertBuilt();
  dir = makeTempDir('crash');
  dbPath = join(dir, 'data', 'keyward.db');
  adminKey = randomBytes(32).toString('hex');
  env = {
    ADMIN_API_TOKEN: adminKey,
    DATABASE_PATH: dbPath,
    BCRYPT_ROUNDS: '4',
    PORT: '0',
    HOST: '127.0.0.1',
    // Neither the admin rate limit nor the cap on a user's keys may refuse any of the load.
    ADMIN_RATE_LIMIT_PER_MINUTE: '1000000',
    MAX_TOKENS_PER_USER: '100000',
    AUTH_FAILURES_PER_MINUTE: '10000000',
  };
});

afterAll(async () => {
  agent?.destroy();
  await stopAllServers();
  removeTempDirs();
});

const admin = () => ({ 'X-Admin-API-Key': adminKey });

function describeOutcome(o: Outcome): string {
  return o.kind === 'response' ? `${o.status} ${JSON.stringify(o.body)}` : `error ${o.code}`;
}

/** At most `n` calls at a time, in order. */
async function inBatches<T, R>(items: T[], n: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(n, items.length) }, async () => {
      while (next < items.length) {
        const i = next++;
        out[i] = await fn(items[i]!);
      }
    }),
  );
  return out;
}

test(`acknowledged writes survive SIGKILL mid-load, ${ROUNDS} rounds on one file (seed ${SEED})`, async () => {
  const tokens = new Map<number, KnownToken>();
  const bots = new Map<number, KnownBot>();
  /** Mints that got no answer: their tokens may exist, and we can never hold their secrets. */
  let unknownMints = 0;
  const stats: RoundStats[] = [];

  server = await startServer({ env, cwd: dir });
  agent = new http.Agent({ keepAlive: true, maxSockets: WORKERS });
  const api = (method: string, path: string, headers: Record<string, string>, body?: unknown) =>
    call({ port: server.port, method, path, headers, body, agent });

  const minter = expectStatus(await api('POST', '/admin/users', admin(), { email: 'minter@example.com', rate_limit_per_minute: 1_000_000 }), 201, 'create minter');
  const runner = expectStatus(
    await api('POST', '/admin/users', admin(), { email: 'runner@example.com', max_concurrent_bots: LIMIT, rate_limit_per_minute: 1_000_000 }),
    201,
    'create runner',
  );
  const runnerKey: string = expectStatus(
    await api('POST', `/admin/users/${runner.id}/tokens`, admin(), { scopes: ['bots:read', 'bots:write'] }),
    201,
    'mint runner key',
  ).token;
  const asRunner = () => ({ 'X-API-Key': runnerKey });

  for (let round = 1; round <= ROUNDS; round++) {
    const roundStats: RoundStats = {
      round,
      inFlightAtKill: 0,
      acked: { mint: 0, revoke: 0, acquire: 0, release: 0 },
      unknown: { mint: 0, revoke: 0, acquire: 0, release: 0 },
      refused429: 0,
      committedUnanswered: 0,
    };
    stats.push(roundStats);
    const problems: string[] = [];
    let killAt = Infinity;
    let inFlight = 0;
    let acks = 0;
    let onAck = () => undefined as void;

    /**
     * What a request's fate was: a definite answer (checked against `ok`), a refused connection (the
     * request never reached the server), or unknown (sent, no answer: the kill). Anything but an
     * expected answer before the kill, or any error before it, is a problem.
     */
    const send = async (what: string, method: string, path: string, headers: Record<string, string>, body: unknown, ok: number[]) => {
      inFlight++;
      const outcome = await call({ port: server.port, method, path, headers, body, agent });
      inFlight--;
      if (outcome.kind === 'response') {
        if (!ok.includes(outcome.status)) problems.push(`${what}: unexpected ${describeOutcome(outcome)}`);
        return { fate: 'answered' as const, outcome };
      }
      if (outcome.code === 'HANG') problems.push(`${what}: no answer within the timeout while the server was ${killAt === Infinity ? 'alive' : 'dead'}`);
      else if (performance.now() < killAt) problems.push(`${what}: ${outcome.code} before the kill`);
      return { fate: outcome.code === 'ECONNREFUSED' ? ('refused' as const) : ('unknown' as const), outcome };
    };
    const ack = () => {
      acks++;
      onAck();
    };

    const mint = async () => {
      const { fate, outcome } = await send('mint', 'POST', `/admin/users/${minter.id}/tokens`, admin(), { name: `r${round}` }, [201]);
      if (fate === 'answered' && outcome.kind === 'response' && outcome.status === 201) {
        tokens.set(outcome.body.id, { id: outcome.body.id, token: outcome.body.token, revoke: 'none' });
        roundStats.acked.mint++;
        ack();
      } else if (fate === 'unknown') {
        unknownMints++;
        roundStats.unknown.mint++;
      }
    };
    const revoke = async () => {
      const candidates = [...tokens.values()].filter((t) => t.revoke === 'none');
      if (candidates.length === 0) return mint();
      const target = candidates[Math.floor(rand() * candidates.length)]!;
      target.revoke = 'pending';
      const { fate, outcome } = await send(`revoke ${target.id}`, 'DELETE', `/admin/tokens/${target.id}`, admin(), undefined, [204]);
      if (fate === 'answered' && outcome.kind === 'response' && outcome.status === 204) {
        target.revoke = 'acked';
        roundStats.acked.revoke++;
        ack();
      } else if (fate === 'unknown') {
        target.revoke = 'unknown';
        roundStats.unknown.revoke++;
      } else target.revoke = 'none';
    };
    const release = async (): Promise<void> => {
      const candidates = [...bots.values()].filter((b) => b.release === 'none');
      if (candidates.length === 0) return acquire(false);
      const target = candidates[Math.floor(rand() * candidates.length)]!;
      target.release = 'pending';
      const { fate, outcome } = await send(`release ${target.id}`, 'DELETE', `/v1/bots/${target.id}`, asRunner(), undefined, [204]);
      if (fate === 'answered' && outcome.kind === 'response' && outcome.status === 204) {
        target.release = 'acked';
        roundStats.acked.release++;
        ack();
      } else if (fate === 'unknown') {
        target.release = 'unknown';
        roundStats.unknown.release++;
      } else target.release = 'none';
    };
    const acquire = async (releaseWhenFull = true): Promise<void> => {
      const { fate, outcome } = await send('acquire', 'POST', '/v1/bots', asRunner(), { ttl_seconds: BOT_TTL, label: `r${round}` }, [201, 429]);
      if (fate === 'answered' && outcome.kind === 'response') {
        if (outcome.status === 201) {
          bots.set(outcome.body.id, { id: outcome.body.id, release: 'none' });
          roundStats.acked.acquire++;
          ack();
        } else {
          if (!isEnvelope(outcome, 429, 'CONCURRENCY_LIMIT_EXCEEDED')) problems.push(`acquire: 429 is not the envelope: ${describeOutcome(outcome)}`);
          roundStats.refused429++;
          if (releaseWhenFull && killAt === Infinity) await release();
        }
      } else if (fate === 'unknown') roundStats.unknown.acquire++;
    };

    const worker = async () => {
      while (killAt === Infinity) {
        const r = rand();
        if (r < 0.35) await mint();
        else if (r < 0.55) await revoke();
        else if (r < 0.85) await acquire();
        else await release();
      }
    };

    // The kill comes after a random number of acknowledgements (so every round has something to
    // check), at a random moment after that one: wherever the other workers' requests happen to be.
    const ackTarget = 15 + Math.floor(rand() * 50);
    const extraDelayMs = Math.floor(rand() * 40);
    const enoughAcks = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`round ${round}: only ${acks} acknowledgements within 20 s\n${problems.join('\n')}\n${server.logs}`)), 20_000);
      onAck = () => {
        if (acks < ackTarget) return;
        clearTimeout(timer);
        onAck = () => undefined;
        resolve();
      };
    });
    const workers = Array.from({ length: WORKERS }, () => worker());
    await enoughAcks;
    await new Promise((r) => setTimeout(r, extraDelayMs));
    roundStats.inFlightAtKill = inFlight;
    killAt = performance.now();
    server.child.kill('SIGKILL');
    expect(await server.exited).toEqual({ code: null, signal: 'SIGKILL' });
    await Promise.all(workers);
    // Sockets of the dead process must not be reused by the next one's requests.
    agent.destroy();
    agent = new http.Agent({ keepAlive: true, maxSockets: WORKERS });
    expect({ round, problems }).toEqual({ round, problems: [] });

    // The file as the crash left it, before any server touches it again.
    expect({ round, ...checkDatabaseFile(dbPath) }).toEqual({ round, integrity: ['ok'], foreignKeyViolations: [] });
    const onDisk = readDatabase(dbPath, (db) => {
      const now = new Date().toISOString();
      return {
        tokens: db.prepare('select id, revoked_at from tokens where user_id = ?').all(minter.id) as Array<{ id: number; revoked_at: string | null }>,
        minted: (db.prepare("select target_id from audit_events where action = 'token.minted'").all() as Array<{ target_id: string }>).map((r) => Number(r.target_id)),
        revoked: (db.prepare("select target_id from audit_events where action = 'token.revoked'").all() as Array<{ target_id: string }>).map((r) => Number(r.target_id)),
        activeBots: (db.prepare("select id from bots where user_id = ? and status = 'active' and expires_at > ? order by id").all(runner.id, now) as Array<{ id: number }>).map((r) => r.id),
      };
    });

    const rows = new Map(onDisk.tokens.map((r) => [r.id, r]));
    const lostMints = [...tokens.values()].filter((t) => !rows.has(t.id)).map((t) => t.id);
    const lostRevocations = [...tokens.values()].filter((t) => t.revoke === 'acked' && rows.get(t.id)?.revoked_at == null).map((t) => t.id);
    const phantomRevocations = [...tokens.values()].filter((t) => t.revoke === 'none' && rows.get(t.id)?.revoked_at != null).map((t) => t.id);
    const strangers = onDisk.tokens.filter((r) => !tokens.has(r.id)).length;
    expect({ round, lostMints, lostRevocations, phantomRevocations }).toEqual({ round, lostMints: [], lostRevocations: [], phantomRevocations: [] });
    // Tokens nobody was told about can only come from mints that got no answer.
    expect(strangers).toBeLessThanOrEqual(unknownMints);
    roundStats.committedUnanswered = strangers - stats.slice(0, -1).reduce((n, s) => n + s.committedUnanswered, 0);
    // A token and its audit entry are one transaction: both or neither, whatever the kill interrupted.
    const mintedAudits = new Set(onDisk.minted);
    expect(onDisk.tokens.filter((r) => !mintedAudits.has(r.id)).map((r) => r.id)).toEqual([]);
    expect([...onDisk.revoked].sort((a, b) => a - b)).toEqual(onDisk.tokens.filter((r) => r.revoked_at !== null).map((r) => r.id).sort((a, b) => a - b));

    const mustHold = [...bots.values()].filter((b) => b.release === 'none').map((b) => b.id);
    const active = new Set(onDisk.activeBots);
    expect({ round, notHeld: mustHold.filter((id) => !active.has(id)) }).toEqual({ round, notHeld: [] });
    expect({ round, releasedButHeld: [...bots.values()].filter((b) => b.release === 'acked' && active.has(b.id)).map((b) => b.id) }).toEqual({
      round,
      releasedButHeld: [],
    });
    expect(active.size).toBeLessThanOrEqual(LIMIT);
    // Leases nobody was told about can only come from acquisitions that got no answer.
    expect(onDisk.activeBots.filter((id) => !bots.has(id)).length).toBeLessThanOrEqual(roundStats.unknown.acquire);

    // Restart on the same file: the server must agree with the file, and with what it acknowledged.
    server = await startServer({ env, cwd: dir });

    const seen = await inBatches([...tokens.values()], 8, async (t) => ({ t, outcome: await api('GET', '/v1/me', { 'X-API-Key': t.token }) }));
    const wrong: string[] = [];
    for (const { t, outcome } of seen) {
      const works = outcome.kind === 'response' && outcome.status === 200 && outcome.body?.token?.id === t.id;
      const revoked = isEnvelope(outcome, 401, 'API_KEY_REVOKED');
      if (t.revoke === 'none' && !works) wrong.push(`token ${t.id} (minted, not revoked): ${describeOutcome(outcome)}`);
      else if (t.revoke === 'acked' && !revoked) wrong.push(`token ${t.id} (revoked): ${describeOutcome(outcome)}`);
      else if (t.revoke === 'unknown' && !works && !revoked) wrong.push(`token ${t.id} (revocation unanswered): ${describeOutcome(outcome)}`);
      // What an unanswered revocation did is now known.
      if (t.revoke === 'unknown') t.revoke = revoked ? 'acked' : 'none';
    }
    expect({ round, wrong }).toEqual({ round, wrong: [] });

    const mine = expectStatus(await api('GET', '/v1/bots?limit=100', asRunner()), 200, 'list bots');
    expect(mine.concurrency).toEqual({ limit: LIMIT, active: onDisk.activeBots.length });
    expect(mine.data.map((b: { id: number }) => b.id)).toEqual(onDisk.activeBots);
    expect(expectStatus(await api('GET', `/admin/users/${runner.id}`, admin()), 200, 'get runner').active_bots).toBe(onDisk.activeBots.length);

    // Admission after the restart counts exactly the slots the file says are held: of a burst, exactly
    // the free ones are admitted.
    const free = LIMIT - onDisk.activeBots.length;
    const burst = await Promise.all(Array.from({ length: free + 4 }, () => api('POST', '/v1/bots', asRunner(), { ttl_seconds: BOT_TTL })));
    const admitted = burst.filter((o) => o.kind === 'response' && o.status === 201);
    const refused = burst.filter((o) => isEnvelope(o, 429, 'CONCURRENCY_LIMIT_EXCEEDED'));
    expect({ round, admitted: admitted.length, refused: refused.length }).toEqual({ round, admitted: free, refused: 4 });
    for (const o of refused) expect(o.kind === 'response' && o.body.error.details).toEqual({ limit: LIMIT, active: LIMIT });

    // Every slot is given back, so the next round starts from what it acknowledges itself.
    const held = [...onDisk.activeBots, ...admitted.map((o) => (o.kind === 'response' ? (o.body.id as number) : 0))];
    for (const b of bots.values()) if (b.release === 'unknown') b.release = active.has(b.id) ? 'none' : 'acked';
    const releases = await Promise.all(held.map((id) => api('DELETE', `/v1/bots/${id}`, asRunner())));
    expect(releases.map(describeOutcome)).toEqual(held.map(() => '204 null'));
    for (const id of held) bots.set(id, { id, release: 'acked' });
    expect(expectStatus(await api('GET', '/v1/bots', asRunner()), 200, 'list bots').concurrency).toEqual({ limit: LIMIT, active: 0 });
  }

  // The last server goes down cleanly, and the file is still sound.
  agent.destroy();
  expect(await server.stop('SIGTERM')).toEqual({ code: 0, signal: null });
  expect(checkDatabaseFile(dbPath)).toEqual({ integrity: ['ok'], foreignKeyViolations: [] });
  // Shown in the test output: how much was in the air when each kill came.
  process.stdout.write(`crash-safety seed ${SEED}\n${stats.map((s) => JSON.stringify(s)).join('\n')}\n`);
}, 90_000);
