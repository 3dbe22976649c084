import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { availableParallelism } from 'node:os';
import { ADMIN_SCOPES, type AdminScope, isAdminScope } from './admin-keys/admin-scopes';

export type RateLimitStoreKind = 'memory' | 'postgres' | 'redis';
const RATE_LIMIT_STORES: readonly RateLimitStoreKind[] = ['memory', 'postgres', 'redis'];

export type LogLevel = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
export type TrustProxy = false | number | string[];

export interface Config {
  /** sha256 of ADMIN_API_TOKEN: the plaintext key is not kept in memory past loading. */
  readonly adminKeyDigest: Buffer;
  /** sha256 of ADMIN_API_TOKEN_NEXT, the key that also works while admins move to it; null: none. */
  readonly adminKeyNextDigest: Buffer | null;
  readonly port: number;
  readonly host: string;
  readonly databasePath: string;
  /** postgres://… selects PostgreSQL; null: SQLite at databasePath. */
  readonly databaseUrl: string | null;
  readonly databasePoolSize: number;
  readonly bcryptRounds: number;
  readonly tokenPrefix: string;
  readonly logLevel: LogLevel;
  readonly trustProxy: TrustProxy;
  readonly verifyCacheSize: number;
  readonly bcryptConcurrency: number;
  readonly shutdownTimeoutMs: number;
  /** A client must send its request headers within this, and the whole request within the next. */
  readonly headersTimeoutMs: number;
  readonly requestTimeoutMs: number;
  /** Scopes beyond the built-in four, for the self-hoster's own services. */
  readonly extraScopes: readonly string[];
  /** Longest a token may live, in seconds; null: no cap. */
  readonly maxTokenLifetimeSeconds: number | null;
  readonly maxTokensPerUser: number;
  /** Active named admin keys at once. */
  readonly maxAdminKeys: number;
  /** Default requests a minute on /v1 for new users. */
  readonly rateLimitPerMinute: number;
  /** Wrong keys a client address may send a minute before it is refused outright. */
  readonly authFailuresPerMinute: number;
  /** Requests a minute on /admin per client address. */
  readonly adminRateLimitPerMinute: number;
  /** Where the rate limits count: this process's memory, or a store every instance shares. */
  readonly rateLimitStore: RateLimitStoreKind;
  /** redis://… for RATE_LIMIT_STORE=redis; null: not set. */
  readonly redisUrl: string | null;
  /** Longest a request waits for the shared store before counting in memory instead. */
  readonly rateLimitStoreTimeoutMs: number;
  /** Prefix of the shared store's keys. */
  readonly rateLimitStorePrefix: string;
  /** How long finished bots stay visible, in seconds. */
  readonly botRetentionSeconds: number;
  /** Socket addresses/CIDRs of the SSO proxy whose identity headers are believed; empty: SSO off. */
  readonly ssoTrustedProxies: readonly string[];
  /** sha256 of SSO_SHARED_SECRET, which the proxy must also send; null: not required. */
  readonly ssoSharedSecretDigest: Buffer | null;
  /** Identity header names: `${prefix}Email`, `${prefix}User`, `${prefix}Preferred-Username`, `${prefix}Groups`. */
  readonly ssoHeaderPrefix: string;
  readonly ssoAutoProvision: boolean;
  readonly ssoAllowedDomains: readonly string[];
  readonly ssoAllowedGroups: readonly string[];
  /** Scopes signed-in people may give their own keys. */
  readonly ssoUserScopes: readonly string[];
  /** Groups whose signed-in members may use /admin without an admin key; empty: none may. */
  readonly ssoAdminGroups: readonly string[];
  /** The admin scopes such a person holds. */
  readonly ssoAdminScopes: readonly AdminScope[];
  readonly ssoDefaultMaxConcurrentBots: number;
  /** How long audit entries are kept, in seconds; 0: forever. */
  readonly auditRetentionSeconds: number;
  readonly metricsEnabled: boolean;
  /** sha256 of METRICS_TOKEN, which scrapers must send as a Bearer token; null: not required. */
  readonly metricsTokenDigest: Buffer | null;
  /** Addresses/CIDRs that may scrape /metrics; null: any address (only with METRICS_TOKEN). */
  readonly metricsAllowedIps: readonly string[] | null;
  /** Credits each bot start spends; 0: bots are free. */
  readonly creditsPerBot: number;
}

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(
      `keyward cannot start: ${problems.length} configuration problem(s):\n` +
        problems.map((p) => `  - ${p}`).join('\n'),
    );
    this.name = 'ConfigError';
  }
}

