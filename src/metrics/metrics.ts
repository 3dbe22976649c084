import { createHash, timingSafeEqual } from 'node:crypto';
import { statSync } from 'node:fs';
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';
import type { Db } from '../../db/database';
import type { VerifierStats } from '../auth/token-verifier';
import type { Config } from '../config';
import { AppError } from '../http/errors';
import type { Guard, Handler } from '../http/operations';
import { clientIpOf, type RequestObserver } from '../http/request-context';
import type { RateLimits } from '../rate-limit/rate-limits';
import { compiledAllowlist, normalizeClientIp } from '../tokens/ip-allowlist';

/** Which part of keyward a route belongs to, for the authentication outcome metric. */
function apiOf(route: string): string {
  if (route.startsWith('/v1/') || route === '/auth/verify') return 'user';
  if (route.startsWith('/admin/')) return 'admin';
  if (route.startsWith('/sso/')) return 'sso';
  return 'other';
}

/** Authentication outcomes: `ok`, or the error code of a refusal that happened before the handler. */
const AUTH_CODES = new Set([
  'AUTHENTICATION_REQUIRED',
  'INVALID_API_KEY',
  'API_KEY_EXPIRED',
  'API_KEY_REVOKED',
  'INVALID_ADMIN_KEY',
  'INSUFFICIENT_SCOPE',
  'FORBIDDEN_IP',
  'USER_DISABLED',
  'SSO_ACCESS_DENIED',
  'CSRF_CHECK_FAILED',
  'RATE_LIMITED',
]);

export interface MetricsSources {
  db: Db;
  databasePath: string;
  verifier: VerifierStats;
  limits: RateLimits;
  activeBots: () => Promise<number>;
}

/**
 * Prometheus metrics on their own registry (nothing global, so every app in a test process has its
 * own). Requests are counted as they finish; the rest is read from its owner when scraped, so the hot
 * path pays one counter and one histogram update.
 */
export class Metrics {
  readonly registry = new Registry();
  private readonly requests: Counter<'route' | 'method' | 'status'>;
  private readonly duration: Histogram<'route' | 'method'>;
  private readonly auth: Counter<'api' | 'outcome'>;

  constructor(sources: MetricsSources) {
    const registers = [this.registry];
    collectDefaultMetrics({ register: this.registry });
    this.requests = new Counter({
      name: 'keyward_http_requests_total',
      help: 'HTTP requests by route template, method and status.',
      labelNames: ['route', 'method', 'status'],
      registers,
    });
    this.duration = new Histogram({
      name: 'keyward_http_request_duration_seconds',
      help: 'Time from a request arriving to its response being sent, by route template and method.',
      labelNames: ['route', 'method'],
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers,
    });
    this.auth = new Counter({
      name: 'keyward_auth_outcomes_total',
      help: 'Authentication outcomes by API (user, admin, sso): ok, or the refusal\'s error code.',
      labelNames: ['api', 'outcome'],
      registers,
    });
    const fromTotal = (name: string, help: string, read: () => number) =>
      new Counter({
        name,
        help,
        registers,
        collect() {
          this.reset();
          this.inc(read());
        },
      });
    fromTotal('keyward_verify_cache_hits_total', 'Key verifications answered from the in-memory cache (no bcrypt).', () => sources.verifier.cacheHits);
    fromTotal('keyward_verify_cache_misses_total', 'Key verifications the cache could not answer.', () => sources.verifier.cacheMisses);
    fromTotal('keyward_bcrypt_checks_total', 'bcrypt comparisons run (a key\'s first use in this process, or a wrong secret).', () => sources.verifier.bcryptChecks);
    new Counter({
      name: 'keyward_rate_limit_rejections_total',
      help: 'Requests refused by a rate limit: user (per-user /v1 limit), token (a key\'s own limit), admin (per-address admin limit), auth_failures (too many wrong keys from an address).',
      labelNames: ['limit'],
      registers,
      collect() {
        this.reset();
        for (const [limit, n] of Object.entries(sources.limits.rejections)) this.inc({ limit }, n);
      },
    });
    new Gauge({
      name: 'keyward_rate_limit_store_up',
      help: 'Whether the rate limits count in the store RATE_LIMIT_STORE names (label store): 1 yes, 0 no (the shared store does not answer and each instance counts its own). Always 1 for memory.',
      labelNames: ['store'],
      registers,
      collect() {
        this.reset();
        const state = sources.limits.counters.state();
        this.set({ store: state.kind }, state.up ? 1 : 0);
      },
    });
    new Gauge({
      name: 'keyward_active_bots',
      help: 'Bots holding a slot right now, all users.',
      registers,
      async collect() {
        this.set(await sources.activeBots());
      },
    });
    new Gauge({
      name: 'keyward_database_size_bytes',
      help: 'Size of the SQLite database file and its write-ahead log.',
      registers,
      collect() {
        this.set(fileSize(sources.databasePath) + fileSize(`${sources.databasePath}-wal`));
      },
    });
  }

  readonly observe: RequestObserver = (outcome) => {
    // Paths that matched no route are one label value, so scanners cannot grow the label set.
    const route = outcome.route ?? 'unmatched';
    this.requests.inc({ route, method: outcome.method, status: String(outcome.status) });
    this.duration.observe({ route, method: outcome.method }, outcome.seconds);
    if (outcome.route === null) return;
    const api = apiOf(outcome.route);
    if (api === 'other') return;
    // Auth runs first, so any other answer below 500 (a 404, a 409) came after the caller was let in.
    if (outcome.errorCode !== null && AUTH_CODES.has(outcome.errorCode)) this.auth.inc({ api, outcome: outcome.errorCode });
    else if (outcome.status < 500) this.auth.inc({ api, outcome: 'ok' });
  };
}

function fileSize(path: string): number {
  try {
    return statSync(path).size;
  } catch {
    return 0;
  }
}

/**
 * The one auth path for /metrics: off means the route does not exist; otherwise the caller's address
 * must be allowed and, when METRICS_TOKEN is set, the Bearer token must match.
 */
export function requireMetrics(config: Config): Guard {
  const allowed = config.metricsAllowedIps === null ? null : compiledAllowlist(JSON.stringify(config.metricsAllowedIps));
  return (req, res) => {
    if (!config.metricsEnabled) throw new AppError(404, 'NOT_FOUND', 'No such route.');
    const ip = clientIpOf(res);
    if (allowed && !allowed.allows(ip)) throw new AppError(403, 'FORBIDDEN_IP', 'This address may not read the metrics (METRICS_ALLOWED_IPS).', { ip: normalizeClientIp(ip) });
    if (config.metricsTokenDigest) {
      const header = req.headers.authorization ?? '';
      const sent = /^bearer /i.test(header) ? header.slice(7).trim() : '';
      if (!timingSafeEqual(createHash('sha256').update(sent).digest(), config.metricsTokenDigest)) {
        throw new AppError(401, 'AUTHENTICATION_REQUIRED', 'The metrics need Authorization: Bearer <METRICS_TOKEN>.', undefined, { 'WWW-Authenticate': 'Bearer realm="keyward-metrics"' });
      }
    }
  };
}

export function metricsHandlers(metrics: Metrics): Record<string, Handler> {
  return {
    getMetrics: async (_req, res) => {
      const body = await metrics.registry.metrics();
      res.type(metrics.registry.contentType).send(body);
    },
  };
}
