import { execFile } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import type { Browser, BrowserContext, Page } from 'playwright-core';
import { type InPage, launchChromium, reportCspViolations } from './helpers/browser';
import { freePort, keywardEnv, NGINX, startNginx, stopProcess, waitForHttp } from './helpers/gateway';
import { assertBuilt, makeTempDir, REPO_ROOT, removeTempDirs, startServer, stopAllServers, type ServerProcess } from './helpers/server-process';

/**
 * The admin console at /console/ in a real headless Chromium (Debian's), through a real nginx that
 * plays oauth2-proxy: it sets the identity headers on every request to keyward and answers
 * /oauth2/userinfo, as oauth2-proxy does. Three people: an admin (in SSO_ADMIN_GROUPS, every scope),
 * a person outside the admin groups, and a reader on a second server whose SSO_ADMIN_SCOPES is
 * users:read only. The keys the console mints are used with curl, as their owner would.
 */

const run = promisify(execFile);
const ADMIN_KEY = randomBytes(32).toString('hex');
const ADMIN = { email: 'grace@example.com', user: 'oidc|grace-01', username: 'grace', groups: 'staff,keyward-admins' };
const OUTSIDER = { email: 'mallory@example.com', user: 'oidc|mallory-01', username: 'mallory', groups: 'staff' };
const READER = { email: 'rita@example.com', user: 'oidc|rita-01', username: 'rita', groups: 'keyward-admins' };
type Person = typeof ADMIN;

let full: ServerProcess;
let readOnly: ServerProcess;
let nginx: ChildProcess;
let nginxLog: () => string;
const base = { admin: '', outsider: '', reader: '' };
let browser: Browser;
let context: BrowserContext;
let page: Page;
const problems: string[] = [];
/** Pages of the context and every origin they asked for something. */
const origins = new Set<string>();

/** nginx playing oauth2-proxy for one person in front of one keyward. */
function proxyFor(port: number, upstreamPort: number, person: Person): string[] {
  const userinfo = JSON.stringify({ user: person.user, email: person.email, preferredUsername: person.username, groups: person.groups.split(',') });
  return [
    '  server {',
    `    listen 127.0.0.1:${port};`,
    // oauth2-proxy answers this path itself: who is signed in, as JSON.
    '    location = /oauth2/userinfo {',
    '      default_type application/json;',
    `      return 200 '${userinfo}';`,
    '    }',
    '    location / {',
    `      proxy_pass http://127.0.0.1:${upstreamPort};`,
    '      proxy_set_header Host $http_host;',
    `      proxy_set_header X-Forwarded-Email "${person.email}";`,
    `      proxy_set_header X-Forwarded-User "${person.user}";`,
    `      proxy_set_header X-Forwarded-Preferred-Username "${person.username}";`,
    `      proxy_set_header X-Forwarded-Groups "${person.groups}";`,
    '    }',
    '  }',
  ];
}

async function curl(...args: string[]): Promise<{ status: number; body: Record<string, any> }> {
  const { stdout } = await run('curl', ['-sS', '-w', '\n%{http_code}', ...args]);
  const lines = stdout.trimEnd().split('\n');
  const status = Number(lines.pop());
  return { status, body: JSON.parse(lines.join('\n')) as Record<string, any> };
}

async function watch(p: Page): Promise<Page> {
  p.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') problems.push(`console ${m.type()}: ${m.text()}`);
  });
  p.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
  p.on('request', (r) => origins.add(new URL(r.url()).origin));
  return p;
}

/**
 * The browser reports each refusal the API answered as a failed load (a console error). Where a test
 * provokes one, that one is expected: it is taken off the list, and anything else stays there.
 */
function expectOnlyRefusals(status: number): void {
  const refusal = problems.findIndex((m) => m.includes(`status of ${status}`));
  expect(refusal).toBeGreaterThanOrEqual(0);
  problems.splice(refusal, 1);
}

/** Waits until the console shows a route matching `pattern`: the view marks the route it shows once it is ready. */
async function shown(p: Page, pattern: RegExp): Promise<void> {
  await p.waitForFunction((source) => new RegExp(source).test(((globalThis as unknown as InPage).document.getElementById('view').dataset.route as string | undefined) ?? ''), pattern.source);
}