type Parsed<T> = { ok: true; value: T } | { ok: false; problem: string };
const ok = <T>(value: T): Parsed<T> => ({ ok: true, value });
const bad = (problem: string): Parsed<never> => ({ ok: false, problem });

export interface Variable<K extends keyof Config = keyof Config> {
  readonly name: string;
  readonly key: K;
  /** The default as a user would write it in .env; undefined means required. */
  readonly default: string | undefined;
  readonly doc: string;
  readonly parse: (raw: string, name: string) => Parsed<Config[K]>;
  /** A secret: it may instead be read from the file that `${name}_FILE` names (Docker and Kubernetes secrets). */
  readonly secret?: true;
}

const LOG_LEVELS: readonly LogLevel[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];
const HOW_TO_MAKE_A_KEY = 'generate one with `openssl rand -hex 32`';

// Values people paste from tutorials. Anything at least 32 characters long that still reads like a
// placeholder, or that has almost no variety in it, is refused as well.
const PLACEHOLDER_WORDS = ['changeme', 'change-me', 'change_me', 'placeholder', 'replace', 'example', 'your-', 'your_', 'yourtoken', 'yoursecret'];
const PLACEHOLDERS = new Set(['changeme', 'admin', 'secret', 'password', 'token', 'test', 'admintoken', 'adminapitoken', 'supersecret']);

function integer(min: number, max: number) {
  return (raw: string, name: string): Parsed<number> => {
    if (!/^\d+$/.test(raw)) return bad(`${name} must be a whole number from ${min} to ${max}, got "${raw}"`);
    const n = Number(raw);
    if (n < min || n > max) return bad(`${name} must be from ${min} to ${max}, got ${n}`);
    return ok(n);
  };
}

/** Whole seconds in the environment, milliseconds in Config. */
function seconds(min: number, max: number) {
  return (raw: string, name: string): Parsed<number> => {
    const parsed = integer(min, max)(raw, name);
    return parsed.ok ? ok(parsed.value * 1000) : parsed;
  };
}

function adminKey(raw: string, name: string): Parsed<Buffer> {
  const normalized = raw.toLowerCase().replace(/[^a-z0-9]/g, '');
  if (PLACEHOLDERS.has(normalized) || PLACEHOLDER_WORDS.some((w) => raw.toLowerCase().includes(w))) {
    return bad(`${name} is a placeholder value; ${HOW_TO_MAKE_A_KEY}`);
  }
  if (raw.length < 32) return bad(`${name} must be at least 32 characters (it has ${raw.length}); ${HOW_TO_MAKE_A_KEY}`);
  if (new Set(raw).size < 8) return bad(`${name} has too little variety to be a secret; ${HOW_TO_MAKE_A_KEY}`);
  return ok(createHash('sha256').update(raw).digest());
}

function isCidrOrAddress(entry: string): boolean {
  const [address, bits, ...rest] = entry.split('/');
  if (rest.length > 0 || address === undefined) return false;
  const family = isIP(address);
  if (family === 0) return false;
  if (bits === undefined) return true;
  if (!/^\d+$/.test(bits)) return false;
  return Number(bits) <= (family === 4 ? 32 : 128);
}

