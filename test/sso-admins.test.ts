import request from 'supertest';
import { ConfigError } from '../src/config';
import { admin, appsClosedAfterEach, expectError, testConfig } from './helpers/app';

/**
 * SSO admins (issue 18): a person signed in through the trusted proxy, in one of SSO_ADMIN_GROUPS,
 * uses /admin with no admin key, holding SSO_ADMIN_SCOPES, under their own name. supertest connects
 * from loopback, which plays the proxy here.
 */

const PROXY = { SSO_TRUSTED_PROXIES: '127.0.0.1, ::1' };
const ADMINS = { ...PROXY, SSO_ADMIN_GROUPS: 'keyward-admins, platform' };
const CSRF = { 'X-Keyward-CSRF': '1' };
const person = (groups: string, email = 'ada@example.com', subject = 'ada-subject') => ({
  'X-Forwarded-Email': email,
  'X-Forwarded-User': subject,
  'X-Forwarded-Groups': groups,
});

const app = appsClosedAfterEach();

describe('a signed-in person in an admin group', () => {
  test('reads with no admin key, and changes with X-Keyward-CSRF: 1, audited under their own name', async () => {
    const ctx = await app(ADMINS);
    expect((await request(ctx.app).get('/admin/users').set(person('staff,platform'))).status).toBe(200);
    const created = await request(ctx.app).post('/admin/users').set(person('platform')).set(CSRF).send({ email: 'new@example.com' });
    expect(created.status).toBe(201);
    const entries = (await request(ctx.app).get('/admin/audit?actor=sso:ada-subject').set(admin)).body.data;
    expect(entries).toEqual([
      expect.objectContaining({
        action: 'user.created',
        actor: { type: 'sso', id: 'sso:ada-subject', user_id: null, token_id: null, email: 'ada@example.com', name: null },
      }),
    ]);
    // No keyward user was made for the person: SSO admins act on keyward, they are not its users.
    expect((await request(ctx.app).get('/admin/users').set(admin)).body.data.map((u: { email: string }) => u.email)).toEqual(['new@example.com']);
  });

  test('a change without the CSRF header, or from another site\'s page, is refused (403 CSRF_CHECK_FAILED)', async () => {
    const ctx = await app(ADMINS);
    expectError(await request(ctx.app).post('/admin/users').set(person('platform')).send({ email: 'x@example.com' }), 403, 'CSRF_CHECK_FAILED');
    expectError(
      await request(ctx.app).post('/admin/users').set(person('platform')).set(CSRF).set('Origin', 'https://evil.example').send({ email: 'x@example.com' }),
      403,
      'CSRF_CHECK_FAILED',
    );
    expect((await request(ctx.app).get('/admin/users').set(admin)).body.data).toEqual([]);
  });

  test('holds SSO_ADMIN_SCOPES only: what they lack is 403 INSUFFICIENT_SCOPE; an admin key they mint stays within them', async () => {
    const ctx = await app({ ...ADMINS, SSO_ADMIN_SCOPES: 'users:read, admin-keys:write' });
    const read = await request(ctx.app).get('/admin/users').set(person('platform'));
    expect([read.status, read.headers['x-keyward-admin-scopes']]).toEqual([200, 'admin-keys:write users:read']);
    const refused = expectError(await request(ctx.app).post('/admin/users').set(person('platform')).set(CSRF).send({ email: 'x@example.com' }), 403, 'INSUFFICIENT_SCOPE');
    expect(refused).toMatchObject({ message: 'SSO admins (SSO_ADMIN_SCOPES) lack the scope users:write.', details: { required: ['users:write'] } });
    const minted = await request(ctx.app).post('/admin/admin-keys').set(person('platform')).set(CSRF).send({ name: 'ada reads', scopes: ['users:read'] });
    expect(minted.status).toBe(201);
    expect(minted.body).toMatchObject({ created_by: 'sso:ada-subject', expires_at: null });
    expectError(await request(ctx.app).post('/admin/admin-keys').set(person('platform')).set(CSRF).send({ name: 'more', scopes: ['audit:read'] }), 403, 'INSUFFICIENT_SCOPE');
  });

  test('an admin key sent through the proxy is used as the key, not as the person', async () => {
    const ctx = await app({ ...ADMINS, SSO_ADMIN_SCOPES: 'users:read' });
    const created = await request(ctx.app).post('/admin/users').set(person('platform')).set(admin).send({ email: 'root@example.com' });
    expect(created.status).toBe(201);
    expect((await request(ctx.app).get('/admin/audit?action=user.created').set(admin)).body.data[0].actor.type).toBe('admin');
  });
});

