import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import { createServer as createNetServer } from 'node:net';
import { join } from 'node:path';
import { REPO_ROOT } from './server-process';

/** What the end-to-end gateway tests need besides keyward: the documented config and an upstream. */

const FORWARD_AUTH_DOC = readFileSync(join(REPO_ROOT, 'docs', 'forward-auth.md'), 'utf8');

/** The fenced `lang` block between `<!-- name:start -->` and `<!-- name:end -->` in docs/forward-auth.md. */
export function forwardAuthDocBlock(lang: string, name: string): string {
  const start = FORWARD_AUTH_DOC.indexOf(`<!-- ${name}:start -->`);
  const end = FORWARD_AUTH_DOC.indexOf(`<!-- ${name}:end -->`);
  const match = new RegExp('```' + lang + '\\n([\\s\\S]*?)\\n```').exec(FORWARD_AUTH_DOC.slice(start, end));
  if (start < 0 || end < start || !match) throw new Error(`docs/forward-auth.md has no ${lang} block between ${name} markers`);
  return match[1]!;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createNetServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

export interface Upstream {
  port: number;
  /** What reached the upstream, newest last. */
  reached: Array<{ method: string; url: string; headers: IncomingHttpHeaders }>;
  close(): Promise<void>;
}

/** The protected service: answers every request and remembers what reached it. */
export async function startUpstream(): Promise<Upstream> {
  const reached: Upstream['reached'] = [];
  const server: Server = createServer((req, res) => {
    reached.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers });
    res.setHeader('Content-Type', 'application/json');
    res.end(JSON.stringify({ upstream: true }));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as { port: number }).port,
    reached,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

/** Polls until something answers at `url` (any status). */
export async function waitForHttp(url: string, describeFailure: () => string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    try {
      await fetch(url);
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  throw new Error(`${url} never answered:\n${describeFailure()}`);
}

/** The admin API of a keyward server process, for setting up users and keys in gateway tests. */
export function adminClient(baseUrl: string, adminKey: string) {
  const call = async (method: string, path: string, body?: unknown): Promise<Record<string, any>> => {
    const res = await fetch(baseUrl + path, {
      method,
      headers: { 'X-Admin-API-Key': adminKey, 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${await res.text()}`);
    return res.status === 204 ? {} : ((await res.json()) as Record<string, any>);
  };
  return {
    call,
    /** A fresh user and one key with these scopes (and any other mint fields). */
    async userWithKey(mint: Record<string, unknown>) {
      const user = await call('POST', '/admin/users', { email: `gw${randomBytes(6).toString('hex')}@example.com` });
      return { user, key: await call('POST', `/admin/users/${user.id}/tokens`, mint) };
    },
  };
}

/** Stops a gateway process and waits until it has exited. */
export async function stopProcess(child: ChildProcess | undefined, signal: NodeJS.Signals): Promise<void> {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill(signal);
  await exited;
}