function trustProxy(raw: string, name: string): Parsed<TrustProxy> {
  const value = raw.trim().toLowerCase();
  if (value === '' || value === 'off' || value === 'false') return ok(false);
  if (value === 'true' || value === 'on') {
    return bad(`${name}=${raw} would trust X-Forwarded-For from any client; name your proxies (addresses, CIDRs, "loopback") or a hop count`);
  }
  if (/^\d+$/.test(value)) return integer(1, 10)(value, name);
  const entries = value.split(',').map((e) => e.trim());
  if (entries.includes('')) return bad(`${name} has an empty entry in "${raw}"`);
  const named = new Set(['loopback', 'linklocal', 'uniquelocal']);
  const invalid = entries.filter((e) => !named.has(e) && !isCidrOrAddress(e));
  if (invalid.length > 0) return bad(`${name} has entries that are not addresses, CIDRs or loopback/linklocal/uniquelocal: ${invalid.join(', ')}`);
  return ok(entries);
}

// Scope names look like the built-in ones: `resource:action` (or `resource:sub:action`), lowercase. No
// wildcards: a scope is a literal name, and `bots:*` would look like it grants `bots:read`.
const SCOPE_NAME = /^[a-z][a-z0-9_-]*(?::[a-z0-9_-]+)+$/;

function scopeList(raw: string, name: string): Parsed<readonly string[]> {
  const entries = raw.split(/[\s,]+/).filter((e) => e !== '');
  const invalid = entries.filter((e) => e.length > 64 || !SCOPE_NAME.test(e));
  if (invalid.length > 0) return bad(`${name} has names that are not scopes like "reports:read" (lowercase, up to 64 characters): ${invalid.join(', ')}`);
  return ok(Object.freeze([...new Set(entries)]));
}

const UNIT_SECONDS: Record<string, number> = { s: 1, m: 60, h: 3600, d: 86_400 };

function duration(min: number, max: number) {
  return (raw: string, name: string): Parsed<number> => {
    const m = /^(\d+)([smhd]?)$/.exec(raw.trim());
    const seconds = m ? Number(m[1]) * UNIT_SECONDS[m[2] || 's']! : NaN;
    if (!Number.isSafeInteger(seconds) || seconds < min || seconds > max) {
      return bad(`${name} must be a duration from ${min} to ${max} seconds, in seconds or with a unit (90d, 12h, 30m), got "${raw}"`);
    }
    return ok(seconds);
  };
}

/** Empty means "none" (null); anything else must parse. */
function optional<T>(parse: (raw: string, name: string) => Parsed<T>) {
  return (raw: string, name: string): Parsed<T | null> => (raw.trim() === '' ? ok(null) : parse(raw, name));
}

function list(raw: string): string[] {
  return raw.split(/[\s,]+/).filter((e) => e !== '');
}

function ssoProxies(raw: string, name: string): Parsed<readonly string[]> {
  const entries = list(raw);
  // By socket address only: "loopback" and hop counts belong to TRUST_PROXY, not here.
  const invalid = entries.filter((e) => !isCidrOrAddress(e));
  if (invalid.length > 0) return bad(`${name} has entries that are not addresses or CIDRs: ${invalid.join(', ')}`);
  return ok(Object.freeze(entries));
}

function ssoSecret(raw: string, name: string): Parsed<Buffer | null> {
  if (raw === '') return ok(null);
  if (raw.length < 32) return bad(`${name} must be at least 32 characters when set (it has ${raw.length}); ${HOW_TO_MAKE_A_KEY}`);
  return ok(createHash('sha256').update(raw).digest());
}

function redisUrl(raw: string, name: string): Parsed<string | null> {
  if (raw.trim() === '') return ok(null);
  let url: URL;
  try {
    url = new URL(raw.trim());
  } catch {
    return bad(`${name} must be a redis://[:password@]host:6379[/db] URL`);
  }
  // The message never repeats the value: it may hold a password.
  if (url.protocol !== 'redis:' && url.protocol !== 'rediss:') return bad(`${name} must start with redis:// or rediss://`);
  return ok(raw.trim());
}

