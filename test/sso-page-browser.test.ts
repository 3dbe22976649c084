import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Browser, BrowserContext, Page } from 'playwright-core';
import { type InPage, launchChromium, reportCspViolations } from './helpers/browser';
import { freePort, keywardEnv, NGINX, startNginx, stopProcess, waitForHttp } from './helpers/gateway';
import { assertBuilt, makeTempDir, REPO_ROOT, removeTempDirs, startServer, stopAllServers, type ServerProcess } from './helpers/server-process';

/**
 * The self-service page at /sso/ in a real headless Chromium (Debian's), through a real nginx that
 * plays oauth2-proxy (it sets the identity headers on every request to keyward), in front of the real
 * built server. The page must work under keyward's CSP, show a new key once, and revoke it.
 */

type Field = { value: string };
const ADMIN_KEY = randomBytes(32).toString('hex');
const PERSON = { email: 'ada@example.com', user: 'oidc|ada-0001', username: 'ada', groups: 'staff,engineering' };

let keyward: ServerProcess;
let nginx: ChildProcess;
let nginxLog: () => string;
let proxyBase: string;
let hostOnlyBase: string;
let foreignBase: string;
let browser: Browser;
let context: BrowserContext;
let page: Page;
/**
 * The row of the key with exactly this name. Matching the row's text instead would also match a key
 * whose random masked selector happens to contain the name ("ci" in "kw_live_Cica…").
 */
const keyRow = (page: Page, name: string) => page.locator('#keys-body tr').filter({ has: page.locator('.c-name', { hasText: new RegExp(`^${name}$`) }) });

const problems: string[] = [];

/**
 * nginx playing oauth2-proxy: every request to keyward gets the identity headers (the test's own
 * requests through nginx too). `hostHeader` is how the Host header is passed on: `$http_host` is the
 * Host the browser sent, port and all (what oauth2-proxy's pass_host_header forwards); `$host` is
 * nginx's common idiom, which drops the port.
 */
function proxyServer(port: number, upstreamPort: number, hostHeader: '$http_host' | '$host'): string[] {
  return [
    '  server {',
    `    listen 127.0.0.1:${port};`,
    '    location / {',
    `      proxy_pass http://127.0.0.1:${upstreamPort};`,
    `      proxy_set_header Host ${hostHeader};`,
    `      proxy_set_header X-Forwarded-Email "${PERSON.email}";`,
    `      proxy_set_header X-Forwarded-User "${PERSON.user}";`,
    `      proxy_set_header X-Forwarded-Preferred-Username "${PERSON.username}";`,
    `      proxy_set_header X-Forwarded-Groups "${PERSON.groups}";`,
    '      proxy_set_header X-Forwarded-For $remote_addr;',
    '    }',
    '  }',
  ];
}

function nginxSites(ports: { proxy: number; hostOnly: number; foreign: number }, upstreamPort: number): string {
  return [
    ...proxyServer(ports.proxy, upstreamPort, '$http_host'),
    ...proxyServer(ports.hostOnly, upstreamPort, '$host'),
    // Another site, for the cross-site requests: a blank page on another origin.
    '  server {',
    `    listen 127.0.0.1:${ports.foreign};`,
    '    location / { default_type text/html; return 200 "<!doctype html><title>elsewhere</title><p>elsewhere</p>"; }',
    '  }',
  ].join('\n');
}

beforeAll(async () => {
  assertBuilt();
  if (!existsSync(NGINX)) throw new Error(`${NGINX} is missing: apt-get install -y nginx-light (.ci/run does this)`);
  const dir = makeTempDir('sso-page');
  keyward = await startServer({ env: keywardEnv(dir, ADMIN_KEY, { SSO_TRUSTED_PROXIES: '127.0.0.1', SSO_AUTO_PROVISION: 'on' }) });

  const port = await freePort();
  const hostOnlyPort = await freePort();
  const foreignPort = await freePort();
  const started = startNginx(dir, nginxSites({ proxy: port, hostOnly: hostOnlyPort, foreign: foreignPort }, keyward.port));
  nginx = started.child;
  nginxLog = started.log;
  proxyBase = `http://127.0.0.1:${port}`;
  hostOnlyBase = `http://127.0.0.1:${hostOnlyPort}`;
  foreignBase = `http://127.0.0.1:${foreignPort}`;
  await waitForHttp(proxyBase + '/healthz', nginxLog);
  await waitForHttp(foreignBase + '/', nginxLog);

  browser = await launchChromium();
  context = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: proxyBase });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: hostOnlyBase });
  await reportCspViolations(context, problems);
  page = await context.newPage();
  page.on('console', (m) => {
    if (m.type() === 'error' && /Content[ -]Security[ -]Policy/i.test(m.text())) problems.push(m.text());
  });
  page.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
}, 60_000);

