import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { adminClient, docBlock, freePort, keywardEnv, startUpstream, stopProcess, type Upstream, waitForHttp } from './helpers/gateway';
import { assertBuilt, makeTempDir, removeTempDirs, startServer, stopAllServers, type ServerProcess } from './helpers/server-process';

/**
 * docs/forward-auth.md's Caddy configuration, as written (only the addresses change), with Debian's
 * Caddy in front of a real keyward server and a small upstream that reports what reached it.
 */

const CADDY = '/usr/bin/caddy';
const ADMIN_KEY = randomBytes(32).toString('hex');

let keyward: ServerProcess;
let admin: ReturnType<typeof adminClient>;
let upstream: Upstream;
let caddy: ChildProcess;
let caddyLog = '';
let proxyBase: string;



beforeAll(async () => {
  assertBuilt();
  if (!existsSync(CADDY)) throw new Error(`${CADDY} is missing: apt-get install -y caddy (.ci/run does this)`);
  const dir = makeTempDir('caddy');
  keyward = await startServer({ env: keywardEnv(dir, ADMIN_KEY, { TRUST_PROXY: 'loopback' }) });
  admin = adminClient(keyward.baseUrl, ADMIN_KEY);
  upstream = await startUpstream();
  const port = await freePort();
  const site = docBlock('README.md', 'caddy', 'caddy')
    .replace('example.com {', `http://127.0.0.1:${port} {`)
    .replaceAll('keyward:8056', `127.0.0.1:${keyward.port}`)
    .replaceAll('my-service:9000', `127.0.0.1:${upstream.port}`);
  const caddyfile = join(dir, 'Caddyfile');
  // No admin endpoint, no certificates, state kept in the temporary directory.
  writeFileSync(caddyfile, `{\n  admin off\n  auto_https off\n  storage file_system ${join(dir, 'caddy-data')}\n}\n\n${site}\n`);
  caddy = spawn(CADDY, ['run', '--adapter', 'caddyfile', '--config', caddyfile], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { PATH: process.env.PATH ?? '', HOME: dir, XDG_DATA_HOME: join(dir, 'data'), XDG_CONFIG_HOME: join(dir, 'config') },
  });
  caddy.stdout?.on('data', (d) => (caddyLog += d));
  caddy.stderr?.on('data', (d) => (caddyLog += d));
  proxyBase = `http://127.0.0.1:${port}`;
  await waitForHttp(proxyBase + '/', () => caddyLog);
}, 30_000);

afterAll(async () => {
  await stopProcess(caddy, 'SIGTERM');
  if (upstream) await upstream.close();
  await stopAllServers();
  removeTempDirs();
});

describe('Caddy forward_auth in front of keyward, configured as docs/forward-auth.md says', () => {
  test('a good key reaches the upstream with its identity, and without the key itself', async () => {
    const { user, key } = await admin.userWithKey({ scopes: ['bots:read'] });
    // Both headers, the same key (keyward accepts that): neither may reach the service.
    const res = await fetch(`${proxyBase}/api/things`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${key.token}`, 'X-API-Key': key.token },
      body: '{}',
    });
    expect(res.status).toBe(200);
    const seen = upstream.reached.at(-1)!.headers;
    expect([seen['x-keyward-user-id'], seen['x-keyward-user-email'], seen['x-keyward-token-id'], seen['x-keyward-scopes'], seen['x-keyward-environment']]).toEqual([
      String(user.id),
      user.email,
      String(key.id),
      'bots:read',
      'live',
    ]);
    expect(seen['x-api-key']).toBeUndefined();
    expect(seen.authorization).toBeUndefined();
  });

  test("keyward's refusals reach the client as they are, envelope included, and nothing reaches the upstream", async () => {
    const { user, key } = await admin.userWithKey({ scopes: ['tokens:read'] });
    const before = upstream.reached.length;
    const missingScope = await fetch(`${proxyBase}/api/things`, { headers: { 'X-API-Key': key.token } });
    expect(missingScope.status).toBe(403);
    expect(((await missingScope.json()) as { error: { code: string } }).error.code).toBe('INSUFFICIENT_SCOPE');
    const noKey = await fetch(`${proxyBase}/api/things`);
    expect(noKey.status).toBe(401);
    expect(((await noKey.json()) as { error: { code: string } }).error.code).toBe('AUTHENTICATION_REQUIRED');

    // Unlike nginx, Caddy passes 429 through.
    await admin.call('PATCH', `/admin/users/${user.id}`, { rate_limit_per_minute: 0 });
    const limited = await fetch(`${proxyBase}/api/things`, { headers: { 'X-API-Key': key.token } });
    expect(limited.status).toBe(429);
    expect(limited.headers.get('retry-after')).toMatch(/^\d+$/);
    expect(upstream.reached).toHaveLength(before);
  });

  test('spoofed X-Keyward-* headers from the client never reach the upstream', async () => {
    const { user, key } = await admin.userWithKey({ scopes: ['bots:read'] });
    const res = await fetch(`${proxyBase}/api/things`, {
      headers: { 'X-API-Key': key.token, 'X-Keyward-User-Id': '999999', 'X-Keyward-Scopes': 'bots:read bots:write tokens:write', 'X-Keyward-External-Id': 'someone-else' },
    });
    expect(res.status).toBe(200);
    const seen = upstream.reached.at(-1)!.headers;
    // This user has none: keyward's empty header replaces the client's claim.
    expect([seen['x-keyward-user-id'], seen['x-keyward-scopes'], seen['x-keyward-external-id']]).toEqual([String(user.id), 'bots:read', '']);

    // With an external id and metadata, keyward's reach the service, not the client's.
    await admin.call('PATCH', `/admin/users/${user.id}`, { external_id: `acct-${user.id}` });
    await admin.call('PATCH', `/admin/tokens/${key.id}`, { metadata: { plan: 'pro' } });
    const spoofed = { 'X-API-Key': key.token, 'X-Keyward-External-Id': 'someone-else', 'X-Keyward-Token-Metadata': 'eyJwbGFuIjoiZW50In0' };
    expect((await fetch(`${proxyBase}/api/things`, { headers: spoofed })).status).toBe(200);
    const after = upstream.reached.at(-1)!.headers;
    expect(after['x-keyward-external-id']).toBe(`acct-${user.id}`);
    expect(JSON.parse(Buffer.from(String(after['x-keyward-token-metadata']), 'base64url').toString())).toEqual({ plan: 'pro' });
  });

  test('the allowlist sees the connection\'s address, not an X-Forwarded-For the client claims', async () => {
    const user = await admin.call('POST', '/admin/users', { email: `cip${randomBytes(4).toString('hex')}@example.com` });
    const elsewhere = await admin.call('POST', `/admin/users/${user.id}/tokens`, { scopes: ['bots:read'], allowed_ips: ['10.0.0.0/8'] });
    const res = await fetch(`${proxyBase}/api/things`, { headers: { 'X-API-Key': elsewhere.token, 'X-Forwarded-For': '10.1.2.3' } });
    expect(res.status).toBe(403);
  });
});