const escapeRegExp = (text: string) => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** Opens a route of the console (`users/12`, `audit?action=…`) and waits until it is shown. */
async function open(p: Page, origin: string, route: string): Promise<void> {
  await p.goto(`${origin}/console/#/${route}`);
  await shown(p, new RegExp(`^#/${escapeRegExp(route)}$`));
}

const noSidewaysScroll = (p: Page) =>
  p.evaluate(() => {
    const w = globalThis as unknown as InPage;
    return (w.document.documentElement.scrollWidth as number) <= (w.window.innerWidth as number);
  });

const shot = (name: string) => (process.env.UPDATE_SCREENSHOTS === '1' ? join(REPO_ROOT, 'docs', name) : join(tmpdir(), `keyward-${process.pid}-${name}`));

beforeAll(async () => {
  assertBuilt();
  if (!existsSync(NGINX)) throw new Error(`${NGINX} is missing: apt-get install -y nginx-light (.ci/run does this)`);
  const dir = makeTempDir('console');
  const sso = { SSO_TRUSTED_PROXIES: '127.0.0.1', SSO_ADMIN_GROUPS: 'keyward-admins' };
  full = await startServer({ env: keywardEnv(join(dir), ADMIN_KEY, sso) });
  const readerDir = makeTempDir('console-reader');
  readOnly = await startServer({ env: keywardEnv(readerDir, ADMIN_KEY, { ...sso, SSO_ADMIN_SCOPES: 'users:read' }) });

  const ports = { admin: await freePort(), outsider: await freePort(), reader: await freePort() };
  const started = startNginx(
    dir,
    [...proxyFor(ports.admin, full.port, ADMIN), ...proxyFor(ports.outsider, full.port, OUTSIDER), ...proxyFor(ports.reader, readOnly.port, READER)].join('\n'),
  );
  nginx = started.child;
  nginxLog = started.log;
  base.admin = `http://127.0.0.1:${ports.admin}`;
  base.outsider = `http://127.0.0.1:${ports.outsider}`;
  base.reader = `http://127.0.0.1:${ports.reader}`;
  for (const url of Object.values(base)) await waitForHttp(`${url}/healthz`, nginxLog);

  // A user the reader's server already has, so the reader has something to look at.
  const seeded = await fetch(`${readOnly.baseUrl}/admin/users`, {
    method: 'POST',
    headers: { 'X-Admin-API-Key': ADMIN_KEY, 'Content-Type': 'application/json' },
    body: JSON.stringify({ email: 'seeded@example.com', name: 'Seeded' }),
  });
  expect(seeded.status).toBe(201);

  browser = await launchChromium();
  context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: base.admin });
  await reportCspViolations(context, problems);
  page = await watch(await context.newPage());
}, 60_000);

afterAll(async () => {
  await browser?.close();
  await stopProcess(nginx, 'SIGQUIT');
  await stopAllServers();
  removeTempDirs();
});

const userRow = (p: Page, email: string) => p.locator('tr[data-user-id]').filter({ has: p.locator('.c-name', { hasText: new RegExp(`^${email.replace(/[.]/g, '\\.')}$`) }) });
const tokenRow = (p: Page, name: string) => p.locator('tr[data-token-id]').filter({ has: p.locator('.c-name', { hasText: new RegExp(`^${name}$`) }) });

/** Requests and bot-minutes of today in the usage table of the user page. */
async function todaysRequests(p: Page): Promise<number> {
  const today = new Date().toISOString().slice(0, 10);
  const text = await p.locator(`.usage-table tr[data-day="${today}"] .c-requests`).innerText();
  return Number(text.replace(/\D/g, ''));
}