afterAll(async () => {
  await browser?.close();
  await stopProcess(nginx, 'SIGQUIT');
  await stopAllServers();
  removeTempDirs();
});

/** A request to keyward through nginx, i.e. with the signed-in person's identity. */
async function asPerson(method: string, path: string, init: { headers?: Record<string, string>; body?: string } = {}) {
  const res = await fetch(proxyBase + path, { method, headers: init.headers, body: init.body });
  const text = await res.text();
  return { status: res.status, body: text ? (JSON.parse(text) as Record<string, any>) : null };
}

async function keyNames(): Promise<Array<{ id: number; name: string | null; status: string }>> {
  const list = await asPerson('GET', '/sso/tokens?limit=100');
  expect(list.status).toBe(200);
  return (list.body!.data as Array<{ id: number; name: string | null; status: string }>).map(({ id, name, status }) => ({ id, name, status }));
}

async function v1Me(token: string) {
  const res = await fetch(`${keyward.baseUrl}/v1/me`, { headers: { 'X-API-Key': token } });
  return { status: res.status, body: (await res.json()) as Record<string, any> };
}

/** Everything the page holds as text: its HTML, and the values of its inputs (not in the HTML). */
async function pageText(p: Page): Promise<string> {
  const values = await p.locator('input').evaluateAll((inputs) => inputs.map((i) => (i as unknown as Field).value).join('\n'));
  return `${await p.content()}\n${values}`;
}

