import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { adminClient, docBlock, freePort, keywardEnv, startNginx, startUpstream, stopProcess, type Upstream, waitForHttp } from './helpers/gateway';
import { assertBuilt, makeTempDir, removeTempDirs, startServer, stopAllServers, type ServerProcess } from './helpers/server-process';

/**
 * docs/forward-auth.md's nginx configuration, as written (only the ports change), with real nginx in
 * front of a real keyward server and a small upstream that reports what reached it.
 */

const ADMIN_KEY = randomBytes(32).toString('hex');

let keyward: ServerProcess;
let admin: ReturnType<typeof adminClient>;
let upstream: Upstream;
let reached: Upstream['reached'];
let nginx: ChildProcess;
let nginxLog: () => string;
let proxyBase: string;


beforeAll(async () => {
  assertBuilt();
  const dir = makeTempDir('nginx');
  // nginx connects from loopback and sends the client's address in X-Forwarded-For.
  keyward = await startServer({ env: keywardEnv(dir, ADMIN_KEY, { TRUST_PROXY: 'loopback' }) });

  admin = adminClient(keyward.baseUrl, ADMIN_KEY);
  upstream = await startUpstream();
  reached = upstream.reached;
  const upstreamPort = upstream.port;
  const nginxPort = await freePort();

  const site = docBlock('docs/forward-auth.md', 'nginx', 'nginx')
    .replace('listen 8080;', `listen 127.0.0.1:${nginxPort};`)
    .replaceAll('127.0.0.1:9000', `127.0.0.1:${upstreamPort}`)
    .replaceAll('127.0.0.1:8056', `127.0.0.1:${keyward.port}`)
    .replaceAll('include keyward-verify.conf;', `include ${join(dir, 'keyward-verify.conf')};`)
    .replaceAll('include keyward-identity.conf;', `include ${join(dir, 'keyward-identity.conf')};`);
  writeFileSync(join(dir, 'keyward-verify.conf'), docBlock('docs/forward-auth.md', 'nginx', 'nginx-verify'));
  writeFileSync(join(dir, 'keyward-identity.conf'), docBlock('docs/forward-auth.md', 'nginx', 'nginx-identity'));
  const started = startNginx(dir, site);
  nginx = started.child;
  nginxLog = started.log;
  proxyBase = `http://127.0.0.1:${nginxPort}`;
  await waitForHttp(proxyBase + '/', nginxLog);
}, 30_000);

afterAll(async () => {
  await stopProcess(nginx, 'SIGQUIT');
  if (upstream) await upstream.close();
  await stopAllServers();
  removeTempDirs();
});