describe('everyone else', () => {
  test('a signed-in person outside the admin groups gets 403 SSO_ACCESS_DENIED', async () => {
    const ctx = await app(ADMINS);
    expectError(await request(ctx.app).get('/admin/users').set(person('staff')), 403, 'SSO_ACCESS_DENIED');
    expectError(await request(ctx.app).get('/admin/users').set(person('')), 403, 'SSO_ACCESS_DENIED');
    // Group names are matched whole and exactly.
    expectError(await request(ctx.app).get('/admin/users').set(person('Platform,keyward-admins-old')), 403, 'SSO_ACCESS_DENIED');
  });

  test('the proxy without an identity for the request (no one signed in, no key): 401 AUTHENTICATION_REQUIRED naming both ways in', async () => {
    const ctx = await app(ADMINS);
    const refused = expectError(await request(ctx.app).get('/admin/users'), 401, 'AUTHENTICATION_REQUIRED');
    expect(refused.message).toBe('This API needs the admin key in the X-Admin-API-Key header, or a person signed in through the sign-in proxy.');
  });

  test('identity headers from anyone but the proxy are ignored: 401, as with no admin key', async () => {
    const ctx = await app({ SSO_TRUSTED_PROXIES: '10.0.0.5', SSO_ADMIN_GROUPS: 'platform' });
    const res = expectError(await request(ctx.app).get('/admin/users').set(person('platform')), 401, 'AUTHENTICATION_REQUIRED');
    expect(res.message).toBe('This API needs the admin key in the X-Admin-API-Key header.');
  });

  test('with SSO_SHARED_SECRET set, the proxy must send it', async () => {
    const secret = 'sso-shared-secret-0123456789abcdefghij';
    const ctx = await app({ ...ADMINS, SSO_SHARED_SECRET: secret });
    expectError(await request(ctx.app).get('/admin/users').set(person('platform')), 401, 'AUTHENTICATION_REQUIRED');
    expect((await request(ctx.app).get('/admin/users').set(person('platform')).set('X-Keyward-SSO-Secret', secret)).status).toBe(200);
  });

  test('without SSO_ADMIN_GROUPS nobody is an SSO admin, whatever their groups', async () => {
    const ctx = await app(PROXY);
    expectError(await request(ctx.app).get('/admin/users').set(person('platform')), 401, 'AUTHENTICATION_REQUIRED');
  });
});

describe('configuration', () => {
  test('SSO_ADMIN_GROUPS without SSO_TRUSTED_PROXIES, or unknown SSO_ADMIN_SCOPES, stop start-up', () => {
    expect(() => testConfig({ SSO_ADMIN_GROUPS: 'platform' })).toThrow(ConfigError);
    expect(() => testConfig({ SSO_ADMIN_GROUPS: 'platform' })).toThrow('SSO_ADMIN_GROUPS needs SSO_TRUSTED_PROXIES');
    expect(() => testConfig({ ...ADMINS, SSO_ADMIN_SCOPES: 'users:read, users:delete' })).toThrow('SSO_ADMIN_SCOPES names unknown admin scopes: users:delete');
    expect(() => testConfig({ ...ADMINS, SSO_ADMIN_SCOPES: ' , ' })).toThrow('SSO_ADMIN_SCOPES must name at least one admin scope, or be all');
    expect(testConfig(ADMINS).ssoAdminScopes).toHaveLength(11);
    expect(testConfig({ ...ADMINS, SSO_ADMIN_SCOPES: 'users:read users:read audit:read' }).ssoAdminScopes).toEqual(['audit:read', 'users:read']);
  });
});
