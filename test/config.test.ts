import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { availableParallelism } from 'node:os';
import { inspect } from 'node:util';
import { ConfigError, loadConfig, VARIABLES, type Config } from '../src/config';

/** A fixed, well-formed admin key (64 hex characters), so every run is the same. */
const GOOD_KEY = '3f9a1c0b7e2d4c6a8b5f0e1d2c3b4a5968778695a4b3c2d1e0f1a2b3c4d5e6f7';
const HOW_TO = 'openssl rand -hex 32';

function configErrorFor(env: Record<string, string | undefined>): ConfigError {
  try {
    loadConfig(env);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return err as ConfigError;
  }
  throw new Error(`loadConfig accepted ${JSON.stringify(env)}`);
}

/** Everything a log line, a crash report or a debugger could show of a value. */
function everyRendering(value: unknown): string {
  return [
    JSON.stringify(value),
    inspect(value, { depth: Infinity, showHidden: true, getters: true, maxArrayLength: Infinity, maxStringLength: Infinity }),
    String(value),
  ].join('\n');
}

const withKey = (env: Record<string, string | undefined> = {}) => ({ ADMIN_API_TOKEN: GOOD_KEY, ...env });

describe('loadConfig', () => {
  describe('defaults', () => {
    it('applies the documented default for every optional variable', () => {
      const config = loadConfig(withKey());
      expect(config.port).toBe(8056);
      expect(config.host).toBe('0.0.0.0');
      expect(config.databasePath).toBe('./data/keyward.db');
      expect(config.bcryptRounds).toBe(10);
      expect(config.tokenPrefix).toBe('kw');
      expect(config.logLevel).toBe('info');
      expect(config.trustProxy).toBe(false);
      expect(config.verifyCacheSize).toBe(100000);
      expect(config.shutdownTimeoutMs).toBe(10000);
    });

    it('converts SHUTDOWN_TIMEOUT_SECONDS to milliseconds', () => {
      expect(loadConfig(withKey({ SHUTDOWN_TIMEOUT_SECONDS: '30' })).shutdownTimeoutMs).toBe(30000);
      expect(loadConfig(withKey({ SHUTDOWN_TIMEOUT_SECONDS: '0' })).shutdownTimeoutMs).toBe(0);
    });

    it('uses the values it is given instead of the defaults', () => {
      const config = loadConfig(
        withKey({
          PORT: '0',
          HOST: '127.0.0.1',
          DATABASE_PATH: '/data/kw.db',
          BCRYPT_ROUNDS: '12',
          TOKEN_PREFIX: 'acme2',
          LOG_LEVEL: 'debug',
          VERIFY_CACHE_SIZE: '5',
        }),
      );
      expect(config).toMatchObject({
        port: 0,
        host: '127.0.0.1',
        databasePath: '/data/kw.db',
        bcryptRounds: 12,
        tokenPrefix: 'acme2',
        logLevel: 'debug',
        verifyCacheSize: 5,
      });
    });
  });

  describe('purity', () => {
    it('reads only the environment it is given, never process.env', () => {
      const saved = process.env.PORT;
      process.env.PORT = '1234';
      try {
        expect(loadConfig(withKey()).port).toBe(8056);
      } finally {
        if (saved === undefined) delete process.env.PORT;
        else process.env.PORT = saved;
      }
    });

    it('does not modify the environment it is given', () => {
      const env = Object.freeze(withKey({ PORT: '9000' }));
      expect(() => loadConfig(env)).not.toThrow();
      expect(env).toEqual({ ADMIN_API_TOKEN: GOOD_KEY, PORT: '9000' });
    });
  });

  describe('the returned object', () => {
    it('is frozen', () => {
      const config = loadConfig(withKey());
      expect(Object.isFrozen(config)).toBe(true);
      expect(() => {
        (config as { port: number }).port = 1;
      }).toThrow(TypeError);
      expect(config.port).toBe(8056);
    });

    it('holds the sha256 digest of the admin key', () => {
      const config = loadConfig(withKey());
      const expected = createHash('sha256').update(GOOD_KEY).digest();
      expect(Buffer.isBuffer(config.adminKeyDigest)).toBe(true);
      expect(config.adminKeyDigest.equals(expected)).toBe(true);
    });

    it('has exactly the keys of the settings table', () => {
      const config = loadConfig(withKey());
      expect(Object.keys(config).sort()).toEqual(VARIABLES.map((v) => v.key).sort());
    });

    it('does not contain the plaintext admin key in any property or rendering', () => {
      const config = loadConfig(withKey());
      const rendered = everyRendering(config);
      expect(rendered).not.toContain(GOOD_KEY);
      // Nor any recognisable part of it.
      expect(rendered).not.toContain(GOOD_KEY.slice(0, 16));
      expect(rendered).not.toContain(GOOD_KEY.slice(-16));
      expect(rendered).not.toContain(Buffer.from(GOOD_KEY).toString('base64').slice(0, 16));
      for (const key of Reflect.ownKeys(config)) {
        const value: unknown = (config as unknown as Record<string | symbol, unknown>)[key];
        expect(value).not.toBe(GOOD_KEY);
        if (Buffer.isBuffer(value)) expect(value.toString('utf8')).not.toContain(GOOD_KEY);
      }
    });
  });

  describe('ADMIN_API_TOKEN', () => {
    const refused: Array<[string, string | undefined]> = [
      ['missing', undefined],
      ['empty', ''],
      ['shorter than 32 characters', '3f9a1c0b7e2d4c6a8b5f0e1d2c3b4a5'],
      ['the placeholder "changeme"', 'changeme'],
      ['the placeholder "CHANGEME"', 'CHANGEME'],
      ['the placeholder "admin"', 'admin'],
      ['the placeholder "secret"', 'secret'],
      ['a 32+ character string containing "replace"', 'replace-this-with-a-real-key-0123456789'],
      ['a 32+ character string containing "example"', 'example0123456789abcdefghijklmnopqrstuvwxyz'],
      ['a 32+ character string containing "your-"', 'your-admin-api-token-goes-here-9876543210'],
      ['a string with almost no variety', 'a'.repeat(40)],
      ['a string of two alternating characters', 'ab'.repeat(20)],
    ];

    it.each(refused)('is refused when %s, with a message that says how to make one', (_label, value) => {
      const err = configErrorFor({ ADMIN_API_TOKEN: value });
      expect(err.problems).toHaveLength(1);
      expect(err.problems[0]).toContain('ADMIN_API_TOKEN');
      expect(err.problems[0]).toContain(HOW_TO);
      expect(err.message).toContain(HOW_TO);
    });

    // Short words such as "admin" may legitimately appear in any message; look for the longer values.
    it.each(refused.filter(([, value]) => value !== undefined && value.length >= 8))(
      'never echoes the refused value when it is %s',
      (_label, value) => {
        const err = configErrorFor({ ADMIN_API_TOKEN: value });
        const rendered = [err.message, ...err.problems, String(err), inspect(err, { depth: Infinity })].join('\n');
        expect(rendered).not.toContain(value as string);
      },
    );

    it('accepts a random 64-character hex key', () => {
      expect(() => loadConfig({ ADMIN_API_TOKEN: GOOD_KEY })).not.toThrow();
    });

    it('accepts a key of exactly 32 varied characters', () => {
      expect(() => loadConfig({ ADMIN_API_TOKEN: GOOD_KEY.slice(0, 32) })).not.toThrow();
    });
  });

  describe('ADMIN_API_TOKEN_NEXT', () => {
    const NEXT_KEY = 'c0ffee11d2e3f4a5b6c7d8e9fa0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b';

    it('is off by default', () => {
      expect(loadConfig(withKey()).adminKeyNextDigest).toBeNull();
      expect(loadConfig(withKey({ ADMIN_API_TOKEN_NEXT: '' })).adminKeyNextDigest).toBeNull();
    });

    it('holds the sha256 digest of the next key, never the key', () => {
      const config = loadConfig(withKey({ ADMIN_API_TOKEN_NEXT: NEXT_KEY }));
      expect(config.adminKeyNextDigest!.equals(createHash('sha256').update(NEXT_KEY).digest())).toBe(true);
      expect(everyRendering(config)).not.toContain(NEXT_KEY);
    });

    it.each([
      ['shorter than 32 characters', NEXT_KEY.slice(0, 20)],
      ['a placeholder', 'changeme'],
      ['a string with almost no variety', 'b'.repeat(40)],
    ])('is held to the same rules as the admin key: refused when %s', (_label, value) => {
      const err = configErrorFor(withKey({ ADMIN_API_TOKEN_NEXT: value }));
      expect(err.problems).toHaveLength(1);
      expect(err.problems[0]).toContain('ADMIN_API_TOKEN_NEXT');
      expect(err.problems[0]).toContain(HOW_TO);
    });

    it('is refused when it is the admin key itself (a change that changes nothing)', () => {
      const err = configErrorFor(withKey({ ADMIN_API_TOKEN_NEXT: GOOD_KEY }));
      expect(err.problems).toEqual([expect.stringContaining('ADMIN_API_TOKEN_NEXT is the same as ADMIN_API_TOKEN')]);
      expect(err.message).not.toContain(GOOD_KEY);
    });
  });

  describe('HTTP timeouts', () => {
    it('default to 10 s for the headers and 30 s for the whole request', () => {
      const config = loadConfig(withKey());
      expect([config.headersTimeoutMs, config.requestTimeoutMs]).toEqual([10_000, 30_000]);
    });

    it('are whole seconds, at least 1', () => {
      const config = loadConfig(withKey({ HTTP_HEADERS_TIMEOUT_SECONDS: '2', HTTP_REQUEST_TIMEOUT_SECONDS: '5' }));
      expect([config.headersTimeoutMs, config.requestTimeoutMs]).toEqual([2_000, 5_000]);
      const err = configErrorFor(withKey({ HTTP_HEADERS_TIMEOUT_SECONDS: '0', HTTP_REQUEST_TIMEOUT_SECONDS: '1.5' }));
      expect(err.problems).toHaveLength(2);
    });

    it('refuse a headers timeout longer than the request timeout', () => {
      const err = configErrorFor(withKey({ HTTP_HEADERS_TIMEOUT_SECONDS: '20', HTTP_REQUEST_TIMEOUT_SECONDS: '10' }));
      expect(err.problems).toEqual([expect.stringContaining('HTTP_HEADERS_TIMEOUT_SECONDS must not be longer than HTTP_REQUEST_TIMEOUT_SECONDS')]);
    });
  });

  describe('reporting', () => {
    it('reports every bad variable at once, one problem per variable, each naming it', () => {
      const env = {
        PORT: 'abc',
        BCRYPT_ROUNDS: '99',
        TOKEN_PREFIX: 'KW_',
        LOG_LEVEL: 'loud',
        TRUST_PROXY: 'true',
      };
      const err = configErrorFor(withKey(env));
      expect(err.problems).toHaveLength(Object.keys(env).length);
      for (const name of Object.keys(env)) {
        const naming = err.problems.filter((p) => new RegExp(`\\b${name}\\b`).test(p));
        expect(naming).toHaveLength(1);
        expect(err.message).toContain(naming[0]);
      }
    });

    it('reports a missing admin key together with the other problems', () => {
      const err = configErrorFor({ PORT: 'abc', LOG_LEVEL: 'loud' });
      expect(err.problems).toHaveLength(3);
      expect(err.problems.some((p) => p.includes('ADMIN_API_TOKEN'))).toBe(true);
      expect(err.problems.some((p) => p.includes('PORT'))).toBe(true);
      expect(err.problems.some((p) => p.includes('LOG_LEVEL'))).toBe(true);
    });

    it('is a ConfigError and an Error', () => {
      const err = configErrorFor({});
      expect(err).toBeInstanceOf(Error);
      expect(err.name).toBe('ConfigError');
    });
  });

  describe('no silent fallbacks', () => {
    it.each([[''], [' 80'], ['80 '], ['1e3'], ['70000'], ['65536'], ['-1'], ['8056.0'], ['0x50'], ['abc']])(
      'refuses PORT=%j',
      (value) => {
        const err = configErrorFor(withKey({ PORT: value }));
        expect(err.problems).toHaveLength(1);
        expect(err.problems[0]).toContain('PORT');
      },
    );

    it.each([
      ['BCRYPT_ROUNDS', '3'],
      ['BCRYPT_ROUNDS', '16'],
      ['BCRYPT_ROUNDS', ''],
      ['TOKEN_PREFIX', ''],
      ['TOKEN_PREFIX', 'Kw'],
      ['TOKEN_PREFIX', '9kw'],
      ['TOKEN_PREFIX', 'a'.repeat(17)],
      ['LOG_LEVEL', ''],
      ['LOG_LEVEL', 'INFO'],
      ['HOST', ''],
      ['HOST', '   '],
      ['DATABASE_PATH', ''],
      ['VERIFY_CACHE_SIZE', '0'],
      ['SHUTDOWN_TIMEOUT_SECONDS', '601'],
      ['SHUTDOWN_TIMEOUT_SECONDS', '1.5'],
    ])('refuses %s=%j', (name, value) => {
      const err = configErrorFor(withKey({ [name]: value }));
      expect(err.problems).toHaveLength(1);
      expect(err.problems[0]).toContain(name);
    });

    it('accepts a 16-character token prefix', () => {
      expect(loadConfig(withKey({ TOKEN_PREFIX: 'abcdefghijklmnop' })).tokenPrefix).toBe('abcdefghijklmnop');
    });
  });

  describe('TRUST_PROXY', () => {
    it.each<[string, Config['trustProxy']]>([
      ['off', false],
      ['loopback', ['loopback']],
      ['10.0.0.1', ['10.0.0.1']],
      ['10.0.0.0/8, ::1', ['10.0.0.0/8', '::1']],
      ['2', 2],
    ])('accepts %j', (value, expected) => {
      expect(loadConfig(withKey({ TRUST_PROXY: value })).trustProxy).toEqual(expected);
    });

    it.each([['true'], ['on'], ['10.0.0.0/33'], ['::1/129'], ['nonsense'], ['10.0.0.1, nonsense'], ['11'], [','], ['10.0.0.1,,loopback']])(
      'refuses %j',
      (value) => {
        const err = configErrorFor(withKey({ TRUST_PROXY: value }));
        expect(err.problems).toHaveLength(1);
        expect(err.problems[0]).toContain('TRUST_PROXY');
      },
    );
  });
});

