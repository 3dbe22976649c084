import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import { createServer as createNetServer } from 'node:net';
import { join } from 'node:path';
import { REPO_ROOT } from './server-process';

/** What the end-to-end gateway tests need besides keyward: the documented config and an upstream. */

/** The fenced `lang` block between `<!-- name:start -->` and `<!-- name:end -->` in a doc of the repository. */
export function docBlock(doc: string, lang: string, name: string): string {
  const text = readFileSync(join(REPO_ROOT, doc), 'utf8');
  const start = text.indexOf(`<!-- ${name}:start -->`);
  const end = text.indexOf(`<!-- ${name}:end -->`);
  const match = new RegExp('```' + lang + '\\n([\\s\\S]*?)\\n```').exec(text.slice(start, end));
  if (start < 0 || end < start || !match) throw new Error(`${doc} has no ${lang} block between ${name} markers`);
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

export const NGINX = '/usr/sbin/nginx';

export interface Nginx {
  child: ChildProcess;
  /** Everything nginx printed so far (for failure messages). */
  log(): string;
}

/**
 * Real nginx in the foreground, everything (pid, logs, temp files) in `dir`, serving `httpBlock`
 * (server blocks and the like) inside its http context.
 */
export function startNginx(dir: string, httpBlock: string): Nginx {
  if (!existsSync(NGINX)) throw new Error(`${NGINX} is missing: apt-get install -y nginx-light (.ci/run does this)`);
  const temp = ['body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'];
  for (const sub of temp) mkdirSync(join(dir, sub), { recursive: true });
  const conf = join(dir, 'nginx.conf');
  writeFileSync(
    conf,
    [
      'daemon off;',
      'worker_processes 1;',
      `pid ${join(dir, 'nginx.pid')};`,
      `error_log ${join(dir, 'error.log')} warn;`,
      'events { worker_connections 64; }',
      'http {',
      '  access_log off;',
      ...temp.map((sub) => `  ${sub === 'body' ? 'client_body' : sub}_temp_path ${join(dir, sub)};`),
      httpBlock,
      '}',
    ].join('\n'),
  );
  let output = '';
  const child = spawn(NGINX, ['-p', dir, '-c', conf, '-e', join(dir, 'error.log')], { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout?.on('data', (d) => (output += d));
  child.stderr?.on('data', (d) => (output += d));
  return { child, log: () => output };
}

/** The environment of a keyward server process in gateway tests: a database in `dir`, cheap bcrypt. */
export function keywardEnv(dir: string, adminKey: string, extra: Record<string, string>): Record<string, string> {
  return { ADMIN_API_TOKEN: adminKey, DATABASE_PATH: join(dir, 'keyward.db'), BCRYPT_ROUNDS: '4', PORT: '0', HOST: '127.0.0.1', ...extra };
}
