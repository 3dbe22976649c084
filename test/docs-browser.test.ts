import { existsSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { type Browser, chromium, type Page } from 'playwright-core';
import { ADMIN_KEY, createTestApp, createUser, mintToken, type TestContext } from './helpers/app';

const CHROMIUM = '/usr/bin/chromium';

// Swagger UI in a real headless Chromium (Debian's package; .ci/run installs it): the page must load
// under keyward's CSP, and "Authorize" must send each key only to its own API.
describe('Swagger UI at /docs in a real browser', () => {
  let ctx: TestContext;
  let server: Server;
  let base: string;
  let browser: Browser;
  let page: Page;
  const problems: string[] = [];

  beforeAll(async () => {
    if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: apt-get install -y chromium (.ci/run does this)`);
    ctx = await createTestApp();
    server = createServer(ctx.app);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync'],
    });
    page = await browser.newPage();
    page.on('console', (m) => {
      if (m.type() === 'error') problems.push(m.text());
    });
    page.on('pageerror', (e) => problems.push(e.message));
  }, 60_000);

  afterAll(async () => {
    await browser?.close();
    // A server that never started would never call back: only close one that exists.
    if (server) await new Promise((resolve) => server.close(resolve));
    await ctx?.close();
  });

  async function tryOut(operationDomId: string, urlPart: string) {
    const op = page.locator(`#${operationDomId}`);
    await op.locator('.opblock-summary').first().click();
    await op.locator('button.try-out__btn').click();
    const [req] = await Promise.all([page.waitForRequest((r) => r.url().includes(urlPart)), op.locator('button.execute').click()]);
    await op.locator('.live-responses-table tbody .response-col_status').first().waitFor();
    const status = (await op.locator('.live-responses-table tbody .response-col_status').first().innerText()).trim();
    return { headers: req.headers(), status };
  }

  test('renders under the CSP and sends the admin key only to /admin and the user key only to /v1', async () => {
    const user = await createUser(ctx, { email: 'docs@example.com' });
    const { token } = await mintToken(ctx, user.id);

    await page.goto(`${base}/docs/`);
    await page.locator('button.authorize').first().waitFor({ timeout: 20_000 });
    expect(await page.locator('.opblock').count()).toBeGreaterThanOrEqual(10);

    await page.locator('button.authorize').first().click();
    const modal = page.locator('.modal-ux');
    for (const [scheme, value] of [['AdminApiKey', ADMIN_KEY], ['UserApiKey', token]] as const) {
      const container = modal.locator('.auth-container', { hasText: scheme }).first();
      await container.locator('input').first().fill(value);
      await container.locator('button.authorize').click();
    }
    await modal.locator('button.btn-done').first().click();

    const me = await tryOut('operations-user-getMe', '/v1/me');
    expect(me.headers['x-api-key']).toBe(token);
    expect(me.headers['x-admin-api-key']).toBeUndefined();
    expect(me.status).toBe('200');

    const users = await tryOut('operations-admin-users-listUsers', '/admin/users');
    expect(users.headers['x-admin-api-key']).toBe(ADMIN_KEY);
    expect(users.headers['x-api-key']).toBeUndefined();
    expect(users.status).toBe('200');

    expect(problems).toEqual([]);
  }, 60_000);
});