describe('the settings table, .env.example and the README agree', () => {
  const root = join(__dirname, '..');
  const envExample = readFileSync(join(root, '.env.example'), 'utf8');
  const readme = readFileSync(join(root, 'README.md'), 'utf8');

  /** NAME -> value, from `NAME=value` or `# NAME=value` lines; plus the comment line just above. */
  function parseEnvExample(text: string): Map<string, { value: string; commented: boolean; comment: string | undefined }> {
    const out = new Map<string, { value: string; commented: boolean; comment: string | undefined }>();
    const lines = text.split(/\r?\n/);
    lines.forEach((line, i) => {
      const m = /^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$/.exec(line);
      if (!m) return;
      const above = i > 0 ? /^#\s*(.*)$/.exec(lines[i - 1] ?? '') : null;
      out.set(m[2]!, { value: m[3]!, commented: m[1] !== undefined, comment: above ? above[1] : undefined });
    });
    return out;
  }

  /** NAME -> { default, meaning } from the rows between the config markers. */
  function parseReadmeTable(text: string): Map<string, { default: string; meaning: string }> {
    const start = text.indexOf('<!-- config:start');
    const end = text.indexOf('<!-- config:end -->');
    if (start < 0 || end < start) throw new Error('README.md has no <!-- config:start … --> … <!-- config:end --> section');
    const out = new Map<string, { default: string; meaning: string }>();
    for (const line of text.slice(start, end).split(/\r?\n/)) {
      const m = /^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|\s*(.*?)\s*\|\s*(.*?)\s*\|\s*$/.exec(line);
      if (!m) continue;
      if (out.has(m[1]!)) throw new Error(`README.md lists ${m[1]} twice`);
      out.set(m[1]!, { default: m[2]!, meaning: m[3]! });
    }
    return out;
  }

  const example = parseEnvExample(envExample);
  const table = parseReadmeTable(readme);

  it('parses a row for something from both files', () => {
    expect(example.size).toBeGreaterThan(0);
    expect(table.size).toBeGreaterThan(0);
  });

  it.each(VARIABLES.map((v) => [v.name, v] as const))('.env.example lists %s with its default and its doc', (_name, variable) => {
    const entry = example.get(variable.name);
    expect(entry).toBeDefined();
    if (variable.default === undefined) {
      expect(entry).toMatchObject({ value: '', commented: false });
    } else {
      expect(entry).toMatchObject({ value: variable.default, commented: true });
    }
    expect(entry!.comment).toBe(variable.doc);
  });

  it.each(VARIABLES.map((v) => [v.name, v] as const))('the README table lists %s with the same default and doc', (_name, variable) => {
    const row = table.get(variable.name);
    expect(row).toBeDefined();
    const shown = variable.default === undefined ? '*(required)*' : variable.default === '' ? '*(empty)*' : `\`${variable.default}\``;
    expect(row!.default).toBe(shown);
    expect(row!.meaning).toBe(variable.doc);
  });

  it('the README table has no variable that the loader does not know', () => {
    const known = new Set(VARIABLES.map((v) => v.name));
    expect([...table.keys()].filter((name) => !known.has(name))).toEqual([]);
  });

  it('.env.example has no variable that the loader does not know', () => {
    const known = new Set(VARIABLES.map((v) => v.name));
    expect([...example.keys()].filter((name) => !known.has(name))).toEqual([]);
  });

  it('the documented defaults load as the defaults', () => {
    const env: Record<string, string> = { ADMIN_API_TOKEN: GOOD_KEY };
    for (const [name, entry] of example) if (entry.commented) env[name] = entry.value;
    expect(loadConfig(env)).toEqual(loadConfig({ ADMIN_API_TOKEN: GOOD_KEY }));
  });
});

