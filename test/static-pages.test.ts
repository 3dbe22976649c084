import { readFileSync, readdirSync } from 'node:fs';
import { join, relative } from 'node:path';
import request from 'supertest';
import { createTestApp, type TestContext } from './helpers/app';
import { REPO_ROOT } from './helpers/server-process';

/**
 * The browser pages, /sso/ and the admin console at /console/: their files are static and hold no
 * data; what matters is that they are served, nothing else is, and they run under keyward's CSP.
 */

let ctx: TestContext;
beforeAll(async () => {
  ctx = await createTestApp();
});
afterAll(() => ctx.close());

/** Every file under a folder, as paths relative to it. */
function filesUnder(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((entry) => entry.isFile())
    .map((entry) => relative(dir, join(entry.parentPath, entry.name)));
}

describe.each([
  ['/sso', 'sso'],
  ['/console', 'console'],
])('the %s/ page', (mount, folder) => {
  const pageDir = join(REPO_ROOT, 'public', folder);

  test(`is served at ${mount}/ as HTML with keyward's CSP and no-store, and ${mount} redirects there`, async () => {
    const res = await request(ctx.app).get(`${mount}/`);
    expect(res.status).toBe(200);
    expect(res.headers['content-type']).toMatch(/^text\/html/);
    expect(res.headers['cache-control']).toBe('no-store');
    const csp = res.headers['content-security-policy'] as string;
    expect(csp).toContain("script-src 'self'");
    expect(csp).not.toMatch(/script-src[^;]*'unsafe-inline'/);
    expect(res.headers['x-request-id']).toBeDefined();
    const bare = await request(ctx.app).get(mount);
    expect([bare.status, bare.headers.location]).toEqual([301, `${mount}/`]);
  });

  test(`serves every file of public/${folder}/, and nothing outside it`, async () => {
    const files = filesUnder(pageDir);
    expect(files.length).toBeGreaterThan(2);
    for (const file of files) {
      const res = await request(ctx.app).get(`${mount}/${file}`);
      expect({ file, status: res.status }).toEqual({ file, status: 200 });
    }
    expect((await request(ctx.app).get(`${mount}/..%2F..%2Fpackage.json`)).status).toBe(404);
    expect((await request(ctx.app).get(`${mount}/nope.js`)).status).toBe(404);
  });

  test('needs nothing the CSP forbids: no inline script, style or event handler, nothing from elsewhere', () => {
    const html = readFileSync(join(pageDir, 'index.html'), 'utf8');
    for (const tag of html.match(/<script\b[^>]*>/gi) ?? []) expect(tag).toMatch(/\bsrc="[^":]+"/);
    expect(html).not.toMatch(/<script\b[^>]*>\s*\S[\s\S]*?<\/script>/i);
    expect(html).not.toMatch(/<style\b/i);
    expect(html).not.toMatch(/\sstyle=/i);
    expect(html).not.toMatch(/\son[a-z]+=/i);
    expect(html).not.toMatch(/(?:src|href)="(?:https?:)?\/\//i);
    for (const file of filesUnder(pageDir).filter((f) => f.endsWith('.js'))) {
      const js = readFileSync(join(pageDir, file), 'utf8');
      // Data from the API is written as text, never parsed as HTML.
      expect({ file, html: /\.innerHTML\s*=|\.outerHTML\s*=|insertAdjacentHTML|document\.write/.test(js) }).toEqual({ file, html: false });
      expect({ file, eval: /\beval\(|new Function\(/.test(js) }).toEqual({ file, eval: false });
      // Nothing from another origin: every URL is relative to the page or the script (SVG's
      // namespace is a name, never fetched).
      expect({ file, remote: /["'`]https?:\/\/(?!www\.w3\.org\/2000\/svg["'`])/.test(js) }).toEqual({ file, remote: false });
    }
  });
});