describe('nginx auth_request in front of keyward, configured as docs/forward-auth.md says', () => {
  test('a good key reaches the upstream with its identity, and without the key itself', async () => {
    const { user, key } = await admin.userWithKey({ scopes: ['bots:read'] });
    const before = reached.length;
    const res = await fetch(`${proxyBase}/api/things`, { headers: { 'X-API-Key': key.token } });
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ upstream: true });
    expect(reached).toHaveLength(before + 1);
    const seen = reached.at(-1)!.headers;
    expect({
      id: seen['x-keyward-user-id'],
      email: seen['x-keyward-user-email'],
      token: seen['x-keyward-token-id'],
      scopes: seen['x-keyward-scopes'],
      environment: seen['x-keyward-environment'],
    }).toEqual({ id: String(user.id), email: user.email, token: String(key.id), scopes: 'bots:read', environment: 'live' });
    expect(seen['x-api-key']).toBeUndefined();
    expect(seen.authorization).toBeUndefined();
  });

  test('the user\'s external id and the key\'s metadata reach the upstream, not what the client claims', async () => {
    const { user, key } = await admin.userWithKey({ scopes: ['bots:read'], metadata: { plan: 'pro', seats: 5 } });
    await admin.call('PATCH', `/admin/users/${user.id}`, { external_id: `acct-${user.id}` });
    const res = await fetch(`${proxyBase}/api/things`, { headers: { 'X-API-Key': key.token, 'X-Keyward-External-Id': 'spoofed', 'X-Keyward-Token-Metadata': 'eyJwbGFuIjoiZW50In0' } });
    expect(res.status).toBe(200);
    const seen = reached.at(-1)!.headers;
    expect(seen['x-keyward-external-id']).toBe(`acct-${user.id}`);
    expect(JSON.parse(Buffer.from(String(seen['x-keyward-token-metadata']), 'base64url').toString())).toEqual({ plan: 'pro', seats: 5 });
  });

  test('Bearer works too, for any method (nginx asks keyward with GET)', async () => {
    const { key } = await admin.userWithKey({ scopes: ['bots:read'] });
    const res = await fetch(`${proxyBase}/api/things`, { method: 'POST', headers: { Authorization: `Bearer ${key.token}` }, body: '{"a":1}' });
    expect(res.status).toBe(200);
    expect(reached.at(-1)!.headers['x-keyward-token-id']).toBe(String(key.id));
  });

  test('a bad or missing key gets 401 and never reaches the upstream', async () => {
    const { key } = await admin.userWithKey({ scopes: ['bots:read'] });
    const before = reached.length;
    const wrong = key.token.slice(0, -1) + (key.token.endsWith('a') ? 'b' : 'a');
    expect((await fetch(`${proxyBase}/api/things`, { headers: { 'X-API-Key': wrong } })).status).toBe(401);
    expect((await fetch(`${proxyBase}/api/things`)).status).toBe(401);
    await admin.call('DELETE', `/admin/tokens/${key.id}`);
    expect((await fetch(`${proxyBase}/api/things`, { headers: { 'X-API-Key': key.token } })).status).toBe(401);
    expect(reached).toHaveLength(before);
  });

  test('a key without the scope a location asks for gets 403 there, and passes where it has it', async () => {
    const { key } = await admin.userWithKey({ scopes: ['bots:read'] });
    const before = reached.length;
    expect((await fetch(`${proxyBase}/api/admin/reset`, { headers: { 'X-API-Key': key.token } })).status).toBe(403);
    expect(reached).toHaveLength(before);
    const { key: writer } = await admin.userWithKey({ scopes: ['bots:read', 'bots:write'] });
    expect((await fetch(`${proxyBase}/api/admin/reset`, { headers: { 'X-API-Key': writer.token } })).status).toBe(200);
    expect(reached.at(-1)!.headers['x-keyward-scopes']).toBe('bots:read bots:write');
  });

  test('spoofed X-Keyward-* headers from the client never reach the upstream', async () => {
    const { user, key } = await admin.userWithKey({ scopes: ['bots:read'] });
    const spoofed = {
      'X-Keyward-User-Id': '999999',
      'X-Keyward-User-Email': 'admin@example.com',
      'X-Keyward-Token-Id': '1',
      'X-Keyward-Scopes': 'bots:read bots:write tokens:write',
      'X-Keyward-Environment': 'live',
      'X-Keyward-External-Id': 'someone-else',
      'X-Keyward-Token-Metadata': 'eyJwbGFuIjoiZW50In0',
    };
    const res = await fetch(`${proxyBase}/api/things`, { headers: { ...spoofed, 'X-API-Key': key.token } });
    expect(res.status).toBe(200);
    const seen = reached.at(-1)!.headers;
    expect([seen['x-keyward-user-id'], seen['x-keyward-user-email'], seen['x-keyward-scopes']]).toEqual([String(user.id), user.email, 'bots:read']);
    // This user has no external id: the client's claim is dropped, not passed on.
    expect(seen['x-keyward-external-id']).toBeUndefined();
    expect(seen['x-keyward-token-metadata']).toBeUndefined();

    // Without a key the spoofed identity is refused outright, nothing reaches the upstream.
    const before = reached.length;
    expect((await fetch(`${proxyBase}/api/things`, { headers: spoofed })).status).toBe(401);
    expect(reached).toHaveLength(before);
  });

  test('the key\'s IP allowlist sees the client address nginx forwards, not one the client claims', async () => {
    const user = await admin.call('POST', '/admin/users', { email: `ip${randomBytes(4).toString('hex')}@example.com` });
    const elsewhere = await admin.call('POST', `/admin/users/${user!.id}/tokens`, { scopes: ['bots:read'], allowed_ips: ['10.0.0.0/8'] });
    const local = await admin.call('POST', `/admin/users/${user!.id}/tokens`, { scopes: ['bots:read'], allowed_ips: ['127.0.0.1'] });
    // nginx replaces the client's X-Forwarded-For with the real address (127.0.0.1 here).
    expect((await fetch(`${proxyBase}/api/things`, { headers: { 'X-API-Key': elsewhere!.token, 'X-Forwarded-For': '10.1.2.3' } })).status).toBe(403);
    expect((await fetch(`${proxyBase}/api/things`, { headers: { 'X-API-Key': local!.token, 'X-Forwarded-For': '10.1.2.3' } })).status).toBe(200);
  });
});
