import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import {
  assertBuilt,
  jsonLines,
  makeTempDir,
  NODE_FLAGS,
  REPO_ROOT,
  removeTempDirs,
  runBash,
  runServerUntilExit,
  startServer,
  stopAllServers,
  type ServerProcess,
} from './helpers/server-process';

/**
 * The built server as a real process: the seed's curl commands, start-up refusals, file modes,
 * graceful shutdown, what reaches the logs, and .env loading.
 */

/** The seed document's admin commands, kept inside the repository (test/fixtures/). */
const SEED_FILE = resolve(__dirname, 'fixtures', 'seed-admin-commands.txt');
const FULL_TOKEN = /^kw_live_[A-Za-z0-9]{12}_[A-Za-z0-9]{38}$/;

const newAdminKey = () => randomBytes(32).toString('hex');

function baseEnv(dir: string, adminKey: string): Record<string, string> {
  return {
    ADMIN_API_TOKEN: adminKey,
    DATABASE_PATH: join(dir, 'data', 'keyward.db'),
    BCRYPT_ROUNDS: '4',
    PORT: '0',
    HOST: '127.0.0.1',
  };
}

/** The multi-line curl command (backslash continuations) whose first line starts with `firstLine`. */
function extractCurl(text: string, firstLine: string): string {
  const lines = text.split('\n');
  const starts = lines.flatMap((l, i) => (l.trimStart().startsWith(firstLine) ? [i] : []));
  if (starts.length !== 1) {
    throw new Error(`expected exactly one command starting with ${firstLine} in ${SEED_FILE}, found ${starts.length}`);
  }
  const command: string[] = [];
  for (let i = starts[0]!; i < lines.length; i++) {
    const line = lines[i]!;
    command.push(line);
    if (!line.trimEnd().endsWith('\\')) break;
  }
  return command.join('\n');
}

function readSeed(): string {
  return readFileSync(SEED_FILE, 'utf8');
}

function rewriteHost(command: string, port: number): string {
  expect(command).toContain('localhost:8056');
  return command.split('localhost:8056').join(`127.0.0.1:${port}`);
}

async function getJson(url: string, headers: Record<string, string> = {}): Promise<{ status: number; body: any }> {
  const res = await fetch(url, { headers });
  const text = await res.text();
  return { status: res.status, body: text === '' ? null : JSON.parse(text) };
}