function databaseUrl(raw: string, name: string): Parsed<string | null> {
  if (raw.trim() === '') return ok(null);
  let url: URL;
  try {
    url = new URL(raw.trim());
  } catch {
    return bad(`${name} must be a postgres://user:password@host:5432/database URL`);
  }
  // The message never repeats the value: it may hold a password.
  if (url.protocol !== 'postgres:' && url.protocol !== 'postgresql:') return bad(`${name} must start with postgres:// (only PostgreSQL is supported besides SQLite)`);
  return ok(raw.trim());
}

function metricsAddresses(raw: string, name: string): Parsed<readonly string[] | null> {
  if (raw.trim().toLowerCase() === 'any') return ok(null);
  const entries = list(raw);
  if (entries.length === 0) return bad(`${name} must name addresses or CIDRs (or be "any", with METRICS_TOKEN set)`);
  const invalid = entries.filter((e) => !isCidrOrAddress(e));
  if (invalid.length > 0) return bad(`${name} has entries that are not addresses or CIDRs: ${invalid.join(', ')}`);
  return ok(Object.freeze(entries));
}

function adminScopeList(raw: string, name: string): Parsed<readonly AdminScope[]> {
  if (raw.trim().toLowerCase() === 'all') return ok(ADMIN_SCOPES);
  const entries = [...new Set(list(raw))];
  const unknown = entries.filter((e) => !isAdminScope(e));
  if (unknown.length > 0) return bad(`${name} names unknown admin scopes: ${unknown.join(', ')}; valid: ${ADMIN_SCOPES.join(', ')}, or all`);
  if (entries.length === 0) return bad(`${name} must name at least one admin scope, or be all`);
  return ok(Object.freeze(entries.sort() as AdminScope[]));
}

function onOff(raw: string, name: string): Parsed<boolean> {
  const value = raw.trim().toLowerCase();
  if (['on', 'true', '1', 'yes'].includes(value)) return ok(true);
  if (['off', 'false', '0', 'no', ''].includes(value)) return ok(false);
  return bad(`${name} must be on or off, got "${raw}"`);
}

function domains(raw: string, name: string): Parsed<readonly string[]> {
  const entries = list(raw.toLowerCase());
  const invalid = entries.filter((e) => !/^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$/.test(e));
  if (invalid.length > 0) return bad(`${name} has entries that are not domain names: ${invalid.join(', ')}`);
  return ok(Object.freeze(entries));
}