describe('BCRYPT_CONCURRENCY', () => {
  it('defaults to auto: one less than the CPU cores, at least 1', () => {
    expect(loadConfig(withKey()).bcryptConcurrency).toBe(Math.max(1, availableParallelism() - 1));
  });

  it('takes a whole number from 1 to 64', () => {
    expect(loadConfig(withKey({ BCRYPT_CONCURRENCY: '3' })).bcryptConcurrency).toBe(3);
  });

  it.each([['0'], ['65'], ['two'], ['']])('refuses %j', (value) => {
    const err = configErrorFor(withKey({ BCRYPT_CONCURRENCY: value }));
    expect(err.problems).toHaveLength(1);
    expect(err.problems[0]).toContain('BCRYPT_CONCURRENCY');
  });
});

describe('EXTRA_SCOPES', () => {
  it('defaults to no extra scopes', () => {
    expect(loadConfig(withKey()).extraScopes).toEqual([]);
    expect(loadConfig(withKey({ EXTRA_SCOPES: '' })).extraScopes).toEqual([]);
  });

  it.each<[string, string[]]>([
    ['reports:read', ['reports:read']],
    ['reports:read, billing:write', ['reports:read', 'billing:write']],
    ['reports:read billing:write', ['reports:read', 'billing:write']],
    [' reports:read,billing:write ,\treports:read  team-a:deploy_now ', ['reports:read', 'billing:write', 'team-a:deploy_now']],
    [`r:${'x'.repeat(62)}`, [`r:${'x'.repeat(62)}`]],
  ])('accepts %j, separated by commas or spaces, duplicates folded', (value, expected) => {
    expect(loadConfig(withKey({ EXTRA_SCOPES: value })).extraScopes).toEqual(expected);
  });

  it('cannot be changed after loading: it is part of the catalog every mint is checked against', () => {
    expect(Object.isFrozen(loadConfig(withKey({ EXTRA_SCOPES: 'reports:read' })).extraScopes)).toBe(true);
  });

  it.each<[string, string]>([
    ['Reports:Read', 'Reports:Read'],
    ['a b:', 'b:'],
    ['reports:read, Billing:write', 'Billing:write'],
    [':read', ':read'],
    ['reports:', 'reports:'],
    ['1reports:read', '1reports:read'],
    ['reports:read;billing:write', 'reports:read;billing:write'],
    [`r:${'x'.repeat(63)}`, `r:${'x'.repeat(63)}`],
  ])('refuses %j, naming the variable and the bad entry', (value, bad) => {
    const err = configErrorFor(withKey({ EXTRA_SCOPES: value }));
    expect(err.problems).toHaveLength(1);
    expect(err.problems[0]).toContain('EXTRA_SCOPES');
    expect(err.problems[0]).toContain(bad);
  });

  // Scopes are `resource:action` (product.md, the issue); a bare word is not one, and "none" is what
  // openapi.yaml writes for "no scope needed", so a scope by that name would only confuse.
  it.each([['reports'], ['none']])('refuses %j, a name without an action', (value) => {
    const err = configErrorFor(withKey({ EXTRA_SCOPES: value }));
    expect(err.problems).toHaveLength(1);
    expect(err.problems[0]).toContain('EXTRA_SCOPES');
  });
});

