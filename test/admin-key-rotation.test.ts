import { randomBytes } from 'node:crypto';
import request from 'supertest';
import { adminFingerprint } from '../src/audit/audit';
import { ADMIN_KEY, appsClosedAfterEach, expectError } from './helpers/app';
import { assertBuilt, makeTempDir, removeTempDirs, startServer, stopAllServers, type ServerProcess } from './helpers/server-process';

/**
 * Changing the admin key without downtime (docs/security.md): while ADMIN_API_TOKEN_NEXT is set, the
 * old and the new key both work, the audit log names which one each change used, and once the change
 * is finished the old key is refused. The whole procedure is also run on a real server process,
 * restarted with each step's settings on the same database.
 */

const NEXT_KEY = 'kw-admin-next-9876543210ZYXWVUTSRQPONMLKJIH';

const app = appsClosedAfterEach();

const withKey = (key: string) => ({ 'X-Admin-API-Key': key });

describe('ADMIN_API_TOKEN_NEXT on the admin API', () => {
  test('both keys work while it is set, and nothing else does', async () => {
    const ctx = await app({ ADMIN_API_TOKEN_NEXT: NEXT_KEY });
    const created = await request(ctx.app).post('/admin/users').set(withKey(ADMIN_KEY)).send({ email: 'old-key@example.com' });
    expect(created.status).toBe(201);
    const listed = await request(ctx.app).get('/admin/users').set(withKey(NEXT_KEY));
    expect(listed.status).toBe(200);
    expect(listed.body.data.map((u: { email: string }) => u.email)).toEqual(['old-key@example.com']);

    for (const wrong of [NEXT_KEY.slice(0, -1), `${ADMIN_KEY}x`, `${ADMIN_KEY},${NEXT_KEY}`, randomBytes(32).toString('hex')]) {
      expectError(await request(ctx.app).get('/admin/users').set(withKey(wrong)), 401, 'INVALID_ADMIN_KEY');
    }
  });

  test('without it, the next key is just a wrong key', async () => {
    const ctx = await app();
    expectError(await request(ctx.app).get('/admin/users').set(withKey(NEXT_KEY)), 401, 'INVALID_ADMIN_KEY');
    expect((await request(ctx.app).get('/admin/users').set(withKey(ADMIN_KEY))).status).toBe(200);
  });

  test('the audit log names the key each change was made with, by fingerprint', async () => {
    const ctx = await app({ ADMIN_API_TOKEN_NEXT: NEXT_KEY });
    await request(ctx.app).post('/admin/users').set(withKey(ADMIN_KEY)).send({ email: 'by-old@example.com' }).expect(201);
    await request(ctx.app).post('/admin/users').set(withKey(NEXT_KEY)).send({ email: 'by-new@example.com' }).expect(201);
    const audit = await request(ctx.app).get('/admin/audit?action=user.created').set(withKey(NEXT_KEY));
    expect(audit.status).toBe(200);
    const byEmail = Object.fromEntries(
      audit.body.data.map((e: { details: { email: string }; actor: { id: string } }) => [e.details.email, e.actor.id]),
    );
    expect(byEmail).toEqual({
      'by-old@example.com': `admin:${adminFingerprint(ctx.config.adminKeyDigest)}`,
      'by-new@example.com': `admin:${adminFingerprint(ctx.config.adminKeyNextDigest!)}`,
    });
    expect(JSON.stringify(audit.body)).not.toContain(NEXT_KEY);
  });

  test('the next key is kept out of request ids like the admin key', async () => {
    const ctx = await app({ ADMIN_API_TOKEN_NEXT: NEXT_KEY });
    const res = await request(ctx.app).get('/healthz').set('X-Request-Id', NEXT_KEY);
    expect(res.status).toBe(200);
    expect(res.headers['x-request-id']).not.toBe(NEXT_KEY);
  });
});

describe('the documented procedure, on a real server process', () => {
  const oldKey = randomBytes(32).toString('hex');
  const newKey = randomBytes(32).toString('hex');
  let dir: string;
  let server: ServerProcess | undefined;

  beforeAll(() => {
    assertBuilt();
    dir = makeTempDir('admin-key');
  });
  afterAll(async () => {
    await stopAllServers();
    removeTempDirs();
  });

  const start = async (env: Record<string, string>) => {
    if (server) await server.stop();
    server = await startServer({
      env: { DATABASE_PATH: `${dir}/keyward.db`, PORT: '0', HOST: '127.0.0.1', BCRYPT_ROUNDS: '4', ...env },
    });
    return server;
  };
  const adminStatus = async (key: string) => (await fetch(`${server!.baseUrl}/admin/users`, { headers: withKey(key) })).status;

  test('old key only → both keys → new key only; the users and tokens made meanwhile stay', async () => {
    // 1. Running with the old key.
    await start({ ADMIN_API_TOKEN: oldKey });
    const user = await fetch(`${server!.baseUrl}/admin/users`, {
      method: 'POST',
      headers: { ...withKey(oldKey), 'Content-Type': 'application/json' },
      body: JSON.stringify({ email: 'kept@example.com' }),
    }).then((r) => r.json() as Promise<{ id: number }>);
    expect([await adminStatus(oldKey), await adminStatus(newKey)]).toEqual([200, 401]);

    // 2. The new key is added as ADMIN_API_TOKEN_NEXT: every client keeps working while each moves.
    await start({ ADMIN_API_TOKEN: oldKey, ADMIN_API_TOKEN_NEXT: newKey });
    expect([await adminStatus(oldKey), await adminStatus(newKey)]).toEqual([200, 200]);
    const minted = await fetch(`${server!.baseUrl}/admin/users/${user.id}/tokens`, { method: 'POST', headers: withKey(newKey) });
    expect(minted.status).toBe(201);
    const { token } = (await minted.json()) as { token: string };

    // 3. The new key becomes ADMIN_API_TOKEN and NEXT is emptied: the old key stops working.
    await start({ ADMIN_API_TOKEN: newKey });
    expect([await adminStatus(oldKey), await adminStatus(newKey)]).toEqual([401, 200]);
    const users = (await (await fetch(`${server!.baseUrl}/admin/users`, { headers: withKey(newKey) })).json()) as { data: Array<{ email: string }> };
    expect(users.data.map((u) => u.email)).toEqual(['kept@example.com']);
    expect((await fetch(`${server!.baseUrl}/v1/me`, { headers: { 'X-API-Key': token } })).status).toBe(200);
    // Neither key is ever written to the log.
    expect(server!.logs).not.toContain(oldKey);
    expect(server!.logs).not.toContain(newKey);
  });
});