/** The one table of settings: the loader, .env.example and the README's table all follow it. */
export const VARIABLES: readonly Variable[] = [
  { name: 'ADMIN_API_TOKEN', secret: true, key: 'adminKeyDigest', default: undefined, parse: adminKey,
    doc: 'Required. The admin key for /admin/* (header X-Admin-API-Key); at least 32 characters: `openssl rand -hex 32`.' },
  { name: 'ADMIN_API_TOKEN_NEXT', secret: true, key: 'adminKeyNextDigest', default: '',
    parse: (raw, name) => (raw === '' ? ok(null) : adminKey(raw, name)),
    doc: 'Optional second admin key that works too, for changing the admin key without downtime (docs/security.md).' },
  { name: 'PORT', key: 'port', default: '8056', parse: integer(0, 65535), doc: 'TCP port to listen on (0 picks a free one).' },
  { name: 'HOST', key: 'host', default: '0.0.0.0', doc: 'Address to listen on.',
    parse: (raw, name) => (raw.trim() === '' ? bad(`${name} must not be empty`) : ok(raw.trim())) },
  { name: 'DATABASE_PATH', key: 'databasePath', default: './data/keyward.db',
    doc: 'SQLite database file; its directory is created and the file is readable by its owner only.',
    parse: (raw, name) => (raw.trim() === '' ? bad(`${name} must not be empty`) : ok(raw.trim())) },
  { name: 'DATABASE_URL', secret: true, key: 'databaseUrl', default: '', parse: databaseUrl,
    doc: 'postgres://user:password@host:5432/db selects PostgreSQL (several instances can share it); empty: SQLite at DATABASE_PATH.' },
  { name: 'DATABASE_POOL_SIZE', key: 'databasePoolSize', default: '10', parse: integer(1, 1000),
    doc: 'PostgreSQL connections each instance keeps at most.' },
  { name: 'BCRYPT_ROUNDS', key: 'bcryptRounds', default: '10', parse: integer(4, 15),
    doc: 'bcrypt cost for token secrets (4 to 15); each +1 doubles the cost of a token\'s first request.' },
  { name: 'TOKEN_PREFIX', key: 'tokenPrefix', default: 'kw', doc: 'Prefix of minted tokens (lowercase letters and digits, up to 16).',
    parse: (raw, name) => (/^[a-z][a-z0-9]{0,15}$/.test(raw) ? ok(raw) : bad(`${name} must be 1 to 16 lowercase letters or digits starting with a letter, got "${raw}"`)) },
  { name: 'LOG_LEVEL', key: 'logLevel', default: 'info', doc: `Log level: ${LOG_LEVELS.join(', ')}.`,
    parse: (raw, name) => ((LOG_LEVELS as readonly string[]).includes(raw) ? ok(raw as LogLevel) : bad(`${name} must be one of ${LOG_LEVELS.join(', ')}, got "${raw}"`)) },
  { name: 'TRUST_PROXY', key: 'trustProxy', default: 'off', parse: trustProxy,
    doc: 'Reverse proxies whose X-Forwarded-For is believed: off, a hop count, or addresses/CIDRs/loopback, comma-separated.' },
  { name: 'VERIFY_CACHE_SIZE', key: 'verifyCacheSize', default: '100000', parse: integer(1, 10_000_000),
    doc: 'How many verified tokens each process remembers so that bcrypt runs once per token.' },
  { name: 'BCRYPT_CONCURRENCY', key: 'bcryptConcurrency', default: 'auto',
    doc: 'How many bcrypt checks run at once; auto = CPU cores - 1 (at least 1), leaving a core for requests.',
    parse: (raw, name) => (raw === 'auto' ? ok(Math.max(1, availableParallelism() - 1)) : integer(1, 64)(raw, name)) },
  { name: 'SHUTDOWN_TIMEOUT_SECONDS', key: 'shutdownTimeoutMs', default: '10',
    doc: 'On SIGTERM/SIGINT, how long in-flight requests may take before connections are closed.',
    parse: seconds(0, 600) },
  { name: 'HTTP_HEADERS_TIMEOUT_SECONDS', key: 'headersTimeoutMs', default: '10', parse: seconds(1, 300),
    doc: 'A client must send its request headers within this many seconds (slow-loris protection); then 408.' },
  { name: 'HTTP_REQUEST_TIMEOUT_SECONDS', key: 'requestTimeoutMs', default: '30', parse: seconds(1, 3600),
    doc: 'A client must send its whole request, body included, within this many seconds; then 408.' },
  { name: 'EXTRA_SCOPES', key: 'extraScopes', default: '', parse: scopeList,
    doc: 'More scopes tokens may carry, for your own services (comma- or space-separated, e.g. reports:read).' },
  { name: 'MAX_TOKEN_LIFETIME', key: 'maxTokenLifetimeSeconds', default: '', parse: optional(duration(60, 315_360_000)),
    doc: 'Longest a token may live (e.g. 90d, 12h, or seconds); tokens minted without expiry get it. Empty: no cap.' },
  { name: 'MAX_TOKENS_PER_USER', key: 'maxTokensPerUser', default: '100', parse: integer(1, 100_000),
    doc: 'Active tokens a user may hold at once, admin mints included; tokens being rotated out do not count.' },
  { name: 'MAX_ADMIN_KEYS', key: 'maxAdminKeys', default: '100', parse: integer(1, 10_000),
    doc: 'Active named admin keys (POST /admin/admin-keys) at once; revoked and expired keys do not count.' },
  { name: 'RATE_LIMIT_PER_MINUTE', key: 'rateLimitPerMinute', default: '600', parse: integer(0, 1_000_000),
    doc: 'Default /v1 requests a minute for new users (each user can have their own; 0 blocks).' },
  { name: 'AUTH_FAILURES_PER_MINUTE', key: 'authFailuresPerMinute', default: '20', parse: integer(1, 10_000_000),
    doc: 'Wrong API or admin keys a client address may send a minute; past it, its unknown keys get 429 without any lookup.' },
  { name: 'ADMIN_RATE_LIMIT_PER_MINUTE', key: 'adminRateLimitPerMinute', default: '1200', parse: integer(1, 1_000_000),
    doc: 'Admin API requests a minute per client address.' },
  { name: 'RATE_LIMIT_STORE', key: 'rateLimitStore', default: 'memory',
    doc: 'Where every rate limit counts: memory (each instance its own), postgres (the DATABASE_URL database) or redis (REDIS_URL), shared by every instance.',
    parse: (raw, name) => ((RATE_LIMIT_STORES as readonly string[]).includes(raw) ? ok(raw as RateLimitStoreKind) : bad(`${name} must be one of ${RATE_LIMIT_STORES.join(', ')}, got "${raw}"`)) },
  { name: 'REDIS_URL', secret: true, key: 'redisUrl', default: '', parse: redisUrl,
    doc: 'redis://[:password@]host:6379[/db] for RATE_LIMIT_STORE=redis (rediss:// for TLS).' },
  { name: 'RATE_LIMIT_STORE_TIMEOUT_MS', key: 'rateLimitStoreTimeoutMs', default: '50', parse: integer(1, 5_000),
    doc: 'Longest a request waits for the shared rate-limit store; slower or down, the instance counts in its own memory until the store answers again.' },
  { name: 'RATE_LIMIT_STORE_PREFIX', key: 'rateLimitStorePrefix', default: 'keyward',
    doc: 'Prefix of the shared store\'s keys; give each keyward deployment that shares one Redis or database its own.',
    parse: (raw, name) => (/^[A-Za-z0-9_.-]{1,64}$/.test(raw) ? ok(raw) : bad(`${name} must be 1 to 64 letters, digits, dots, dashes or underscores, got "${raw}"`)) },
  { name: 'BOT_RETENTION', key: 'botRetentionSeconds', default: '7d', parse: duration(3600, 31_536_000),
    doc: 'How long released and expired bots stay visible before they are deleted (e.g. 7d, 48h).' },
  { name: 'SSO_TRUSTED_PROXIES', key: 'ssoTrustedProxies', default: '', parse: ssoProxies,
    doc: 'Addresses/CIDRs of the oauth2-proxy whose identity headers keyward believes (by connection address). Empty: SSO off.' },
  { name: 'SSO_SHARED_SECRET', secret: true, key: 'ssoSharedSecretDigest', default: '', parse: ssoSecret,
    doc: 'If set (32+ characters), the proxy must also send it in X-Keyward-SSO-Secret.' },
  { name: 'SSO_HEADER_PREFIX', key: 'ssoHeaderPrefix', default: 'X-Forwarded-',
    doc: 'Prefix of the identity headers: X-Forwarded- (oauth2-proxy upstream mode) or X-Auth-Request- (auth_request mode).',
    parse: (raw, name) => (/^[A-Za-z][A-Za-z0-9-]{0,40}$/.test(raw) ? ok(raw) : bad(`${name} must be a header name prefix like X-Forwarded-, got "${raw}"`)) },
  { name: 'SSO_AUTO_PROVISION', key: 'ssoAutoProvision', default: 'off', parse: onOff,
    doc: 'on: a signed-in person with no keyward user gets one; off: only people the admin created (matched by SSO subject or email).' },
  { name: 'SSO_ALLOWED_DOMAINS', key: 'ssoAllowedDomains', default: '', parse: domains,
    doc: 'If set, only people whose email is in one of these domains may use SSO (comma-separated).' },
  { name: 'SSO_ALLOWED_GROUPS', key: 'ssoAllowedGroups', default: '', parse: (raw) => ok(Object.freeze(list(raw))),
    doc: 'If set, only people in at least one of these groups (the proxy\'s groups header) may use SSO.' },
  { name: 'SSO_USER_SCOPES', key: 'ssoUserScopes', default: 'bots:read bots:write', parse: scopeList,
    doc: 'Scopes signed-in people may give the keys they make for themselves.' },
  { name: 'SSO_ADMIN_GROUPS', key: 'ssoAdminGroups', default: '', parse: (raw) => ok(Object.freeze(list(raw))),
    doc: 'Groups (from the proxy\'s groups header) whose members may use /admin without an admin key; needs SSO_TRUSTED_PROXIES. Empty: nobody.' },
  { name: 'SSO_ADMIN_SCOPES', key: 'ssoAdminScopes', default: 'all', parse: adminScopeList,
    doc: 'Admin scopes those people hold (comma- or space-separated), or all.' },
  { name: 'SSO_DEFAULT_MAX_CONCURRENT_BOTS', key: 'ssoDefaultMaxConcurrentBots', default: '3', parse: integer(0, 100_000),
    doc: 'max_concurrent_bots of users created by SSO_AUTO_PROVISION.' },
  { name: 'AUDIT_RETENTION', key: 'auditRetentionSeconds', default: '365d', parse: duration(0, 315_360_000),
    doc: 'How long audit log entries are kept (e.g. 365d); 0 keeps them forever.' },
  { name: 'METRICS_ENABLED', key: 'metricsEnabled', default: 'on', parse: onOff,
    doc: 'off: no /metrics endpoint (404).' },
  { name: 'METRICS_TOKEN', secret: true, key: 'metricsTokenDigest', default: '', parse: ssoSecret,
    doc: 'If set (32+ characters), /metrics needs Authorization: Bearer <METRICS_TOKEN>.' },
  { name: 'METRICS_ALLOWED_IPS', key: 'metricsAllowedIps', default: '127.0.0.0/8, ::1', parse: metricsAddresses,
    doc: 'Addresses/CIDRs that may read /metrics (as TRUST_PROXY reveals them); any: every address, only with METRICS_TOKEN.' },
  { name: 'CREDITS_PER_BOT', key: 'creditsPerBot', default: '0', parse: integer(0, 1_000_000),
    doc: 'Credits each bot start spends from the user\'s balance (402 INSUFFICIENT_CREDITS when short); 0: bots are free.' },
];