describe('MAX_TOKEN_LIFETIME', () => {
  it('defaults to no cap', () => {
    expect(loadConfig(withKey()).maxTokenLifetimeSeconds).toBeNull();
    expect(loadConfig(withKey({ MAX_TOKEN_LIFETIME: '' })).maxTokenLifetimeSeconds).toBeNull();
  });

  it.each<[string, number]>([
    ['90d', 7_776_000],
    ['12h', 43_200],
    ['30m', 1_800],
    ['120s', 120],
    ['3600', 3_600],
    ['60', 60],
    ['3650d', 315_360_000],
  ])('reads %j as %d seconds', (value, seconds) => {
    expect(loadConfig(withKey({ MAX_TOKEN_LIFETIME: value })).maxTokenLifetimeSeconds).toBe(seconds);
  });

  it.each([['59'], ['0'], ['1y'], ['-5'], ['11000d'], ['315360001'], ['1.5h'], ['90D'], ['d'], ['90 d'], ['forever'], ['9007199254740993d']])(
    'refuses %j',
    (value) => {
      const err = configErrorFor(withKey({ MAX_TOKEN_LIFETIME: value }));
      expect(err.problems).toHaveLength(1);
      expect(err.problems[0]).toContain('MAX_TOKEN_LIFETIME');
      expect(err.problems[0]).toContain(`"${value}"`);
    },
  );
});

