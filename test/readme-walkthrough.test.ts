import { randomBytes } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  REPO_ROOT,
  assertBuilt,
  makeTempDir,
  removeTempDirs,
  runBash,
  startServer,
  stopAllServers,
} from './helpers/server-process';

/**
 * The README's walkthrough is a promise to a new user: it is run here, as written, against the real
 * built server. Only the host is changed (localhost:8056 → 127.0.0.1:<free port>).
 */

const README = readFileSync(join(REPO_ROOT, 'README.md'), 'utf8');
const FULL_TOKEN = /kw_live_[A-Za-z0-9]{12}_[A-Za-z0-9]{38}/;

/** The bash block between `<!-- NAME:start … -->` and `<!-- NAME:end -->`. */
function markedBlock(name: string): string {
  const start = README.indexOf(`<!-- ${name}:start`);
  const end = README.indexOf(`<!-- ${name}:end -->`);
  if (start < 0 || end < start) throw new Error(`README.md has no <!-- ${name}:start … ${name}:end --> markers`);
  const section = README.slice(start, end);
  const match = /```bash\n([\s\S]*?)\n```/.exec(section);
  if (!match) throw new Error(`no \`\`\`bash block between the ${name} markers in README.md`);
  return match[1]!;
}

// Printed between the blocks, so each block's output is checked on its own.
const BETWEEN = '--- end of walkthrough ---';
const BEFORE_BOTS = '--- end of token lifecycle ---';

/**
 * Splits what the walkthrough prints (curl writes JSON bodies without a trailing newline, so they run
 * together) into top-level JSON values and other non-blank text, in order.
 */
