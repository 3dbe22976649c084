import { Writable } from 'node:stream';
import request from 'supertest';
import { admin, createTestApp, createUser, expectError, mintToken, type TestContext } from './helpers/app';
import { jsonLines } from './helpers/server-process';

/**
 * Metadata on a key (issue 21): a JSON object the admin sets, at most 1 KiB and 5 levels deep, shown
 * in listings and on /v1/me, and handed by forward auth to the upstream in its JSON and as one
 * base64url header. Only the admin API writes it: the services behind forward auth trust it.
 */

class LogSink extends Writable {
  text = '';
  override _write(chunk: Buffer, _encoding: string, done: () => void): void {
    this.text += chunk.toString();
    done();
  }
}

let ctx: TestContext;
let sink: LogSink;
beforeEach(async () => {
  sink = new LogSink();
  ctx = await createTestApp({ env: { LOG_LEVEL: 'info' }, logDestination: sink });
});
afterEach(() => ctx.close());

const PLAN = { plan: 'pro', org: { id: 'org_42', region: 'eu' }, features: ['exports', 'sso'], quota: 1000 };
const decode = (header: string | undefined) => JSON.parse(Buffer.from(header ?? '', 'base64url').toString('utf8')) as unknown;
const tokenRow = (id: number) => ctx.storage.db.selectFrom('tokens').selectAll().where('id', '=', id).executeTakeFirstOrThrow();

describe('metadata set by the admin', () => {
  test('at mint: in the response, the row, every listing, /v1/me, and /auth/verify (JSON and X-Keyward-Token-Metadata)', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { name: 'pro', metadata: PLAN });
    expect(minted.metadata).toEqual(PLAN);
    expect(JSON.parse((await tokenRow(minted.id)).metadata!)).toEqual(PLAN);
    expect((await request(ctx.app).get(`/admin/tokens/${minted.id}`).set(admin)).body.metadata).toEqual(PLAN);
    expect((await request(ctx.app).get(`/admin/users/${user.id}/tokens`).set(admin)).body.data[0].metadata).toEqual(PLAN);
    expect((await request(ctx.app).get('/admin/tokens').set(admin)).body.data[0].metadata).toEqual(PLAN);
    expect((await request(ctx.app).get('/v1/me').set('X-API-Key', minted.token)).body.token.metadata).toEqual(PLAN);
    const verified = await request(ctx.app).get('/auth/verify').set('X-API-Key', minted.token);
    expect(verified.status).toBe(200);
    expect(verified.body.metadata).toEqual(PLAN);
    expect(verified.headers['x-keyward-token-metadata']).toMatch(/^[A-Za-z0-9_-]+$/);
    expect(decode(verified.headers['x-keyward-token-metadata'])).toEqual(PLAN);
  });

  test('any JSON survives the header: quotes, newlines, non-ASCII, emoji', async () => {
    const tricky = { note: 'Line 1\nLine "2"; é ü 漢字 🙂', empty: {}, list: [null, true, 1.5] };
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { metadata: tricky });
    const verified = await request(ctx.app).get('/auth/verify').set('X-API-Key', minted.token);
    expect(decode(verified.headers['x-keyward-token-metadata'])).toEqual(tricky);
  });

  test('none: null in the JSON and an empty header, so a gateway replaces anything the client sent', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id);
    const verified = await request(ctx.app).get('/auth/verify').set('X-API-Key', minted.token).set('X-Keyward-Token-Metadata', 'eyJwbGFuIjoiZW50In0');
    expect([verified.body.metadata, verified.headers['x-keyward-token-metadata']]).toEqual([null, '']);
  });

  test('PATCH changes and clears it, effective on the next request; rotation copies it', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { metadata: { plan: 'free' } });
    expect((await request(ctx.app).get('/auth/verify').set('X-API-Key', minted.token)).body.metadata).toEqual({ plan: 'free' });
    const changed = await request(ctx.app).patch(`/admin/tokens/${minted.id}`).set(admin).send({ metadata: PLAN });
    expect([changed.status, changed.body.metadata]).toEqual([200, PLAN]);
    expect((await request(ctx.app).get('/auth/verify').set('X-API-Key', minted.token)).body.metadata).toEqual(PLAN);

    const rotated = await request(ctx.app).post(`/admin/tokens/${minted.id}/rotate`).set(admin).send({});
    expect([rotated.status, rotated.body.metadata]).toEqual([201, PLAN]);
    expect((await request(ctx.app).get('/v1/me').set('X-API-Key', rotated.body.token)).body.token.metadata).toEqual(PLAN);

    const cleared = await request(ctx.app).patch(`/admin/tokens/${rotated.body.id}`).set(admin).send({ metadata: null });
    expect(cleared.body.metadata).toBeNull();
    expect((await tokenRow(rotated.body.id)).metadata).toBeNull();
  });

  test('the audit log and the request logs record that it changed, never what it says', async () => {
    const user = await createUser(ctx);
    const minted = await mintToken(ctx, user.id, { metadata: PLAN });
    await request(ctx.app).patch(`/admin/tokens/${minted.id}`).set(admin).send({ metadata: { plan: 'enterprise-secretish' } });
    await request(ctx.app).get('/auth/verify').set('X-API-Key', minted.token);
    const audit = await request(ctx.app).get(`/admin/audit?target=token:${minted.id}`).set(admin);
    const [updated, mintedEntry] = audit.body.data as Array<{ action: string; details: Record<string, any> }>;
    expect(mintedEntry!.details.metadata).toEqual({ bytes: JSON.stringify(PLAN).length, sha256: expect.stringMatching(/^[0-9a-f]{16}$/) });
    expect(updated!.action).toBe('token.updated');
    expect(Object.keys(updated!.details)).toEqual(['metadata']);
    const everything = JSON.stringify(audit.body) + sink.text;
    for (const secretish of ['org_42', 'enterprise-secretish', Buffer.from(JSON.stringify(PLAN)).toString('base64url')]) expect(everything).not.toContain(secretish);
    expect(jsonLines(sink.text).some((l) => l.msg === 'request')).toBe(true);
  });
});