describe('the admin console, as an admin signed in through the proxy', () => {
  let userId: number;
  let secret: string;
  let tokenId: number;

  test('opens on the users list, under keyward\'s CSP, naming the person', async () => {
    const res = await page.goto(`${base.admin}/console/`);
    expect(res?.status()).toBe(200);
    expect((await res!.allHeaders())['content-security-policy']).toContain("script-src 'self'");
    await page.locator('#users-title').waitFor();
    expect(await page.locator('#who').innerText()).toContain(ADMIN.email);
    expect(page.url()).toMatch(/#\/users$/);
    const nav = await page.locator('#nav a').allInnerTexts();
    expect(nav).toEqual(['Users', 'Tokens', 'Audit log', 'Admin keys']);
    expect(await page.locator('#nav a[aria-current="page"]').innerText()).toBe('Users');
    expect(await page.locator('.empty').innerText()).toMatch(/no users yet/);
  });

  test('creates a user, and lands on the user\'s page', async () => {
    const form = page.locator('#create-user-form');
    await form.getByLabel('Email').fill('ada@example.com');
    await form.getByLabel('Name').fill('Ada Lovelace');
    await form.getByLabel('External id').fill('acct-ada-1815');
    await form.getByLabel('Concurrent bots').fill('4');
    await form.getByLabel('Credits').fill('500');
    const [req] = await Promise.all([
      page.waitForRequest((r) => r.url().endsWith('/admin/users') && r.method() === 'POST'),
      form.getByRole('button', { name: 'Create user' }).click(),
    ]);
    // The person's identity rides on the proxy's headers: no admin key ever leaves the browser.
    expect(req.headers()['x-admin-api-key']).toBeUndefined();
    expect(req.headers()['x-keyward-csrf']).toBe('1');
    expect(JSON.parse(req.postData()!)).toEqual({ email: 'ada@example.com', name: 'Ada Lovelace', external_id: 'acct-ada-1815', max_concurrent_bots: 4, credits: 500 });
    await page.locator('#user-title').waitFor();
    expect(await page.locator('#user-title').innerText()).toBe('Ada Lovelace (ada@example.com)');
    userId = Number(/#\/users\/(\d+)$/.exec(page.url())![1]);
    expect(await page.locator('.facts').innerText()).toMatch(/0 of 4/);
    expect(await page.locator('#tokens-empty').innerText()).toMatch(/no tokens/);
    // The audit log names the person who did it.
    const audit = await curl('-H', `X-Admin-API-Key: ${ADMIN_KEY}`, `${full.baseUrl}/admin/audit?action=user.created`);
    expect(audit.body.data[0].actor).toMatchObject({ type: 'sso', email: ADMIN.email });
  });

  test('mints a token and shows it once, with a Copy button, then the token works with curl', async () => {
    const form = page.locator('#mint-token-form');
    await form.getByLabel('Token name').fill('ci-runner');
    await form.getByRole('checkbox', { name: 'bots:write' }).uncheck();
    await form.getByLabel('Environment').selectOption('test');
    await form.getByRole('button', { name: 'Mint token' }).click();
    const panel = page.locator('#secret-panel');
    await panel.waitFor({ state: 'visible' });
    expect(await panel.innerText()).toMatch(/You will not see it again/);
    secret = await page.locator('#secret-value').inputValue();
    expect(secret).toMatch(/^kw_test_/);
    await page.getByRole('button', { name: 'Copy', exact: true }).click();
    await page.getByText('Copied to the clipboard.').waitFor();
    expect(await page.evaluate(() => (globalThis as unknown as InPage).navigator.clipboard.readText() as Promise<string>)).toBe(secret);

    const row = tokenRow(page, 'ci-runner');
    await row.waitFor();
    tokenId = Number(await row.getAttribute('data-token-id'));
    expect(await row.locator('.c-scopes').innerText()).toBe('bots:read');
    expect(await row.locator('.c-env').innerText()).toBe('test');
    expect(await row.locator('.c-used').innerText()).toBe('Never');

    for (let i = 0; i < 3; i++) {
      const me = await curl('-H', `X-API-Key: ${secret}`, `${full.baseUrl}/v1/me`);
      expect([me.status, me.body.user.email, me.body.token.name]).toEqual([200, 'ada@example.com', 'ci-runner']);
    }
  });

  test('after a reload the secret is gone, the usage chart counts the calls and the token shows its last use', async () => {
    await page.reload();
    await page.locator('#usage-title').waitFor();
    expect(await page.locator('#secret-panel').isHidden()).toBe(true);
    const values = await page.locator('input, textarea').evaluateAll((els) => els.map((e) => (e as unknown as { value: string }).value).join('\n'));
    expect(`${await page.content()}${values}`).not.toContain(secret);
    expect(await todaysRequests(page)).toBe(3);
    // Drawn: today's bar in the requests chart is the tallest, and says its number on hover.
    const today = new Date().toISOString().slice(0, 10);
    const day = page.locator(`.chart-requests .day[data-day="${today}"]`);
    expect(await day.getAttribute('data-value')).toBe('3');
    expect(Number(await day.locator('.bar').getAttribute('height'))).toBeGreaterThan(50);
    expect(await page.locator('.chart-requests .day').count()).toBe(30);
    await day.hover();
    expect(await page.locator('.chart-readout').innerText()).toBe(`${today}: 3 requests`);

    const more = await curl('-H', `Authorization: Bearer ${secret}`, `${full.baseUrl}/v1/me`);
    expect(more.status).toBe(200);
    await page.reload();
    await page.locator('#usage-title').waitFor();
    expect(await todaysRequests(page)).toBe(4);
    const used = tokenRow(page, 'ci-runner').locator('.c-used');
    expect(await used.locator('time').count()).toBe(1);
    expect(await used.innerText()).toContain('from 127.0.0.1');
    await page.screenshot({ path: shot('console-user.png'), fullPage: true });
  });

  test('revoking the token (after confirming) makes the next curl 401 API_KEY_REVOKED', async () => {
    const row = tokenRow(page, 'ci-runner');
    await row.getByRole('button', { name: 'Revoke ci-runner' }).click();
    const dialog = page.locator('#confirm-dialog');
    await dialog.waitFor({ state: 'visible' });
    expect(await dialog.innerText()).toContain('ci-runner');
    await dialog.getByRole('button', { name: 'Revoke', exact: true }).click();
    await tokenRow(page, 'ci-runner').locator('.badge', { hasText: 'revoked' }).waitFor();
    expect(await page.locator('#status').innerText()).toMatch(/revoked/);
    const me = await curl('-H', `X-API-Key: ${secret}`, `${full.baseUrl}/v1/me`);
    expect([me.status, me.body.error.code]).toEqual([401, 'API_KEY_REVOKED']);
  });

  test('the audit log, filtered to tokens and that token, shows the revocation by the person', async () => {
    await page.locator('#nav').getByRole('link', { name: 'Audit log' }).click();
    const form = page.locator('#audit-filters');
    await form.waitFor();
    await form.getByLabel('Action').selectOption('token.*');
    await form.getByLabel('Target').fill(`token:${tokenId}`);
    await form.getByRole('button', { name: 'Filter' }).click();
    await shown(page, /action=token/);
    const rows = page.locator('tr[data-audit-id]');
    await rows.first().waitFor();
    expect(await rows.locator('.c-action').allInnerTexts()).toEqual(['token.revoked', 'token.minted']);
    expect(await rows.first().locator('.c-actor').innerText()).toContain(ADMIN.email);
    // Narrowed to the one action by its exact name in the URL (a link anyone can share).
    await open(page, base.admin, `audit?action=token.revoked&target=token:${tokenId}`);
    await page.locator('tr[data-audit-id]').first().waitFor();
    expect(await page.locator('tr[data-audit-id] .c-action').allInnerTexts()).toEqual(['token.revoked']);
  });

  test('the users list finds the user by email, with their limits, and opens their page from the keyboard', async () => {
    await open(page, base.admin, `users`);
    await page.locator('#users-title').waitFor();
    await page.getByLabel('Search by email').fill('ada@');
    await page.getByRole('button', { name: 'Search' }).click();
    await shown(page, /email=ada/);
    const row = userRow(page, 'ada@example.com');
    await row.waitFor();
    expect(await row.locator('.c-bots').innerText()).toBe('0 of 4');
    expect(await row.locator('.c-credits').innerText()).toBe('500');
    expect(await row.locator('.c-external-id').innerText()).toBe('acct-ada-1815');
    await page.screenshot({ path: shot('console-users.png'), fullPage: true });
    expect(statSync(shot('console-users.png')).size).toBeGreaterThan(10_000);
    // Keyboard only: Tab onto the link and press Enter; a visible focus ring on the way.
    await page.getByRole('link', { name: 'Show all' }).focus();
    await page.keyboard.press('Tab');
    expect(await row.locator('a').evaluate((a) => (globalThis as unknown as InPage).document.activeElement === a)).toBe(true);
    expect(await row.locator('a').evaluate((a) => (globalThis as unknown as InPage).window.getComputedStyle(a).outlineStyle)).not.toBe('none');
    await page.keyboard.press('Enter');
    await page.locator('#user-title').waitFor();
    expect(page.url()).toMatch(new RegExp(`#/users/${userId}$`));
  });

  test('edits the user\'s limits and disables them, which refuses their keys until enabled again', async () => {
    const minted = await curl('-X', 'POST', '-H', `X-Admin-API-Key: ${ADMIN_KEY}`, `${full.baseUrl}/admin/users/${userId}/tokens`);
    const me = () => curl('-H', `X-API-Key: ${minted.body.token}`, `${full.baseUrl}/v1/me`);
    const form = page.locator('#edit-user-form');
    await form.getByLabel('Rate limit per minute').fill('30');
    await form.getByRole('button', { name: 'Save changes' }).click();
    await page.locator('#status', { hasText: 'Saved' }).waitFor();
    await page.locator('.facts', { hasText: '30 requests a minute' }).waitFor();

    await page.getByRole('button', { name: 'Disable user' }).click();
    await page.locator('#confirm-dialog').getByRole('button', { name: 'Disable', exact: true }).click();
    await page.getByRole('button', { name: 'Enable user' }).waitFor();
    const api = await curl('-H', `X-Admin-API-Key: ${ADMIN_KEY}`, `${full.baseUrl}/admin/users/${userId}`);
    expect([api.body.rate_limit_per_minute, api.body.disabled]).toEqual([30, true]);
    expect((await me()).body.error.code).toBe('USER_DISABLED');
    await page.getByRole('button', { name: 'Enable user' }).click();
    await page.getByRole('button', { name: 'Disable user' }).waitFor();
    expect((await me()).status).toBe(200);
  });

  test('shows the user\'s running bot, and force-releases it (after confirming), freeing the slot', async () => {
    const key = await curl('-X', 'POST', '-H', `X-Admin-API-Key: ${ADMIN_KEY}`, '-H', 'Content-Type: application/json', '-d', '{"name":"runner","scopes":["bots:read","bots:write"]}', `${full.baseUrl}/admin/users/${userId}/tokens`);
    const bot = await curl('-X', 'POST', '-H', `X-API-Key: ${key.body.token}`, '-H', 'Content-Type: application/json', '-d', '{"platform":"google_meet","label":"standup"}', `${full.baseUrl}/v1/bots`);
    expect(bot.status).toBe(201);
    await page.reload();
    await page.locator('#bots-title', { hasText: 'Bots running (1 of 4)' }).waitFor();
    const row = page.locator(`tr[data-bot-id="${bot.body.id}"]`);
    expect(await row.innerText()).toContain('standup');
    await row.getByRole('button', { name: `Force-release bot ${bot.body.id}` }).click();
    await page.locator('#confirm-dialog').getByRole('button', { name: 'Force-release', exact: true }).click();
    await page.locator('#bots-title', { hasText: 'Bots running (0 of 4)' }).waitFor();
    const after = await curl('-H', `X-API-Key: ${key.body.token}`, `${full.baseUrl}/v1/bots/${bot.body.id}`);
    expect([after.body.status, after.body.ended_by]).toEqual(['released', 'admin']);
  });

  test('the tokens page offers "never used" and "expiring within 7 days"', async () => {
    const admin = (method: string, path: string, body?: unknown) =>
      curl('-X', method, '-H', `X-Admin-API-Key: ${ADMIN_KEY}`, '-H', 'Content-Type: application/json', ...(body ? ['-d', JSON.stringify(body)] : []), `${full.baseUrl}${path}`);
    await admin('POST', `/admin/users/${userId}/tokens`, { name: 'short-lived', expires_in: 3 * 86400 });
    const used = await admin('POST', `/admin/users/${userId}/tokens`, { name: 'long-lived' });
    expect((await curl('-H', `X-API-Key: ${used.body.token}`, `${full.baseUrl}/v1/me`)).status).toBe(200);

    await page.locator('#nav').getByRole('link', { name: 'Tokens' }).click();
    await page.locator('#all-tokens-title').waitFor();
    await page.getByRole('link', { name: 'Never used' }).click();
    await shown(page, /filter=unused/);
    await page.locator('#all-tokens-title', { hasText: 'never used' }).waitFor();
    expect(await page.locator('tr[data-token-id] .c-name').allInnerTexts()).toEqual(['short-lived']);
    await page.getByRole('link', { name: 'Expiring within 7 days' }).click();
    await page.locator('#all-tokens-title', { hasText: 'expiring' }).waitFor();
    expect(await page.locator('tr[data-token-id] .c-name').allInnerTexts()).toEqual(['short-lived']);
    // Status and environment: the revoked test key.
    await page.getByRole('link', { name: 'All tokens' }).click();
    await shown(page, /^#\/tokens$/);
    await page.locator('#token-filters').getByLabel('Status').selectOption('revoked');
    await page.locator('#token-filters').getByRole('button', { name: 'Filter' }).click();
    await shown(page, /status=revoked/);
    await page.locator('tr[data-token-id]').first().waitFor();
    expect(await page.locator('tr[data-token-id] .c-name').allInnerTexts()).toEqual(['ci-runner']);
  });

  test('rotates a token with a grace period: both work, each links to the other; a change of allowlist takes effect', async () => {
    const minted = await curl('-X', 'POST', '-H', `X-Admin-API-Key: ${ADMIN_KEY}`, '-H', 'Content-Type: application/json', '-d', '{"name":"rotating"}', `${full.baseUrl}/admin/users/${userId}/tokens`);
    await open(page, base.admin, `users/${userId}`);
    await tokenRow(page, 'rotating').getByRole('button', { name: 'Rotate rotating' }).click();
    const dialog = page.locator('#confirm-dialog');
    await dialog.getByLabel('Grace period for the old token').selectOption('3600');
    const [req] = await Promise.all([
      page.waitForRequest((r) => r.url().endsWith('/rotate')),
      dialog.getByRole('button', { name: 'Rotate', exact: true }).click(),
    ]);
    expect(JSON.parse(req.postData()!)).toEqual({ grace_period_seconds: 3600 });
    await page.locator('#secret-panel').waitFor({ state: 'visible' });
    const rotated = await page.locator('#secret-value').inputValue();
    for (const key of [minted.body.token as string, rotated]) expect((await curl('-H', `X-API-Key: ${key}`, `${full.baseUrl}/v1/me`)).status).toBe(200);

    const rows = tokenRow(page, 'rotating');
    expect(await rows.count()).toBe(2);
    const oldRow = page.locator(`tr[data-token-id="${minted.body.id}"]`);
    const link = oldRow.locator('.rotation-link');
    expect(await link.innerText()).toMatch(/^replaced by #\d+$/);
    const newId = Number(/#(\d+)$/.exec(await link.innerText())![1]);
    await link.click();
    await shown(page, new RegExp(`focus=token-${newId}$`));
    const newRow = page.locator(`tr[data-token-id="${newId}"]`);
    await newRow.locator('.rotation-link', { hasText: `replaces #${minted.body.id}` }).waitFor();
    expect(await newRow.evaluate((row) => (globalThis as unknown as InPage).document.activeElement === row)).toBe(true);

    await newRow.getByRole('button', { name: 'Change rotating' }).click();
    await dialog.getByLabel('Allowed addresses').fill('10.0.0.0/8');
    await dialog.getByRole('button', { name: 'Save', exact: true }).click();
    await newRow.locator('.c-scopes', { hasText: 'from 10.0.0.0/8' }).waitFor();
    const refused = await curl('-H', `X-API-Key: ${rotated}`, `${full.baseUrl}/v1/me`);
    expect([refused.status, refused.body.error.code]).toEqual([403, 'FORBIDDEN_IP']);
  });

  test('mints an admin key for a script, shown once, and it works with curl within its scopes', async () => {
    await page.locator('#nav').getByRole('link', { name: 'Admin keys' }).click();
    const form = page.locator('#mint-admin-key-form');
    await form.waitFor();
    await form.getByLabel('Key name').fill('billing-sync');
    await form.getByRole('checkbox', { name: 'users:read' }).check();
    await form.getByRole('button', { name: 'Mint admin key' }).click();
    await page.locator('#secret-panel').waitFor({ state: 'visible' });
    const key = await page.locator('#secret-value').inputValue();
    expect(key).toMatch(/^kw_admin_/);
    expect((await curl('-H', `X-Admin-API-Key: ${key}`, `${full.baseUrl}/admin/users`)).status).toBe(200);
    const refused = await curl('-X', 'DELETE', '-H', `X-Admin-API-Key: ${key}`, `${full.baseUrl}/admin/users/${userId}`);
    expect([refused.status, refused.body.error.code]).toEqual([403, 'INSUFFICIENT_SCOPE']);
    await page.getByRole('button', { name: 'Revoke billing-sync' }).click();
    await page.locator('#confirm-dialog').getByRole('button', { name: 'Revoke', exact: true }).click();
    await page.locator('tr[data-admin-key-id] .badge', { hasText: 'revoked' }).waitFor();
    expect((await curl('-H', `X-Admin-API-Key: ${key}`, `${full.baseUrl}/admin/users`)).body.error.code).toBe('ADMIN_KEY_REVOKED');
  });

  test('deleting the user asks first, naming them', async () => {
    await open(page, base.admin, `users/${userId}`);
    await page.getByRole('button', { name: 'Delete user' }).click();
    const dialog = page.locator('#confirm-dialog');
    expect(await dialog.locator('#confirm-title').innerText()).toBe('Delete ada@example.com?');
    await dialog.getByRole('button', { name: 'Cancel' }).click();
    expect((await curl('-H', `X-Admin-API-Key: ${ADMIN_KEY}`, `${full.baseUrl}/admin/users/${userId}`)).status).toBe(200);
    await page.getByRole('button', { name: 'Delete user' }).click();
    await dialog.getByRole('button', { name: 'Delete ada@example.com' }).click();
    await page.locator('#users-title').waitFor();
    expect((await curl('-H', `X-Admin-API-Key: ${ADMIN_KEY}`, `${full.baseUrl}/admin/users/${userId}`)).status).toBe(404);
  });

  test('an API refusal shows as a message in the page', async () => {
    await open(page, base.admin, `users`);
    const form = page.locator('#create-user-form');
    await form.getByLabel('Email').fill('not-an-email');
    await form.getByRole('button', { name: 'Create user' }).click();
    const alert = page.getByRole('alert');
    await alert.waitFor({ state: 'visible' });
    expect(await alert.innerText()).toMatch(/VALIDATION_ERROR[\s\S]*email: must match format "email"/);
    expect(await page.locator('#users-title').isVisible()).toBe(true);
    expectOnlyRefusals(400);
  });

  test('pages through the users list and the audit log; the audit log narrows by who and by time', async () => {
    for (let i = 0; i < 51; i++) {
      const res = await fetch(`${full.baseUrl}/admin/users`, {
        method: 'POST',
        headers: { 'X-Admin-API-Key': ADMIN_KEY, 'Content-Type': 'application/json' },
        body: JSON.stringify({ email: `bulk${String(i).padStart(2, '0')}@example.com` }),
      });
      expect(res.status).toBe(201);
    }
    await open(page, base.admin, `users?email=bulk`);
    await page.locator('tr[data-user-id]').first().waitFor();
    const emails = async () => page.locator('tr[data-user-id] .c-name').allInnerTexts();
    expect((await emails()).slice(0, 2)).toEqual(['bulk00@example.com', 'bulk01@example.com']);
    expect(await emails()).toHaveLength(25);
    await page.getByRole('button', { name: 'Next page' }).click();
    await page.locator('.c-name', { hasText: 'bulk25@example.com' }).waitFor();
    await page.getByRole('button', { name: 'Next page' }).click();
    await page.locator('.c-name', { hasText: 'bulk50@example.com' }).waitFor();
    expect(await emails()).toEqual(['bulk50@example.com']);
    expect(await page.getByRole('button', { name: 'Next page' }).count()).toBe(0);
    await page.getByRole('button', { name: 'Previous page' }).click();
    await page.locator('.c-name', { hasText: 'bulk25@example.com' }).waitFor();

    await open(page, base.admin, `audit`);
    await page.locator('tr[data-audit-id]').first().waitFor();
    const first = await page.locator('tr[data-audit-id]').count();
    expect(first).toBe(50);
    const newest = Number(await page.locator('tr[data-audit-id]').first().getAttribute('data-audit-id'));
    await page.getByRole('link', { name: 'Older entries' }).click();
    await shown(page, /cursor=/);
    await page.locator(`tr[data-audit-id="${newest - 50}"]`).waitFor();
    // Who: the signed-in admin's own changes only (the bulk users were the root key's).
    const form = page.locator('#audit-filters');
    await form.getByLabel('Who').fill('sso');
    await form.getByRole('button', { name: 'Filter' }).click();
    await shown(page, /actor=sso/);
    await page.locator('tr[data-audit-id]').first().waitFor();
    expect(new Set(await page.locator('tr[data-audit-id] .c-actor').allInnerTexts())).toEqual(new Set([`${ADMIN.email} (signed in)`]));
    // From a time in the future: nothing yet.
    await form.getByLabel('From').fill('2099-01-01T00:00');
    await form.getByRole('button', { name: 'Filter' }).click();
    await page.locator('#audit-empty').waitFor();
    expect(page.url()).toContain(`since=${encodeURIComponent(new Date('2099-01-01T00:00').toISOString())}`);
  });

  test('works at 390 px wide: no sideways scrolling on the lists or a user\'s page', async () => {
    const phone = await watch(await context.newPage());
    await phone.setViewportSize({ width: 390, height: 800 });
    const created = await curl('-X', 'POST', '-H', `X-Admin-API-Key: ${ADMIN_KEY}`, '-H', 'Content-Type: application/json', '-d', '{"email":"phone@example.com"}', `${full.baseUrl}/admin/users`);
    for (const view of ['users', `users/${created.body.id}`, 'tokens', 'audit', 'admin-keys']) {
      await open(phone, base.admin, `${view}`);
      await phone.locator('#view h2').first().waitFor();
      expect([view, await noSidewaysScroll(phone)]).toEqual([view, true]);
    }
    await phone.close();
  });
});

describe('the admin console for people without every scope', () => {
  test('a person outside the admin groups sees a page that says so, and no data', async () => {
    const p = await watch(await context.newPage());
    await p.goto(`${base.outsider}/console/`);
    const denied = p.locator('#denied');
    await denied.waitFor();
    expect(await denied.innerText()).toMatch(/not in a group that may administer keyward/);
    expect(await p.locator('#nav').isHidden()).toBe(true);
    expect(await p.locator('table').count()).toBe(0);
    expect(await p.locator('form').count()).toBe(1); // only the confirmation dialog's
    expectOnlyRefusals(403);
    await p.close();
  });

  test('a person with users:read only sees users and no control to change anything', async () => {
    const p = await watch(await context.newPage());
    await p.goto(`${base.reader}/console/`);
    await p.locator('#users-title').waitFor();
    expect(await p.locator('#nav a').allInnerTexts()).toEqual(['Users']);
    expect(await p.locator('#create-user-form').count()).toBe(0);
    expect(await p.locator('.lacks').innerText()).toContain('users:write');
    await userRow(p, 'seeded@example.com').locator('a').click();
    await p.locator('#user-title').waitFor();
    expect(await p.locator('#edit-user-form').count()).toBe(0);
    expect(await p.getByRole('button', { name: /Delete|Disable|Mint|Revoke|Rotate/ }).count()).toBe(0);
    expect(await p.locator('.lacks').allInnerTexts()).toEqual([
      'You cannot change or delete this user: your sign-in does not hold users:write.',
      'You cannot see this user\u2019s tokens: your sign-in does not hold tokens:read.',
    ]);
    // Typed into the address bar anyway: the view says what is missing instead of breaking.
    await open(p, base.reader, `audit`);
    await p.locator('.lacks', { hasText: 'audit:read' }).waitFor();
    await p.close();
  });
});

describe('the console as a whole', () => {
  test('asked nothing of any other origin, and had no CSP violation or script error', () => {
    expect([...origins].sort()).toEqual([base.admin, base.outsider, base.reader].sort());
    expect(problems).toEqual([]);
  });
});
