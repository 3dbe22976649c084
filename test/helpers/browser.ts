import { existsSync } from 'node:fs';
import { type Browser, type BrowserContext, chromium } from 'playwright-core';

/** Debian's Chromium: the browser tests never let a tool download one of its own. */
export const CHROMIUM = '/usr/bin/chromium';

/** The browser globals the in-page callbacks use (this project compiles without the DOM lib). */
export type InPage = { document: any; window: any; navigator: any; __keywardCspViolation(text: string): void };

/** Headless Chromium with nothing that reaches the network on its own. */
export async function launchChromium(): Promise<Browser> {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: apt-get install -y chromium (.ci/run does this)`);
  return chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync'],
  });
}

/** Every CSP violation on any page of the context, reported by the browser itself, goes to `problems`. */
export async function reportCspViolations(context: BrowserContext, problems: string[]): Promise<void> {
  await context.exposeBinding('__keywardCspViolation', (_source, text: string) => problems.push(`CSP violation: ${text}`));
  await context.addInitScript(() => {
    const w = globalThis as unknown as InPage;
    w.document.addEventListener('securitypolicyviolation', (e: { violatedDirective: string; blockedURI: string }) => {
      w.__keywardCspViolation(`${e.violatedDirective} ${e.blockedURI}`);
    });
  });
}
