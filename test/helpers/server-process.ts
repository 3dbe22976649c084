import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

/**
 * Starts the real built server (`node <flags> dist/src/server.js`) as a child process, the way a
 * self-hoster runs it. Every wait is bounded and every child started here is killed by `stopAllServers()` (call it
 * in afterEach/afterAll) or, as a last resort, when the test process exits.
 */

export const REPO_ROOT = resolve(__dirname, '..', '..');
export const SERVER_JS = join(REPO_ROOT, 'dist', 'src', 'server.js');
/** The Node flags `npm start` and the image run the server with (package.json's config.node_flags). */
export const NODE_FLAGS: string[] = (
  JSON.parse(readFileSync(join(REPO_ROOT, 'package.json'), 'utf8')) as { config: { node_flags: string } }
).config.node_flags.split(' ').filter((f) => f !== '');

const START_TIMEOUT_MS = 15_000;
const STOP_TIMEOUT_MS = 10_000;

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface ServerProcess {
  port: number;
  baseUrl: string;
  child: ChildProcess;
  /** Everything the process has written so far, stdout and stderr interleaved as received. */
  readonly logs: string;
  readonly stdout: string;
  readonly stderr: string;
  /** Resolves when the process has exited. */
  readonly exited: Promise<ExitInfo>;
  /** Sends `signal` (default SIGTERM), waits for the exit (bounded; SIGKILL after the wait) and reports it. */
  stop(signal?: NodeJS.Signals): Promise<ExitInfo>;
}

export interface StartOptions {
  /**
   * The child's whole environment besides PATH (nothing else is inherited, so an ADMIN_API_TOKEN or
   * DATABASE_PATH in the developer's shell cannot leak in). Undefined values are left out.
   */
  env: Record<string, string | undefined>;
  /** Working directory (where `.env` is read from). Defaults to a fresh temp dir, never the repo. */
  cwd?: string;
  timeoutMs?: number;
}

const running = new Set<ChildProcess>();

process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

export function assertBuilt(): void {
  if (!existsSync(SERVER_JS)) {
    throw new Error(
      `${SERVER_JS} does not exist: run \`npm run build\` first (\`npm test\` builds before running jest).`,
    );
  }
}

const tempDirs: string[] = [];

/** A fresh directory under the OS temp dir; `removeTempDirs()` deletes every one made so far. */
export function makeTempDir(label = 'proc'): string {
  const dir = mkdtempSync(join(tmpdir(), `keyward-${label}-`));
  tempDirs.push(dir);
  return dir;
}

export function removeTempDirs(): void {
  for (const dir of tempDirs.splice(0)) rmSync(dir, { recursive: true, force: true });
}

