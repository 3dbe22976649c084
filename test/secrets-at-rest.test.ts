import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import request from 'supertest';
import { ADMIN_KEY, admin, createTestApp, createUser, mintToken, tempDir, type TestContext } from './helpers/app';

describe('secrets at rest and in logs', () => {
  let ctx: TestContext;
  let dir: string;
  const logLines: string[] = [];

  beforeAll(async () => {
    dir = tempDir();
    const sink = new Writable({ write: (chunk, _enc, done) => { logLines.push(String(chunk)); done(); } });
    ctx = await createTestApp({ env: { DATABASE_PATH: join(dir, 'nested', 'keyward.db') }, logDestination: sink });
  });
  afterAll(async () => {
    await ctx.close();
  });

  test('the database file and its WAL hold neither a minted token nor its secret', async () => {
    const user = await createUser(ctx);
    const minted = await Promise.all([mintToken(ctx, user.id), mintToken(ctx, user.id, { name: 'second' })]);
    for (const t of minted) expect((await request(ctx.app).get('/v1/me').set('X-API-Key', t.token)).status).toBe(200);

    const files = readdirSync(join(dir, 'nested')).filter((f) => f.startsWith('keyward.db'));
    expect(files).toEqual(expect.arrayContaining(['keyward.db', 'keyward.db-wal']));
    const bytes = Buffer.concat(files.map((f) => readFileSync(join(dir, 'nested', f))));
    expect(bytes.length).toBeGreaterThan(0);
    // The selector is stored on purpose; make sure the search itself can find what is there.
    expect(bytes.includes(minted[0]!.token.split('_')[2]!)).toBe(true);
    for (const { token } of minted) {
      const secret = token.split('_')[3]!.slice(0, 32);
      expect(bytes.includes(token)).toBe(false);
      expect(bytes.includes(secret)).toBe(false);
      expect(bytes.includes(secret.slice(0, 16))).toBe(false);
    }
    expect(bytes.includes(ADMIN_KEY)).toBe(false);
  });

  test('the database file and its directory are private to their owner', () => {
    expect(statSync(join(dir, 'nested')).mode & 0o777).toBe(0o700);
    for (const f of readdirSync(join(dir, 'nested'))) expect({ f, mode: statSync(join(dir, 'nested', f)).mode & 0o777 }).toEqual({ f, mode: 0o600 });
  });

  test('request logs carry ids and outcomes but no credential, wherever it was sent', async () => {
    const user = await createUser(ctx);
    const { token } = await mintToken(ctx, user.id);
    await request(ctx.app).get('/v1/me').set('X-API-Key', token);
    await request(ctx.app).get('/v1/me').set('Authorization', `Bearer ${token}`);
    await request(ctx.app).get(`/v1/me?api_key=${token}`);
    await request(ctx.app).get(`/nope/${token}?token=${token}`);
    await request(ctx.app).get('/admin/users').set('X-Admin-API-Key', `${ADMIN_KEY}x`);
    await request(ctx.app).post('/admin/users').set(admin).send({ email: token });
    await request(ctx.app).get('/v1/me').set('X-API-Key', `${token.slice(0, -1)}x`);
    await request(ctx.app).get('/v1/me').set('Cookie', `session=${token}`);

    const log = logLines.join('');
    const entries = logLines.map((l) => JSON.parse(l));
    expect(entries.some((e) => e.msg === 'request' && e.route === 'getMe' && e.status === 200 && e.user_id === user.id && typeof e.token_id === 'number')).toBe(true);
    expect(entries.some((e) => e.error_code === 'INVALID_ADMIN_KEY')).toBe(true);
    expect(log).not.toContain(token.split('_')[3]!.slice(0, 32));
    expect(log).not.toContain(ADMIN_KEY);
    expect(log).not.toContain('$2b$');
  });
});