describe('what is refused', () => {
  test('a user key minting its own key cannot set metadata (400): the upstream trusts it', async () => {
    const user = await createUser(ctx);
    const key = await mintToken(ctx, user.id, { scopes: ['tokens:read', 'tokens:write', 'bots:read'] });
    const error = expectError(await request(ctx.app).post('/v1/tokens').set('X-API-Key', key.token).send({ scopes: ['bots:read'], metadata: { plan: 'enterprise' } }), 400, 'VALIDATION_ERROR');
    expect(error.details).toEqual([{ field: 'metadata', in: 'body', message: 'is set by the admin API only: the services behind forward auth trust it' }]);
    expect(await ctx.storage.db.selectFrom('tokens').select('id').execute()).toHaveLength(1);
  });

  const deep = (levels: number): Record<string, unknown> => (levels <= 1 ? { leaf: true } : { next: deep(levels - 1) });

  test.each([
    ['more than 1 KiB as JSON', { blob: 'x'.repeat(1024) }, 'must be at most 1024 bytes as JSON'],
    ['6 levels deep', deep(6), 'must not nest deeper than 5 levels'],
    ['an array', ['plan'], 'must be object,null'],
    ['a string', 'pro', 'must be object,null'],
    ['a number', 7, 'must be object,null'],
  ])('%s is 400 VALIDATION_ERROR at mint and by PATCH, and nothing is written', async (_what, metadata, message) => {
    const user = await createUser(ctx);
    const minting = expectError(await request(ctx.app).post(`/admin/users/${user.id}/tokens`).set(admin).send({ metadata }), 400, 'VALIDATION_ERROR');
    expect(minting.details).toEqual([expect.objectContaining({ field: 'metadata', in: 'body', message: expect.stringContaining(message) })]);
    const minted = await mintToken(ctx, user.id);
    expectError(await request(ctx.app).patch(`/admin/tokens/${minted.id}`).set(admin).send({ metadata }), 400, 'VALIDATION_ERROR');
    expect((await tokenRow(minted.id)).metadata).toBeNull();
    expect(await ctx.storage.db.selectFrom('tokens').select('id').execute()).toHaveLength(1);
  });

  test('exactly 1 KiB and exactly 5 levels are accepted', async () => {
    const user = await createUser(ctx);
    const kib = { blob: 'x'.repeat(1024 - JSON.stringify({ blob: '' }).length) };
    expect(Buffer.byteLength(JSON.stringify(kib))).toBe(1024);
    expect((await mintToken(ctx, user.id, { metadata: kib })).metadata).toEqual(kib);
    expect((await mintToken(ctx, user.id, { metadata: deep(5) })).metadata).toEqual(deep(5));
  });
});