function childEnv(env: Record<string, string | undefined>): NodeJS.ProcessEnv {
  const out: NodeJS.ProcessEnv = { PATH: process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin' };
  for (const [k, v] of Object.entries(env)) if (v !== undefined) out[k] = v;
  return out;
}

interface Spawned {
  child: ChildProcess;
  output: { logs: string; stdout: string; stderr: string };
  exited: Promise<ExitInfo>;
}

function spawnServer(options: StartOptions): Spawned {
  assertBuilt();
  const child = spawn(process.execPath, [...NODE_FLAGS, SERVER_JS], {
    cwd: options.cwd ?? makeTempDir(),
    env: childEnv(options.env),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  running.add(child);
  const output = { logs: '', stdout: '', stderr: '' };
  child.stdout?.setEncoding('utf8').on('data', (chunk: string) => {
    output.stdout += chunk;
    output.logs += chunk;
  });
  child.stderr?.setEncoding('utf8').on('data', (chunk: string) => {
    output.stderr += chunk;
    output.logs += chunk;
  });
  const exited = new Promise<ExitInfo>((resolveExit) => {
    // 'close' rather than 'exit': by then stdout/stderr have been read to the end.
    child.once('close', (code, signal) => {
      running.delete(child);
      resolveExit({ code, signal });
    });
    child.once('error', () => {
      running.delete(child);
      resolveExit({ code: null, signal: null });
    });
  });
  return { child, output, exited };
}

/** The JSON log lines in `text` (pino writes one object per line); other lines are skipped. */
export function jsonLines(text: string): Array<Record<string, unknown>> {
  const out: Array<Record<string, unknown>> = [];
  for (const line of text.split('\n')) {
    const trimmed = line.trim();
    if (!trimmed.startsWith('{')) continue;
    try {
      const value: unknown = JSON.parse(trimmed);
      if (value !== null && typeof value === 'object') out.push(value as Record<string, unknown>);
    } catch {
      // a partial line or not JSON: not a log entry
    }
  }
  return out;
}

function stopper(spawned: Spawned) {
  return async (signal: NodeJS.Signals = 'SIGTERM'): Promise<ExitInfo> => {
    const { child, exited } = spawned;
    if (child.exitCode === null && child.signalCode === null) child.kill(signal);
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<'timeout'>((r) => {
      timer = setTimeout(() => r('timeout'), STOP_TIMEOUT_MS);
    });
    const first = await Promise.race([exited, timedOut]);
    clearTimeout(timer);
    if (first !== 'timeout') return first;
    child.kill('SIGKILL');
    await exited;
    throw new Error(`server did not exit within ${STOP_TIMEOUT_MS} ms of ${signal}; killed it.\n${spawned.output.logs}`);
  };
}

/**
 * Starts the server and resolves once it has logged "keyward listening" (with its port). Rejects, and
 * kills the child, if it exits first or does not listen within the timeout (15 s by default).
 */
export async function startServer(options: StartOptions): Promise<ServerProcess> {
  const spawned = spawnServer(options);
  const { child, output, exited } = spawned;
  const timeoutMs = options.timeoutMs ?? START_TIMEOUT_MS;

  const port = await new Promise<number>((resolvePort, reject) => {
    let settled = false;
    const finish = (fn: () => void) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      child.stdout?.off('data', onData);
      fn();
    };
    const onData = () => {
      const listening = jsonLines(output.stdout).find((l) => l.msg === 'keyward listening');
      if (listening === undefined) return;
      const p = listening.port;
      if (typeof p === 'number' && p > 0) finish(() => resolvePort(p));
      else finish(() => reject(new Error(`"keyward listening" has no usable port: ${JSON.stringify(listening)}`)));
    };
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      finish(() => reject(new Error(`server did not log "keyward listening" within ${timeoutMs} ms.\n${output.logs}`)));
    }, timeoutMs);
    child.stdout?.on('data', onData);
    void exited.then((info) =>
      finish(() => reject(new Error(`server exited (${JSON.stringify(info)}) before listening.\n${output.logs}`))),
    );
  });

  return {
    port,
    baseUrl: `http://127.0.0.1:${port}`,
    child,
    get logs() {
      return output.logs;
    },
    get stdout() {
      return output.stdout;
    },
    get stderr() {
      return output.stderr;
    },
    exited,
    stop: stopper(spawned),
  };
}

export interface RunResult extends ExitInfo {
  stdout: string;
  stderr: string;
  logs: string;
  timedOut: boolean;
}

/**
 * Starts the server expecting it to exit on its own (for example refusing a bad configuration) and
 * reports how it ended. If it is still running after the timeout it is killed and `timedOut` is true.
 */
export async function runServerUntilExit(options: StartOptions): Promise<RunResult> {
  const spawned = spawnServer(options);
  const timeoutMs = options.timeoutMs ?? START_TIMEOUT_MS;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    spawned.child.kill('SIGKILL');
  }, timeoutMs);
  const info = await spawned.exited;
  clearTimeout(timer);
  return { ...info, ...spawned.output, timedOut };
}

/** Kills every server this helper started that is still running, and waits for them to go. */
export async function stopAllServers(): Promise<void> {
  const children = [...running];
  await Promise.all(
    children.map(
      (child) =>
        new Promise<void>((r) => {
          if (child.exitCode !== null || child.signalCode !== null) {
            running.delete(child);
            r();
            return;
          }
          child.once('close', () => r());
          child.kill('SIGKILL');
        }),
    ),
  );
}

export interface BashResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs `script` with bash (extra `flags` such as `-euo pipefail` go before it), with only PATH and
 * `env` in its environment. Bounded: killed after `timeoutMs` (default 20 s).
 */
export function runBash(
  script: string,
  options: { env?: Record<string, string>; cwd?: string; flags?: string[]; timeoutMs?: number } = {},
): Promise<BashResult> {
  return new Promise((resolveRun, reject) => {
    const child = spawn('bash', [...(options.flags ?? []), '-c', script], {
      cwd: options.cwd,
      env: childEnv(options.env ?? {}),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (c: string) => (stdout += c));
    child.stderr.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    const timeoutMs = options.timeoutMs ?? 20_000;
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`bash did not finish within ${timeoutMs} ms.\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.once('close', (code) => {
      clearTimeout(timer);
      resolveRun({ code, stdout, stderr });
    });
  });
}
