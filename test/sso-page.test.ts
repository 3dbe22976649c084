import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import request from 'supertest';
import { createTestApp, type TestContext } from './helpers/app';
import { REPO_ROOT } from './helpers/server-process';

/** The page's files are static and hold no data; what matters is that they run under keyward's CSP. */

let ctx: TestContext;
beforeAll(async () => {
  ctx = await createTestApp();
});
afterAll(() => ctx.close());

const PAGE_DIR = join(REPO_ROOT, 'public', 'sso');

describe('the /sso/ page', () => {
  test('is served at /sso/ as HTML with keyward\'s CSP and no-store, and /sso redirects there', async () => {
    const res = await request(ctx.app).get('/sso/');
    expect(res.status).toBe(200);
    expect(res.headers['content-type']).toMatch(/^text\/html/);
    expect(res.headers['cache-control']).toBe('no-store');
    const csp = res.headers['content-security-policy'] as string;
    expect(csp).toContain("script-src 'self'");
    expect(csp).not.toMatch(/script-src[^;]*'unsafe-inline'/);
    expect(res.headers['x-request-id']).toBeDefined();
    const bare = await request(ctx.app).get('/sso');
    expect([bare.status, bare.headers.location]).toEqual([301, '/sso/']);
  });

  test('serves every file of public/sso/, and nothing outside it', async () => {
    for (const file of readdirSync(PAGE_DIR)) {
      const res = await request(ctx.app).get(`/sso/${file}`);
      expect({ file, status: res.status }).toEqual({ file, status: 200 });
    }
    expect((await request(ctx.app).get('/sso/..%2F..%2Fpackage.json')).status).toBe(404);
    expect((await request(ctx.app).get('/sso/nope.js')).status).toBe(404);
  });

  test('needs nothing the CSP forbids: no inline script, style or event handler, nothing from elsewhere', () => {
    const html = readFileSync(join(PAGE_DIR, 'index.html'), 'utf8');
    for (const tag of html.match(/<script\b[^>]*>/gi) ?? []) expect(tag).toMatch(/\bsrc="[^":]+"/);
    expect(html).not.toMatch(/<script\b[^>]*>\s*\S[\s\S]*?<\/script>/i);
    expect(html).not.toMatch(/<style\b/i);
    expect(html).not.toMatch(/\sstyle=/i);
    expect(html).not.toMatch(/\son[a-z]+=/i);
    expect(html).not.toMatch(/(?:src|href)="(?:https?:)?\/\//i);
    const js = readFileSync(join(PAGE_DIR, 'app.js'), 'utf8');
    // Data from the API is written as text, never parsed as HTML.
    expect(js).not.toMatch(/\.innerHTML\s*=|\.outerHTML\s*=|insertAdjacentHTML|document\.write/);
    expect(js).not.toMatch(/\beval\(|new Function\(/);
  });
});