describe('MAX_TOKENS_PER_USER', () => {
  it('defaults to 100', () => {
    expect(loadConfig(withKey()).maxTokensPerUser).toBe(100);
  });

  it('takes a whole number of at least 1', () => {
    expect(loadConfig(withKey({ MAX_TOKENS_PER_USER: '1' })).maxTokensPerUser).toBe(1);
    expect(loadConfig(withKey({ MAX_TOKENS_PER_USER: '5000' })).maxTokensPerUser).toBe(5000);
  });

  // 0 would not mean "unlimited": it would refuse every mint, so it is refused instead.
  it.each([['0'], ['abc'], [''], ['-1'], ['1.5'], [' 5']])('refuses %j', (value) => {
    const err = configErrorFor(withKey({ MAX_TOKENS_PER_USER: value }));
    expect(err.problems).toHaveLength(1);
    expect(err.problems[0]).toContain('MAX_TOKENS_PER_USER');
  });
});

describe('the token lifecycle variables are reported with every other problem', () => {
  it('lists each bad one, once, alongside a missing admin key', () => {
    const env = { EXTRA_SCOPES: 'Reports:Read', MAX_TOKEN_LIFETIME: '1y', MAX_TOKENS_PER_USER: '0', PORT: 'abc' };
    const err = configErrorFor(env);
    expect(err.problems).toHaveLength(Object.keys(env).length + 1);
    for (const name of [...Object.keys(env), 'ADMIN_API_TOKEN']) {
      const naming = err.problems.filter((p) => new RegExp(`\\b${name}\\b`).test(p));
      expect(naming).toHaveLength(1);
      expect(err.message).toContain(naming[0]);
    }
  });
});