function splitOutput(text: string): Array<{ raw: string; json?: any }> {
  const parts: Array<{ raw: string; json?: any }> = [];
  let i = 0;
  while (i < text.length) {
    const ch = text[i]!;
    if (/\s/.test(ch)) {
      i++;
    } else if (ch === '{' || ch === '[') {
      let depth = 0;
      let inString = false;
      let j = i;
      for (; j < text.length; j++) {
        const c = text[j]!;
        if (inString) {
          if (c === '\\') j++;
          else if (c === '"') inString = false;
        } else if (c === '"') inString = true;
        else if (c === '{' || c === '[') depth++;
        else if (c === '}' || c === ']') {
          depth--;
          if (depth === 0) break;
        }
      }
      const raw = text.slice(i, j + 1);
      parts.push({ raw, json: JSON.parse(raw) });
      i = j + 1;
    } else {
      const nl = text.indexOf('\n', i);
      const stop = nl < 0 ? text.length : nl;
      // plain text up to the end of the line or the next JSON value
      const brace = text.slice(i, stop).search(/[{[]/);
      const endAt = brace < 0 ? stop : i + brace;
      parts.push({ raw: text.slice(i, endAt).trim() });
      i = endAt;
    }
  }
  return parts;
}

afterEach(async () => {
  await stopAllServers();
});

afterAll(() => {
  removeTempDirs();
});

describe('README', () => {
  test('the walkthrough, then the token lifecycle and the bots examples, run as written in one shell', async () => {
    assertBuilt();
    const block = markedBlock('walkthrough');
    const lifecycle = markedBlock('lifecycle');
    const bots = markedBlock('bots');
    expect(block).toContain('localhost:8056');
    expect(lifecycle).toContain('localhost:8056');

    const dir = makeTempDir('readme');
    const adminKey = randomBytes(32).toString('hex');
    writeFileSync(join(dir, '.env'), `ADMIN_API_TOKEN=${adminKey}\n`, { mode: 0o600 });
    const server = await startServer({
      env: {
        ADMIN_API_TOKEN: adminKey,
        DATABASE_PATH: join(dir, 'data', 'keyward.db'),
        BCRYPT_ROUNDS: '4',
        PORT: '0',
        HOST: '127.0.0.1',
      },
      cwd: dir,
    });

    const script = [block, `echo '${BETWEEN}'`, lifecycle, `echo '${BEFORE_BOTS}'`, bots].join('\n').split('localhost:8056').join(`127.0.0.1:${server.port}`);
    const run = await runBash(script, { cwd: dir, flags: ['-euo', 'pipefail'] });
    expect({ code: run.code, stderr: run.stderr }).toEqual({ code: 0, stderr: '' });
    const [walkthroughOut, rest] = run.stdout.split(BETWEEN) as [string, string];
    const [lifecycleOut, botsOut] = rest.split(BEFORE_BOTS) as [string, string];
    expect(botsOut).toBeDefined();

    const parts = splitOutput(walkthroughOut);
    const find = (from: number, what: string, pred: (p: { raw: string; json?: any }) => boolean): number => {
      const at = parts.findIndex((p, i) => i >= from && pred(p));
      if (at < 0) throw new Error(`walkthrough output has no ${what} after part ${from}:\n${run.stdout}`);
      return at;
    };

    const created = find(0, 'created user', (p) => p.json?.email === 'ada@example.com');
    expect(parts[created]!.json).toMatchObject({ id: 1, email: 'ada@example.com', name: 'Ada', max_concurrent_bots: 5 });
    expect(parts[created]!.raw).toContain('"ada@example.com"');

    const me = find(created + 1, '/v1/me response', (p) => p.raw.includes('"user":{"id":1'));
    expect(parts[me]!.json.user.email).toBe('ada@example.com');

    const listing = find(me + 1, 'masked token listing', (p) => Array.isArray(p.json?.data));
    expect(parts[listing]!.raw).toContain('"masked":"kw_live_');
    expect(parts[listing]!.json.data).toHaveLength(1);
    expect(parts[listing]!.raw).not.toMatch(FULL_TOKEN);
    expect(parts[listing]!.raw).not.toContain('"token"');

    const revoked = find(listing + 1, '204', (p) => p.raw === '204');
    const refused = find(revoked + 1, 'API_KEY_REVOKED error', (p) => p.json?.error !== undefined);
    expect(parts[refused]!.raw).toContain('"code":"API_KEY_REVOKED"');
    expect(refused).toBe(parts.length - 1);

    // The walkthrough never prints the token or the admin key, and neither reaches the server's log.
    expect(walkthroughOut).not.toMatch(FULL_TOKEN);
    expect(run.stdout).not.toContain(adminKey);
    expect(server.logs).not.toContain(adminKey);
    expect(server.logs).not.toMatch(FULL_TOKEN);
    expect(server.logs).not.toMatch(/kw_test_[A-Za-z0-9]{12}_[A-Za-z0-9]{38}/);

    // The lifecycle block: each printed response, in order.
    const out = splitOutput(lifecycleOut).map((p) => p.json);
    expect(out).toHaveLength(6);
    const [ci, scriptKey, mine, rotatedMe, patched, testKeys] = out;
    expect(ci).toMatchObject({ id: 2, name: 'ci', environment: 'test', scopes: ['bots:read'], allowed_ips: ['127.0.0.1', '10.0.0.0/8'], status: 'active' });
    expect(ci.token).toMatch(/^kw_test_/);
    expect(Date.parse(ci.expires_at) - Date.parse(ci.created_at)).toBe(2_592_000_000);

    expect(scriptKey).toMatchObject({ name: 'script', scopes: ['bots:read'], environment: 'live', user_id: 1 });
    expect(Date.parse(scriptKey.expires_at) - Date.parse(scriptKey.created_at)).toBe(3_600_000);

    // The laptop key (3) has been used by the two requests before the listing, and the listing says so.
    const laptop = mine.data.find((t: { name: string }) => t.name === 'laptop');
    expect(laptop).toMatchObject({ id: 3, status: 'active', last_used_ip: expect.stringMatching(/127\.0\.0\.1$/), rotated_to: null });
    expect(laptop.last_used_at).not.toBeNull();
    // The walkthrough's token is listed too, revoked.
    expect(mine.data.map((t: { name: string; status: string }) => [t.name, t.status])).toEqual([
      [null, 'revoked'],
      ['ci', 'active'],
      ['laptop', 'active'],
      ['script', 'active'],
    ]);
    expect(JSON.stringify(mine)).not.toContain('"token"');

    expect(rotatedMe.token).toMatchObject({ name: 'laptop', scopes: ['bots:read', 'bots:write', 'tokens:read', 'tokens:write'] });
    expect(rotatedMe.token.id).not.toBe(3);
    expect(patched).toMatchObject({ id: 3, name: 'old laptop', scopes: ['bots:read'], rotated_to: rotatedMe.token.id, status: 'active' });
    expect(patched.expires_at).not.toBeNull();
    expect(testKeys.data.map((t: { id: number }) => t.id)).toEqual([2]);

    // The bots block: heartbeat, listing, the refusal at the limit, the release.
    const botParts = splitOutput(botsOut);
    expect(botParts.map((p) => p.json === undefined ? p.raw : 'json')).toEqual(['json', 'json', 'json', '204']);
    const [renewed, running, refusal] = botParts.map((p) => p.json);
    expect(renewed).toMatchObject({ platform: 'google_meet', native_meeting_id: 'abc-defg-hij', status: 'active', ttl_seconds: 120, user_id: 1 });
    expect(running.data.map((b: { id: number }) => b.id)).toEqual([renewed.id]);
    expect(running.concurrency).toEqual({ limit: 5, active: 1 });
    expect(refusal.error).toMatchObject({ code: 'CONCURRENCY_LIMIT_EXCEEDED', details: { limit: 1, active: 1 } });
    expect(server.logs).not.toMatch(/kw_live_[A-Za-z0-9]{12}_[A-Za-z0-9]{38}/);
  });

  test('the operations examples run as written after the walkthrough', async () => {
    assertBuilt();
    const dir = makeTempDir('readme-ops');
    const adminKey = randomBytes(32).toString('hex');
    writeFileSync(join(dir, '.env'), `ADMIN_API_TOKEN=${adminKey}\n`, { mode: 0o600 });
    const server = await startServer({
      env: { ADMIN_API_TOKEN: adminKey, DATABASE_PATH: join(dir, 'data', 'keyward.db'), BCRYPT_ROUNDS: '4', PORT: '0', HOST: '127.0.0.1' },
      cwd: dir,
    });
    const script = [markedBlock('walkthrough'), `echo '${BETWEEN}'`, markedBlock('operations')].join('\n').split('localhost:8056').join(`127.0.0.1:${server.port}`);
    const run = await runBash(script, { cwd: dir, flags: ['-euo', 'pipefail'] });
    expect({ code: run.code, stderr: run.stderr }).toEqual({ code: 0, stderr: '' });
    const opsOut = run.stdout.split(BETWEEN)[1]!;
    // The metrics come last, as Prometheus text (whose label sets look like JSON to the splitter).
    const metricsAt = opsOut.indexOf('keyward_auth_outcomes_total');
    expect(metricsAt).toBeGreaterThan(0);
    const out = splitOutput(opsOut.slice(0, metricsAt));
    expect(out.every((p) => p.json !== undefined)).toBe(true);
    const [tokenEvents, userEvents, patched, usage] = out.map((p) => p.json);
    // The walkthrough minted and revoked token 1: newest first.
    expect(tokenEvents.data.map((e: { action: string }) => e.action)).toEqual(['token.revoked', 'token.minted']);
    expect(tokenEvents.data[0]).toMatchObject({ actor: { type: 'admin' }, target: { type: 'token', id: '1', user_id: 1 } });
    expect(userEvents.data.map((e: { action: string }) => e.action)).toEqual(['token.revoked', 'token.minted', 'user.created']);
    expect(patched).toMatchObject({ id: 1, credits: 100 });
    expect(usage).toMatchObject({ user_id: 1, totals: { requests: 1 } });
    const metricLines = opsOut.slice(metricsAt).trim().split('\n');
    expect(metricLines.some((l) => /^keyward_auth_outcomes_total\{api="user",outcome="API_KEY_REVOKED"\} 1$/.test(l))).toBe(true);
    const backup = join(dir, 'keyward-backup.db');
    expect(statSync(backup).mode & 0o777).toBe(0o600);
    expect(readFileSync(backup).subarray(0, 16).toString('latin1')).toBe('SQLite format 3\0');
    expect(server.logs).not.toMatch(FULL_TOKEN);
  });

  test('the admin keys example runs as written after the walkthrough', async () => {
    assertBuilt();
    const dir = makeTempDir('readme-admin-keys');
    const adminKey = randomBytes(32).toString('hex');
    writeFileSync(join(dir, '.env'), `ADMIN_API_TOKEN=${adminKey}\n`, { mode: 0o600 });
    const server = await startServer({
      env: { ADMIN_API_TOKEN: adminKey, DATABASE_PATH: join(dir, 'data', 'keyward.db'), BCRYPT_ROUNDS: '4', PORT: '0', HOST: '127.0.0.1' },
      cwd: dir,
    });
    const script = [markedBlock('walkthrough'), `echo '${BETWEEN}'`, markedBlock('admin-keys')].join('\n').split('localhost:8056').join(`127.0.0.1:${server.port}`);
    const run = await runBash(script, { cwd: dir, flags: ['-euo', 'pipefail'] });
    expect({ code: run.code, stderr: run.stderr }).toEqual({ code: 0, stderr: '' });
    const out = splitOutput(run.stdout.split(BETWEEN)[1]!);
    expect(out.map((p) => p.json === undefined ? p.raw : 'json')).toEqual(['json', 'json', 'json', '204']);
    const [created, refused, listed] = out.map((p) => p.json);
    expect(created).toMatchObject({ id: 2, email: 'grace@example.com' });
    expect(refused.error).toMatchObject({ code: 'INSUFFICIENT_SCOPE', details: { required: ['audit:read'] } });
    expect(listed.data).toEqual([
      expect.objectContaining({ id: 1, name: 'provisioning', scopes: ['tokens:write', 'users:write'], status: 'active', masked: expect.stringMatching(/^kw_admin_[A-Za-z0-9]{12}_…[A-Za-z0-9]{4}$/) }),
    ]);
    // The key's user.created names it; the key itself reached neither a response but the first nor the log.
    const audit = await fetch(`${server.baseUrl}/admin/audit?actor=admin_key:1`, { headers: { 'X-Admin-API-Key': adminKey } });
    expect(((await audit.json()) as { data: unknown[] }).data).toEqual([expect.objectContaining({ action: 'user.created', actor: expect.objectContaining({ name: 'provisioning' }) })]);
    expect(run.stdout).not.toMatch(/kw_admin_[A-Za-z0-9]{12}_[A-Za-z0-9]{38}/);
    expect(server.logs).not.toMatch(/kw_admin_[A-Za-z0-9]{12}_[A-Za-z0-9]{38}/);
    const revoked = await fetch(`${server.baseUrl}/admin/admin-keys/1`, { headers: { 'X-Admin-API-Key': adminKey } });
    expect(((await revoked.json()) as { status: string }).status).toBe('revoked');
  });

  test('the quick start\'s test commands are `npm test` and `npm run test:system`, and both run jest', () => {
    const start = README.indexOf('## Quick start');
    expect(start).toBeGreaterThanOrEqual(0);
    const quickStart = README.slice(start, README.indexOf('\n## ', start + 1));
    const runTheTests = quickStart.indexOf('Run the tests');
    expect(runTheTests).toBeGreaterThanOrEqual(0);
    const afterRunTheTests = quickStart.slice(runTheTests);
    const blocks = [...afterRunTheTests.matchAll(/```bash\n([\s\S]*?)\n```/g)].map((m) => m[1]!.trim());
    expect(blocks).toEqual(['npm test', 'npm run test:system']);

    const pkg = JSON.parse(readFileSync(join(REPO_ROOT, 'package.json'), 'utf8'));
    expect(pkg.scripts.test).toMatch(/\bjest\b/);
    // test:system says what is missing before any test runs, then runs PostgreSQL and the system group.
    expect(pkg.scripts['test:system']).toBe('node scripts/check-system.js && npm run test:postgres && KEYWARD_TEST_GROUP=system jest');
  });
});