async function postJson(url: string, headers: Record<string, string>, body?: unknown): Promise<{ status: number; body: any }> {
  const res = await fetch(url, {
    method: 'POST',
    headers: body === undefined ? headers : { 'Content-Type': 'application/json', ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: text === '' ? null : JSON.parse(text) };
}

function mode(path: string): number {
  return statSync(path).mode & 0o777;
}

beforeAll(() => {
  assertBuilt();
});

afterEach(async () => {
  await stopAllServers();
});

afterAll(() => {
  removeTempDirs();
});

describe('the seed doc\'s admin curl commands, run verbatim against the real server', () => {
  let server: ServerProcess;
  let adminKey: string;

  beforeEach(async () => {
    const dir = makeTempDir('seed');
    adminKey = newAdminKey();
    server = await startServer({ env: baseEnv(dir, adminKey), cwd: dir });
  });

  test('create user 1 and mint a token that then works on GET /v1/me with X-API-Key', async () => {
    const seed = readSeed();
    const createUser = extractCurl(seed, 'curl -X POST "http://localhost:8056/admin/users" ');
    const mintToken = extractCurl(seed, 'curl -X POST "http://localhost:8056/admin/users/1/tokens" ');
    expect(createUser).toContain('X-Admin-API-Key: $ADMIN_TOKEN');
    expect(mintToken).toContain('X-Admin-API-Key: $ADMIN_TOKEN');

    const created = await runBash(rewriteHost(createUser, server.port), { env: { ADMIN_TOKEN: adminKey } });
    expect(created.code).toBe(0);
    const user = JSON.parse(created.stdout);
    expect(user).toMatchObject({ id: 1, email: 'user@example.com', name: 'User', max_concurrent_bots: 5 });

    const minted = await runBash(rewriteHost(mintToken, server.port), { env: { ADMIN_TOKEN: adminKey } });
    expect(minted.code).toBe(0);
    const token = JSON.parse(minted.stdout);
    expect(token).toMatchObject({ id: 1, user_id: 1 });
    expect(token.token).toMatch(FULL_TOKEN);

    const me = await getJson(`${server.baseUrl}/v1/me`, { 'X-API-Key': token.token });
    expect(me.status).toBe(200);
    expect(me.body.user).toMatchObject({ id: 1, email: 'user@example.com' });
    expect(me.body.token.id).toBe(1);
  });
});

describe('how keyward is started', () => {
  const pkg = JSON.parse(readFileSync(join(REPO_ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string>; config: { node_flags: string } };

  test('the image and npm start run the server with the same Node flags, package.json\'s config.node_flags', () => {
    expect(NODE_FLAGS).toEqual(['--max-semi-space-size=4', '--heap-growing-percent=30']);
    const dockerfile = readFileSync(join(REPO_ROOT, 'Dockerfile'), 'utf8');
    const cmd = dockerfile.split('\n').filter((l) => /^CMD\s/.test(l)).pop() ?? '';
    expect(JSON.parse(cmd.replace(/^CMD\s+/, ''))).toEqual(['node', ...NODE_FLAGS, 'dist/src/server.js']);
    for (const script of ['start', 'quickstart']) {
      expect([script, pkg.scripts[script]]).toEqual([script, expect.stringMatching(/&& node \$npm_package_config_node_flags dist\/src\/server\.js$/)]);
    }
  });

  test('the server these tests start runs with those flags', async () => {
    const dir = makeTempDir('flags');
    const server = await startServer({ env: baseEnv(dir, newAdminKey()) });
    expect(server.child.spawnargs.slice(1)).toEqual([...NODE_FLAGS, expect.stringMatching(/dist\/src\/server\.js$/)]);
    expect((await fetch(`${server.baseUrl}/healthz`)).status).toBe(200);
  });
});

describe('refusing to start with a bad configuration', () => {
  async function refuse(env: Record<string, string | undefined>) {
    const dir = makeTempDir('refuse');
    const result = await runServerUntilExit({ env: { DATABASE_PATH: join(dir, 'keyward.db'), ...env }, cwd: dir });
    expect(result.timedOut).toBe(false);
    expect(result.code).not.toBe(0);
    expect(result.code).not.toBeNull();
    // One message, on stderr, never a half-started server.
    expect(result.stderr.match(/keyward cannot start/g)).toHaveLength(1);
    expect(result.stdout).not.toContain('keyward listening');
    expect(existsSync(join(dir, 'keyward.db'))).toBe(false);
    return result;
  }

  test('refuses to start without ADMIN_API_TOKEN and says how to make one', async () => {
    const result = await refuse({});
    expect(result.stderr).toContain('ADMIN_API_TOKEN is required');
    expect(result.stderr).toContain('openssl rand -hex 32');
  });

  test('refuses an empty ADMIN_API_TOKEN', async () => {
    const result = await refuse({ ADMIN_API_TOKEN: '' });
    expect(result.stderr).toContain('ADMIN_API_TOKEN');
    expect(result.stderr).toContain('openssl rand -hex 32');
  });

  test('refuses an ADMIN_API_TOKEN shorter than 32 characters without echoing it', async () => {
    const shortKey = 'Zq8vR2mK-short-k3y';
    const result = await refuse({ ADMIN_API_TOKEN: shortKey });
    expect(result.stderr).toMatch(/ADMIN_API_TOKEN must be at least 32 characters/);
    expect(result.stderr).toContain('openssl rand -hex 32');
    expect(result.logs).not.toContain(shortKey);
  });

  test.each([
    ['changeme', 'changeme'],
    ['a 32+ character value that still says "replace"', 'please-replace-me-with-a-real-key-9f8e7d6c'],
  ])('refuses a placeholder admin key (%s) without echoing it', async (_label, value) => {
    const result = await refuse({ ADMIN_API_TOKEN: value });
    expect(result.stderr).toContain('ADMIN_API_TOKEN is a placeholder');
    expect(result.stderr).toContain('openssl rand -hex 32');
    expect(result.logs).not.toContain(value);
  });

  test('lists every bad variable in one message when several are wrong', async () => {
    const badKey = 'Zq8vR2mK-short-k3y';
    const result = await refuse({ ADMIN_API_TOKEN: badKey, PORT: 'abc', BCRYPT_ROUNDS: '99', LOG_LEVEL: 'loud' });
    expect(result.stderr).toContain('4 configuration problem(s)');
    expect(result.stderr).toMatch(/ADMIN_API_TOKEN must be at least 32 characters/);
    expect(result.stderr).toMatch(/PORT must be a whole number/);
    expect(result.stderr).toMatch(/BCRYPT_ROUNDS must be from 4 to 15, got 99/);
    expect(result.stderr).toMatch(/LOG_LEVEL must be one of/);
    expect(result.stderr).toContain('openssl rand -hex 32');
    expect(result.logs).not.toContain(badKey);
  });

  test('refuses TRUST_PROXY=true, which would let any client forge its address', async () => {
    const result = await refuse({ ADMIN_API_TOKEN: newAdminKey(), TRUST_PROXY: 'true' });
    expect(result.stderr).toContain('TRUST_PROXY');
  });
});

describe('the database file', () => {
  test('creates a not-yet-existing nested directory 0700 and keeps the database files 0600', async () => {
    const dir = makeTempDir('modes');
    const dbDir = join(dir, 'not', 'yet', 'there');
    const dbPath = join(dbDir, 'keyward.db');
    const server = await startServer({ env: { ...baseEnv(dir, newAdminKey()), DATABASE_PATH: dbPath }, cwd: dir });
    expect(existsSync(dbPath)).toBe(true);
    expect(mode(dbDir).toString(8)).toBe('700');
    expect(mode(dbPath).toString(8)).toBe('600');
    // WAL mode: the companions exist while the database is open, and must be as private as the file.
    let companions = 0;
    for (const suffix of ['-wal', '-shm']) {
      if (!existsSync(dbPath + suffix)) continue;
      companions++;
      expect(`${suffix} ${mode(dbPath + suffix).toString(8)}`).toBe(`${suffix} 600`);
    }
    expect(companions).toBeGreaterThan(0);
    expect((await server.stop()).code).toBe(0);
  });

  test('tightens an existing database file that others could read', async () => {
    const dir = makeTempDir('modes');
    const dbPath = join(dir, 'data', 'keyward.db');
    mkdirSync(join(dir, 'data'), { mode: 0o700 });
    writeFileSync(dbPath, '', { mode: 0o644 });
    expect(mode(dbPath).toString(8)).toBe('644');
    const server = await startServer({ env: { ...baseEnv(dir, newAdminKey()), DATABASE_PATH: dbPath }, cwd: dir });
    expect(mode(dbPath).toString(8)).toBe('600');
    await server.stop();
  });
});

describe('graceful shutdown', () => {
  test.each(['SIGTERM', 'SIGINT'] as const)('on %s it exits 0 within a few seconds and logs "stopped"', async (signal) => {
    const dir = makeTempDir('stop');
    const server = await startServer({ env: baseEnv(dir, newAdminKey()), cwd: dir });
    expect((await getJson(`${server.baseUrl}/healthz`)).status).toBe(200);
    const started = Date.now();
    const exit = await server.stop(signal);
    expect(Date.now() - started).toBeLessThan(5_000);
    expect(exit).toEqual({ code: 0, signal: null });
    const messages = jsonLines(server.stdout).map((l) => l.msg);
    expect(messages).toContain('stopped');
    expect(messages.indexOf('stopped')).toBeGreaterThan(messages.indexOf('keyward listening'));
  });

  test('data written before SIGTERM is there after a restart on the same DATABASE_PATH', async () => {
    const dir = makeTempDir('restart');
    const adminKey = newAdminKey();
    const env = baseEnv(dir, adminKey);
    const admin = { 'X-Admin-API-Key': adminKey };

    const first = await startServer({ env, cwd: dir });
    const created = await postJson(`${first.baseUrl}/admin/users`, admin, { email: 'kept@example.com', name: 'Kept' });
    expect(created.status).toBe(201);
    expect(created.body.id).toBe(1);
    const minted = await postJson(`${first.baseUrl}/admin/users/1/tokens`, admin);
    expect(minted.status).toBe(201);
    expect((await first.stop('SIGTERM')).code).toBe(0);

    const second = await startServer({ env, cwd: dir });
    const user = await getJson(`${second.baseUrl}/admin/users/1`, admin);
    expect(user.status).toBe(200);
    expect(user.body).toMatchObject({ id: 1, email: 'kept@example.com', name: 'Kept' });
    // The token minted before the restart still authenticates (its bcrypt hash was persisted).
    const me = await getJson(`${second.baseUrl}/v1/me`, { 'X-API-Key': minted.body.token });
    expect(me.status).toBe(200);
    expect(me.body.user.id).toBe(1);
    expect((await second.stop('SIGTERM')).code).toBe(0);
  });
});

describe('logs', () => {
  test('never contain the admin key or a minted token, even when the token is sent in a query string or a path', async () => {
    const dir = makeTempDir('logs');
    const adminKey = newAdminKey();
    const server = await startServer({ env: { ...baseEnv(dir, adminKey), LOG_LEVEL: 'trace' }, cwd: dir });

    // The seed flow, verbatim.
    const seed = readSeed();
    const createUser = extractCurl(seed, 'curl -X POST "http://localhost:8056/admin/users" ');
    const mintToken = extractCurl(seed, 'curl -X POST "http://localhost:8056/admin/users/1/tokens" ');
    expect((await runBash(rewriteHost(createUser, server.port), { env: { ADMIN_TOKEN: adminKey } })).code).toBe(0);
    const minted = await runBash(rewriteHost(mintToken, server.port), { env: { ADMIN_TOKEN: adminKey } });
    const token: string = JSON.parse(minted.stdout).token;
    expect(token).toMatch(FULL_TOKEN);
    const secretPart = token.slice(token.lastIndexOf('_') + 1);

    expect((await getJson(`${server.baseUrl}/v1/me`, { 'X-API-Key': token })).status).toBe(200);
    expect((await getJson(`${server.baseUrl}/v1/me`, { Authorization: `Bearer ${token}` })).status).toBe(200);

    // A wrong token (same selector, different secret) and a wrong admin key.
    const flipped = token.charAt(token.length - 10) === 'A' ? 'B' : 'A';
    const wrongToken = token.slice(0, -10) + flipped + token.slice(-9);
    expect((await getJson(`${server.baseUrl}/v1/me`, { 'X-API-Key': wrongToken })).status).toBe(401);
    const wrongAdmin = newAdminKey();
    expect((await getJson(`${server.baseUrl}/admin/users/1`, { 'X-Admin-API-Key': wrongAdmin })).status).toBe(401);

    // Tokens are never accepted in a query string, and the query string is never logged.
    const inQuery = await getJson(`${server.baseUrl}/v1/me?api_key=${encodeURIComponent(token)}`);
    expect(inQuery.status).toBe(401);
    const adminInQuery = await getJson(`${server.baseUrl}/admin/users/1?admin_key=${adminKey}`);
    expect(adminInQuery.status).toBe(401);
    // Nor in a path: a token pasted into the URL gets a 404 whose log line does not carry it.
    expect((await getJson(`${server.baseUrl}/v1/me/${token}`)).status).toBe(404);

    expect((await server.stop()).code).toBe(0);
    const logs = server.logs;
    expect(jsonLines(logs).filter((l) => l.msg === 'request').length).toBeGreaterThanOrEqual(9);
    expect(logs).not.toContain(adminKey);
    expect(logs).not.toContain(token);
    expect(logs).not.toContain(secretPart);
    expect(logs).not.toContain(wrongToken);
    expect(logs).not.toContain(wrongAdmin);
  });
});

describe('.env in the working directory', () => {
  test('is read when ADMIN_API_TOKEN is not in the environment, and its admin key works', async () => {
    const dir = makeTempDir('dotenv');
    const adminKey = newAdminKey();
    writeFileSync(join(dir, '.env'), `ADMIN_API_TOKEN=${adminKey}\n`, { mode: 0o600 });
    const { ADMIN_API_TOKEN: _omitted, ...env } = baseEnv(dir, adminKey);
    const server = await startServer({ env, cwd: dir });

    const created = await postJson(`${server.baseUrl}/admin/users`, { 'X-Admin-API-Key': adminKey }, { email: 'env@example.com' });
    expect(created.status).toBe(201);
    expect((await getJson(`${server.baseUrl}/admin/users/1`, { 'X-Admin-API-Key': newAdminKey() })).status).toBe(401);
    expect(server.logs).not.toContain(adminKey);
  });

  test('loses to a variable already set in the environment', async () => {
    const dir = makeTempDir('dotenv');
    const fileKey = newAdminKey();
    const envKey = newAdminKey();
    writeFileSync(join(dir, '.env'), `ADMIN_API_TOKEN=${fileKey}\nBCRYPT_ROUNDS=5\n`, { mode: 0o600 });
    const server = await startServer({ env: baseEnv(dir, envKey), cwd: dir });

    expect((await getJson(`${server.baseUrl}/admin/users`, { 'X-Admin-API-Key': envKey })).status).toBe(200);
    expect((await getJson(`${server.baseUrl}/admin/users`, { 'X-Admin-API-Key': fileKey })).status).toBe(401);
  });

  test('is checked like the environment: a placeholder in .env is refused', async () => {
    const dir = makeTempDir('dotenv');
    writeFileSync(join(dir, '.env'), 'ADMIN_API_TOKEN=changeme\n', { mode: 0o600 });
    const result = await runServerUntilExit({ env: { DATABASE_PATH: join(dir, 'keyward.db') }, cwd: dir });
    expect(result.code).not.toBe(0);
    expect(result.stderr).toContain('ADMIN_API_TOKEN is a placeholder');
    expect(result.stderr).toContain('openssl rand -hex 32');
  });
});

describe('secrets from files', () => {
  test('ADMIN_API_TOKEN_FILE: the README\'s commands make the key file; the server reads it, and its key works', async () => {
    const dir = makeTempDir('secret-file');
    const readme = readFileSync(join(REPO_ROOT, 'README.md'), 'utf8');
    const makeKey = /^openssl rand -hex 32 > admin-key && chmod 600 admin-key$/m.exec(readme)?.[0];
    expect(makeKey).toBeDefined();
    expect((await runBash(makeKey!, { cwd: dir })).code).toBe(0);
    const adminKey = readFileSync(join(dir, 'admin-key'), 'utf8').trim();
    expect(statSync(join(dir, 'admin-key')).mode & 0o777).toBe(0o600);
    const { ADMIN_API_TOKEN: _omitted, ...env } = baseEnv(dir, adminKey);
    const server = await startServer({ env: { ...env, ADMIN_API_TOKEN_FILE: join(dir, 'admin-key') }, cwd: dir });

    expect((await getJson(`${server.baseUrl}/admin/users`, { 'X-Admin-API-Key': adminKey })).status).toBe(200);
    expect((await getJson(`${server.baseUrl}/admin/users`, { 'X-Admin-API-Key': newAdminKey() })).status).toBe(401);
    expect(server.logs).not.toContain(adminKey);
  });

  test('refuses to start with both ADMIN_API_TOKEN and ADMIN_API_TOKEN_FILE, naming both', async () => {
    const dir = makeTempDir('secret-file');
    const adminKey = newAdminKey();
    writeFileSync(join(dir, 'admin-key'), adminKey, { mode: 0o600 });
    const result = await runServerUntilExit({ env: { ...baseEnv(dir, adminKey), ADMIN_API_TOKEN_FILE: join(dir, 'admin-key') }, cwd: dir });
    expect(result.code).toBe(1);
    expect(result.stderr).toContain('ADMIN_API_TOKEN and ADMIN_API_TOKEN_FILE are both set; set only one of them');
    expect(result.stderr).not.toContain(adminKey);
  });
});

describe('least-privilege admin access on the real server', () => {
  test('a named admin key and an SSO admin each do what they may, and the audit log names them', async () => {
    const dir = makeTempDir('admin-access');
    const rootKey = newAdminKey();
    const server = await startServer({ env: { ...baseEnv(dir, rootKey), SSO_TRUSTED_PROXIES: '127.0.0.1, ::1', SSO_ADMIN_GROUPS: 'platform', SSO_ADMIN_SCOPES: 'users:read, audit:read' }, cwd: dir });
    const minted = await postJson(`${server.baseUrl}/admin/admin-keys`, { 'X-Admin-API-Key': rootKey }, { name: 'provisioning', scopes: ['users:write'] });
    expect(minted.status).toBe(201);
    const key = minted.body.key as string;
    expect((await postJson(`${server.baseUrl}/admin/users`, { 'X-Admin-API-Key': key }, { email: 'made-by-key@example.com' })).status).toBe(201);
    expect((await getJson(`${server.baseUrl}/admin/users`, { 'X-Admin-API-Key': key })).status).toBe(403);

    const ada = { 'X-Forwarded-Email': 'ada@example.com', 'X-Forwarded-User': 'ada', 'X-Forwarded-Groups': 'platform' };
    const users = await getJson(`${server.baseUrl}/admin/users`, ada);
    expect(users.status).toBe(200);
    expect(users.body.data.map((u: { email: string }) => u.email)).toEqual(['made-by-key@example.com']);
    expect((await postJson(`${server.baseUrl}/admin/users`, { ...ada, 'X-Keyward-CSRF': '1' }, { email: 'x@example.com' })).status).toBe(403);
    expect((await getJson(`${server.baseUrl}/admin/users`, { ...ada, 'X-Forwarded-Groups': 'staff' })).status).toBe(403);

    const audit = await getJson(`${server.baseUrl}/admin/audit?action=user.created`, ada);
    expect(audit.body.data.map((e: { actor: { id: string; name: string | null } }) => e.actor)).toEqual([expect.objectContaining({ id: 'admin_key:1', name: 'provisioning' })]);
    expect(server.logs).not.toContain(key);
    expect(server.logs).not.toContain(rootKey);
  });
});