describe('secrets from files (_FILE)', () => {
  const { mkdtempSync, rmSync, writeFileSync, chmodSync } = jest.requireActual<typeof import('node:fs')>('node:fs');
  const { tmpdir } = jest.requireActual<typeof import('node:os')>('node:os');
  let dir: string;
  const secretFile = (name: string, content: string | Buffer) => {
    const path = join(dir, name);
    writeFileSync(path, content, { mode: 0o600 });
    return path;
  };
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'keyward-secrets-'));
  });
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  const SECRETS = ['ADMIN_API_TOKEN', 'ADMIN_API_TOKEN_NEXT', 'DATABASE_URL', 'REDIS_URL', 'SSO_SHARED_SECRET', 'METRICS_TOKEN'];

  it('is offered for exactly the secret settings', () => {
    expect(VARIABLES.filter((v) => v.secret).map((v) => v.name)).toEqual(SECRETS);
  });

  it('the README names the _FILE variant of exactly those', () => {
    const readme = readFileSync(join(__dirname, '..', 'README.md'), 'utf8');
    const listed = /<!-- secret-files[^>]*-->([\s\S]*?)<!-- \/secret-files -->/.exec(readme)?.[1] ?? '';
    expect([...listed.matchAll(/`([A-Z_]+)`/g)].map((m) => m[1])).toEqual(SECRETS.map((name) => `${name}_FILE`));
  });

  it('reads each secret from its file, without the line end the file ends with', () => {
    const next = 'a7c1e9f3b5d7092846afce13579bdf02468ace13579bdf02468ace13579bdf0';
    const config = loadConfig({
      ADMIN_API_TOKEN_FILE: secretFile('admin', `${GOOD_KEY}\n`),
      ADMIN_API_TOKEN_NEXT_FILE: secretFile('next', `${next}\r\n`),
      DATABASE_URL_FILE: secretFile('db', 'postgres://keyward:pa ss@db:5432/keyward\n'),
      REDIS_URL_FILE: secretFile('redis', 'redis://:s3cret@redis:6379/2\n'),
      SSO_SHARED_SECRET_FILE: secretFile('sso', 'sso-shared-secret-of-at-least-32-chars'),
      METRICS_TOKEN_FILE: secretFile('metrics', 'metrics-token-of-at-least-32-characters\n\n'),
    });
    const sha = (value: string) => createHash('sha256').update(value).digest();
    expect(config.adminKeyDigest).toEqual(sha(GOOD_KEY));
    expect(config.adminKeyNextDigest).toEqual(sha(next));
    expect(config.databaseUrl).toBe('postgres://keyward:pa ss@db:5432/keyward');
    expect(config.redisUrl).toBe('redis://:s3cret@redis:6379/2');
    expect(config.ssoSharedSecretDigest).toEqual(sha('sso-shared-secret-of-at-least-32-chars'));
    expect(config.metricsTokenDigest).toEqual(sha('metrics-token-of-at-least-32-characters'));
  });

  it('checks a value from a file like the variable itself, naming the variable', () => {
    const error = configErrorFor({ ADMIN_API_TOKEN_FILE: secretFile('admin', 'changeme\n') });
    expect(error.problems).toEqual(['ADMIN_API_TOKEN is a placeholder value; generate one with `openssl rand -hex 32`']);
  });

  it('refuses a variable set both directly and from a file, naming both, with every other problem', () => {
    const error = configErrorFor({ ADMIN_API_TOKEN: GOOD_KEY, ADMIN_API_TOKEN_FILE: secretFile('admin', GOOD_KEY), METRICS_TOKEN: 'x'.repeat(40), METRICS_TOKEN_FILE: secretFile('m', 'y'.repeat(40)), PORT: 'eighty' });
    expect(error.problems).toEqual([
      'ADMIN_API_TOKEN and ADMIN_API_TOKEN_FILE are both set; set only one of them',
      expect.stringMatching(/^PORT must be/),
      'METRICS_TOKEN and METRICS_TOKEN_FILE are both set; set only one of them',
    ]);
  });

  it('an empty variable beside its file is not "both set" (compose files often pass empty variables)', () => {
    expect(loadConfig({ ADMIN_API_TOKEN: '', ADMIN_API_TOKEN_FILE: secretFile('admin', GOOD_KEY) }).adminKeyDigest).toEqual(createHash('sha256').update(GOOD_KEY).digest());
  });

  it('refuses a missing, unreadable, empty or oversized file by its path, never showing what it holds', () => {
    const missing = join(dir, 'missing');
    expect(configErrorFor({ ADMIN_API_TOKEN_FILE: missing }).problems).toEqual([`ADMIN_API_TOKEN_FILE names ${missing}, which cannot be read (ENOENT)`]);
    expect(configErrorFor({ ADMIN_API_TOKEN_FILE: dir }).problems).toEqual([`ADMIN_API_TOKEN_FILE names ${dir}, which cannot be read (EISDIR)`]);
    const empty = secretFile('empty', '\n');
    expect(configErrorFor({ ADMIN_API_TOKEN_FILE: empty }).problems).toEqual([`ADMIN_API_TOKEN_FILE names ${empty}, which is empty`]);
    const big = secretFile('big', Buffer.alloc(65 * 1024, 'k'));
    expect(configErrorFor({ ADMIN_API_TOKEN_FILE: big }).problems).toEqual([`ADMIN_API_TOKEN_FILE names ${big}, which is larger than 64 KiB: not a secrets file`]);
    const url = secretFile('db', 'mysql://user:hunter2-password@db/keyward');
    const problems = configErrorFor({ ADMIN_API_TOKEN: GOOD_KEY, DATABASE_URL_FILE: url }).problems;
    expect(problems).toEqual([expect.stringMatching(/^DATABASE_URL must start with postgres:\/\//)]);
    expect(problems.join('\n')).not.toContain('hunter2');
    if (process.getuid?.() !== 0) {
      const locked = secretFile('locked', GOOD_KEY);
      chmodSync(locked, 0o000);
      expect(configErrorFor({ ADMIN_API_TOKEN_FILE: locked }).problems).toEqual([`ADMIN_API_TOKEN_FILE names ${locked}, which cannot be read (EACCES)`]);
    }
  });
});

describe('RATE_LIMIT_STORE', () => {
  it('defaults to memory, with a 50 ms bound and the keyward prefix for the shared stores', () => {
    const config = loadConfig({ ADMIN_API_TOKEN: GOOD_KEY });
    expect([config.rateLimitStore, config.redisUrl, config.rateLimitStoreTimeoutMs, config.rateLimitStorePrefix]).toEqual(['memory', null, 50, 'keyward']);
  });

  it('postgres needs DATABASE_URL, redis needs REDIS_URL; each names the fix', () => {
    expect(configErrorFor({ ADMIN_API_TOKEN: GOOD_KEY, RATE_LIMIT_STORE: 'postgres' }).problems).toEqual([
      'RATE_LIMIT_STORE=postgres counts in the PostgreSQL database: set DATABASE_URL, or use redis or memory',
    ]);
    expect(configErrorFor({ ADMIN_API_TOKEN: GOOD_KEY, RATE_LIMIT_STORE: 'redis' }).problems).toEqual(['RATE_LIMIT_STORE=redis needs REDIS_URL, e.g. redis://127.0.0.1:6379']);
    const config = loadConfig({ ADMIN_API_TOKEN: GOOD_KEY, RATE_LIMIT_STORE: 'redis', REDIS_URL: 'rediss://:pw@cache.internal:6380/2' });
    expect([config.rateLimitStore, config.redisUrl]).toEqual(['redis', 'rediss://:pw@cache.internal:6380/2']);
  });

  it('refuses an unknown store, a URL that is not Redis\'s (never repeating it), a bound out of range and a bad prefix', () => {
    const problems = configErrorFor({
      ADMIN_API_TOKEN: GOOD_KEY,
      RATE_LIMIT_STORE: 'memcached',
      REDIS_URL: 'http://:hunter2@cache:6379',
      RATE_LIMIT_STORE_TIMEOUT_MS: '0',
      RATE_LIMIT_STORE_PREFIX: 'key ward',
    }).problems;
    expect(problems).toEqual([
      'RATE_LIMIT_STORE must be one of memory, postgres, redis, got "memcached"',
      'REDIS_URL must start with redis:// or rediss://',
      expect.stringMatching(/^RATE_LIMIT_STORE_TIMEOUT_MS must be/),
      'RATE_LIMIT_STORE_PREFIX must be 1 to 64 letters, digits, dots, dashes or underscores, got "key ward"',
    ]);
    expect(problems.join('\n')).not.toContain('hunter2');
    expect(configErrorFor({ ADMIN_API_TOKEN: GOOD_KEY, REDIS_URL: 'not a url :pw@' }).problems).toEqual(['REDIS_URL must be a redis://[:password@]host:6379[/db] URL']);
  });
});