describe('the /sso/ page in a real browser behind an oauth2-proxy-like nginx', () => {
  let secret: string;

  test('shows who is signed in, under keyward\'s CSP', async () => {
    const res = await page.goto(`${proxyBase}/sso/`);
    expect(res?.status()).toBe(200);
    const csp = (await res!.allHeaders())['content-security-policy'] ?? '';
    expect(csp).toContain("script-src 'self'");
    await page.locator('#who .who-email').waitFor();
    expect(await page.locator('#who').innerText()).toContain(PERSON.email);
    // The scopes offered are the ones the person may give (SSO_USER_SCOPES' default).
    const offered = await page.locator('#scope-choices input[type=checkbox]').evaluateAll((els) => els.map((e) => (e as unknown as Field).value));
    expect(offered).toEqual(['bots:read', 'bots:write']);
    await page.locator('#keys-empty').waitFor();
    expect(await page.locator('#alert').isHidden()).toBe(true);
  });

  test('creates a key "laptop" with bots:read and shows it once, with a working Copy button', async () => {
    await page.getByLabel('Name').fill('laptop');
    await page.getByRole('checkbox', { name: 'bots:read' }).check();
    await page.getByRole('checkbox', { name: 'bots:write' }).uncheck();
    await page.getByRole('radio', { name: 'In 90 days' }).check();
    const [req] = await Promise.all([
      page.waitForRequest((r) => r.url().endsWith('/sso/tokens') && r.method() === 'POST'),
      page.getByRole('button', { name: 'Create key' }).click(),
    ]);
    expect(req.headers()['x-keyward-csrf']).toBe('1');
    expect(req.headers()['content-type']).toBe('application/json');
    expect(JSON.parse(req.postData()!)).toEqual({ name: 'laptop', scopes: ['bots:read'], expires_in: 90 * 86400 });

    const panel = page.locator('#secret-panel');
    await panel.waitFor({ state: 'visible' });
    expect(await panel.innerText()).toMatch(/shown only once/i);
    secret = await page.locator('#secret-value').inputValue();
    expect(secret).toMatch(/^kw_live_/);
    expect(await page.locator('#secret-value').getAttribute('readonly')).not.toBeNull();

    await page.getByRole('button', { name: 'Copy', exact: true }).click();
    await page.getByText('Copied to the clipboard.').waitFor();
    expect(await page.evaluate(() => (globalThis as unknown as InPage).navigator.clipboard.readText() as Promise<string>)).toBe(secret);

    // The list already has it, masked.
    const row = keyRow(page, 'laptop');
    await row.waitFor();
    expect(await row.innerText()).toContain('bots:read');
  });

  test('the shown key works on /v1/me', async () => {
    const me = await v1Me(secret);
    expect(me.status).toBe(200);
    expect(me.body.token.name).toBe('laptop');
    expect(me.body.token.scopes).toEqual(['bots:read']);
    expect(me.body.user.email).toBe(PERSON.email);
  });

  test('after a reload the key is listed masked and the secret is nowhere in the page', async () => {
    // A second key, made through the proxy like the page would, so the list has more than one row.
    const ci = await asPerson('POST', '/sso/tokens', {
      headers: { 'X-Keyward-CSRF': '1', 'Content-Type': 'application/json' },
      body: JSON.stringify({ name: 'ci', scopes: ['bots:read', 'bots:write'] }),
    });
    expect(ci.status).toBe(201);

    await page.reload();
    const row = keyRow(page, 'laptop');
    await row.waitFor();
    await keyRow(page, 'ci').waitFor();
    expect(await page.locator('#secret-panel').isHidden()).toBe(true);
    const masked = (await row.locator('.c-masked').innerText()).trim();
    expect(masked).toMatch(/^kw_live_\w+_…\w{4}$/);
    expect(secret.endsWith(masked.slice(-4))).toBe(true);
    expect(await row.locator('.c-env').innerText()).toBe('live');
    expect(await row.locator('.badge').innerText()).toBe('active');
    expect(await row.locator('.c-expires').innerText()).not.toBe('Never');
    const text = await pageText(page);
    expect(text).not.toContain(secret);
    expect(text).not.toContain(ci.body!.token);
    expect(text).not.toContain(secret.slice(-20));

    // The README's picture is refreshed on request (UPDATE_SCREENSHOTS=1 npm run test:system), so an ordinary run
    // leaves the repository as it found it; the screenshot is taken either way.
    const shot = process.env.UPDATE_SCREENSHOTS === '1' ? join(REPO_ROOT, 'docs', 'sso-page.png') : join(tmpdir(), `keyward-sso-page-${process.pid}.png`);
    await page.screenshot({ path: shot, fullPage: true });
    expect(statSync(shot).size).toBeGreaterThan(10_000);
  });

  test('rotating a key asks first, then shows the new key once', async () => {
    const row = keyRow(page, 'ci');
    await row.getByRole('button', { name: 'Rotate ci' }).click();
    const dialog = page.locator('#confirm-dialog');
    await dialog.waitFor({ state: 'visible' });
    // Cancel does nothing.
    await dialog.getByRole('button', { name: 'Cancel' }).click();
    await dialog.waitFor({ state: 'hidden' });
    expect((await keyNames()).filter((k) => k.name === 'ci')).toHaveLength(1);

    await row.getByRole('button', { name: 'Rotate ci' }).click();
    await dialog.getByRole('button', { name: 'Rotate', exact: true }).click();
    await page.locator('#secret-panel').waitFor({ state: 'visible' });
    const rotated = await page.locator('#secret-value').inputValue();
    expect(rotated).toMatch(/^kw_live_/);
    expect((await v1Me(rotated)).status).toBe(200);
    expect((await keyNames()).filter((k) => k.name === 'ci')).toHaveLength(2);
    await page.getByRole('button', { name: /hide the key/ }).click();
    expect(await page.locator('#secret-value').inputValue()).toBe('');
  });

  test('revoking "laptop" through the page (after confirming) makes the key 401 API_KEY_REVOKED', async () => {
    const row = keyRow(page, 'laptop');
    const [req] = await Promise.all([
      page.waitForRequest((r) => r.method() === 'DELETE'),
      (async () => {
        await row.getByRole('button', { name: 'Revoke laptop' }).click();
        await page.locator('#confirm-dialog').getByRole('button', { name: 'Revoke', exact: true }).click();
      })(),
    ]);
    expect(req.headers()['x-keyward-csrf']).toBe('1');
    await keyRow(page, 'laptop').locator('.badge', { hasText: 'revoked' }).waitFor();
    expect(await page.locator('#status').innerText()).toMatch(/revoked/);
    expect(await page.locator('#alert').isHidden()).toBe(true);

    const me = await v1Me(secret);
    expect(me.status).toBe(401);
    expect(me.body.error.code).toBe('API_KEY_REVOKED');
  });

  test('reads well on a phone: no sideways scrolling', async () => {
    await page.setViewportSize({ width: 375, height: 740 });
    await page.reload();
    await page.locator('#keys-body tr').first().waitFor();
    expect(await page.evaluate(() => {
      const w = globalThis as unknown as InPage;
      return (w.document.documentElement.scrollWidth as number) <= (w.window.innerWidth as number);
    })).toBe(true);
    await page.setViewportSize({ width: 1000, height: 700 });
  });

  test('an API error shows in the alert region', async () => {
    // A name over the API's 100 characters (past the input's own maxlength): the server's envelope.
    await page.evaluate(() => (globalThis as unknown as InPage).document.getElementById('new-name').removeAttribute('maxlength'));
    await page.getByLabel('Name').fill('x'.repeat(101));
    await page.getByRole('button', { name: 'Create key' }).click();
    const alert = page.getByRole('alert');
    await alert.waitFor({ state: 'visible' });
    expect(await alert.innerText()).toMatch(/VALIDATION|name/i);
    expect(await page.locator('#secret-panel').isHidden()).toBe(true);
  });

  test('without the proxy the page says the person is not signed in', async () => {
    const direct = await context.newPage();
    direct.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
    await direct.goto(`${keyward.baseUrl}/sso/`);
    const alert = direct.getByRole('alert');
    await alert.waitFor({ state: 'visible' });
    expect(await alert.innerText()).toContain('You are not signed in through the sign-in proxy');
    expect(await direct.locator('#new-key-form').isVisible()).toBe(false);
    await direct.close();
  });

  test('changes without the CSRF header, or from another site, are refused', async () => {
    const before = (await keyNames()).length;
    // With the proxy's identity (nginx adds it) but no X-Keyward-CSRF.
    const plain = await asPerson('POST', '/sso/tokens', { headers: { 'Content-Type': 'application/json' }, body: '{"name":"sneaky"}' });
    expect(plain.status).toBe(403);
    expect(plain.body!.error.code).toBe('CSRF_CHECK_FAILED');
    const del = await asPerson('DELETE', `/sso/tokens/${(await keyNames())[0]!.id}`);
    expect([del.status, del.body!.error.code]).toEqual([403, 'CSRF_CHECK_FAILED']);
    // The header with a foreign Origin.
    const foreignOrigin = await asPerson('POST', '/sso/tokens', {
      headers: { 'X-Keyward-CSRF': '1', 'Content-Type': 'application/json', Origin: foreignBase },
      body: '{"name":"sneaky"}',
    });
    expect([foreignOrigin.status, foreignOrigin.body!.error.code]).toEqual([403, 'CSRF_CHECK_FAILED']);

    // A real page on another origin, in the browser: a simple (no-preflight) POST goes out and is
    // refused; with the header the browser's preflight is never approved, so nothing is sent.
    const foreign = await context.newPage();
    await foreign.goto(`${foreignBase}/`);
    const target = `${proxyBase}/sso/tokens`;
    const outcome = await foreign.evaluate(async (url) => {
      const simple = await fetch(url, { method: 'POST', mode: 'no-cors', credentials: 'include', headers: { 'Content-Type': 'text/plain' }, body: '{"name":"sneaky"}' })
        .then(() => 'sent')
        .catch((e: Error) => `failed: ${e.message}`);
      const withHeader = await fetch(url, { method: 'POST', credentials: 'include', headers: { 'X-Keyward-CSRF': '1', 'Content-Type': 'application/json' }, body: '{"name":"sneaky"}' })
        .then((r) => `answered ${r.status}`)
        .catch(() => 'blocked');
      return { simple, withHeader };
    }, target);
    expect(outcome.withHeader).toBe('blocked');
    await foreign.close();
    const after = await keyNames();
    expect(after).toHaveLength(before);
    expect(after.map((k) => k.name)).not.toContain('sneaky');
  });

  // Behind `proxy_set_header Host $host;` on a port other than 80/443 keyward sees `Host: 127.0.0.1`
  // while the browser sends `Origin: http://127.0.0.1:<port>` with every POST and DELETE: the page's
  // own changes were once refused as cross-site.
  test('behind nginx\'s `proxy_set_header Host $host` (port dropped) the page can still make a key', async () => {
    const other = await context.newPage();
    await other.goto(`${hostOnlyBase}/sso/`);
    await other.locator('#who .who-email').waitFor();
    await other.getByLabel('Name').fill('host-only');
    await other.getByRole('button', { name: 'Create key' }).click();
    await Promise.race([
      other.locator('#secret-panel').waitFor({ state: 'visible' }),
      other.getByRole('alert').waitFor({ state: 'visible' }).then(async () => {
        throw new Error(await other.getByRole('alert').innerText());
      }),
    ]).finally(() => other.close());
  });

  test('no CSP violation and no script error happened on any page', () => {
    expect(problems).toEqual([]);
  });
});