/** Pure: reads only the given environment, and reports every problem at once. */
/** Secrets files are a few bytes; anything this large is the wrong file. */
const MAX_SECRET_FILE_BYTES = 64 * 1024;

/**
 * `${name}_FILE`, the convention of Docker and Kubernetes secrets (the postgres image's
 * POSTGRES_PASSWORD_FILE): the value is the file's content, without the line ends that editors and
 * `echo` leave at its end. Undefined: the variable is not read from a file. No message repeats what
 * the file holds.
 */
function secretFromFile(name: string, direct: string | undefined, path: string | undefined): Parsed<string | undefined> {
  const fileName = `${name}_FILE`;
  if (path === undefined || path === '') return ok(undefined);
  if (direct !== undefined && direct !== '') return bad(`${name} and ${fileName} are both set; set only one of them`);
  let content: string;
  try {
    const bytes = readFileSync(path);
    if (bytes.length > MAX_SECRET_FILE_BYTES) return bad(`${fileName} names ${path}, which is larger than ${MAX_SECRET_FILE_BYTES / 1024} KiB: not a secrets file`);
    content = bytes.toString('utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'unknown error';
    return bad(`${fileName} names ${path}, which cannot be read (${code})`);
  }
  const value = content.replace(/[\r\n]+$/, '');
  if (value === '') return bad(`${fileName} names ${path}, which is empty`);
  return ok(value);
}

export function loadConfig(env: Record<string, string | undefined>): Config {
  const problems: string[] = [];
  const values: Partial<Record<keyof Config, unknown>> = {};
  for (const variable of VARIABLES) {
    let raw = env[variable.name];
    if (variable.secret) {
      const fromFile = secretFromFile(variable.name, raw, env[`${variable.name}_FILE`]);
      if (!fromFile.ok) {
        problems.push(fromFile.problem);
        continue;
      }
      raw = fromFile.value ?? raw;
    }
    if (raw === undefined || (raw === '' && variable.default === undefined)) {
      if (variable.default === undefined) {
        problems.push(`${variable.name} is required; ${variable.name === 'ADMIN_API_TOKEN' ? HOW_TO_MAKE_A_KEY : variable.doc}`);
        continue;
      }
    }
    const parsed = variable.parse(raw ?? (variable.default as string), variable.name);
    if (parsed.ok) values[variable.key] = parsed.value;
    else problems.push(parsed.problem);
  }
  // SSO users can only be given scopes that exist.
  const known = ['bots:read', 'bots:write', 'tokens:read', 'tokens:write', ...((values.extraScopes as string[] | undefined) ?? [])];
  const unknownSso = ((values.ssoUserScopes as string[] | undefined) ?? []).filter((scope) => !known.includes(scope));
  if (unknownSso.length > 0) problems.push(`SSO_USER_SCOPES names scopes that are neither built in nor in EXTRA_SCOPES: ${unknownSso.join(', ')}`);
  const next = values.adminKeyNextDigest as Buffer | null | undefined;
  if (next && values.adminKeyDigest && next.equals(values.adminKeyDigest as Buffer)) {
    problems.push('ADMIN_API_TOKEN_NEXT is the same as ADMIN_API_TOKEN; set it to the new key (`openssl rand -hex 32`) or leave it empty');
  }
  // Identity headers are believed only from the proxy: without one, nobody could be an SSO admin.
  if (((values.ssoAdminGroups as string[] | undefined) ?? []).length > 0 && ((values.ssoTrustedProxies as string[] | undefined) ?? []).length === 0) {
    problems.push('SSO_ADMIN_GROUPS needs SSO_TRUSTED_PROXIES: identity headers are believed only from the sign-in proxy');
  }
  if (values.rateLimitStore === 'postgres' && !values.databaseUrl) {
    problems.push('RATE_LIMIT_STORE=postgres counts in the PostgreSQL database: set DATABASE_URL, or use redis or memory');
  }
  if (values.rateLimitStore === 'redis' && !values.redisUrl) {
    problems.push('RATE_LIMIT_STORE=redis needs REDIS_URL, e.g. redis://127.0.0.1:6379');
  }
  if ((values.headersTimeoutMs as number) > (values.requestTimeoutMs as number)) {
    problems.push('HTTP_HEADERS_TIMEOUT_SECONDS must not be longer than HTTP_REQUEST_TIMEOUT_SECONDS: the headers are part of the request');
  }
  // Metrics open to every address must at least need a token.
  if (values.metricsAllowedIps === null && values.metricsTokenDigest === null && values.metricsEnabled === true) {
    problems.push('METRICS_ALLOWED_IPS=any needs METRICS_TOKEN: otherwise anyone could read /metrics');
  }
  if (problems.length > 0) throw new ConfigError(problems);
  return Object.freeze(values as unknown as Config);
}
