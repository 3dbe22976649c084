import express, { type Express } from 'express';
import type { Db } from '../db/database';
import { requireAdmin } from './auth/admin-auth';
import { TokenVerifier } from './auth/token-verifier';
import { requireClientAddress, requireUser } from './auth/user-auth';
import { type Clock, systemClock } from './clock';
import type { Config } from './config';
import { docsRouter } from './docs/docs.routes';
import { healthHandlers, type Lifecycle } from './health/health.routes';
import { errorHandler } from './http/error-handler';
import { AppError } from './http/errors';
import { mountOperations } from './http/operations';
import { requestContext } from './http/request-context';
import { securityHeaders } from './http/security-headers';
import { adminBotsHandlers, botsHandlers } from './bots/bots.routes';
import { BotsService } from './bots/bots.service';
import { forwardAuthHandlers } from './forward-auth/forward-auth.routes';
import { createLogger, type Logger } from './logger';
import { auditHandlers } from './audit/audit.routes';
import { backupHandlers } from './backup/backup.routes';
import { AUTH_FAILURE_CODES, AuditLog } from './audit/audit.service';
import { creditsHandlers } from './credits/credits.routes';
import type { RequestObserver } from './http/request-context';
import { Metrics, metricsHandlers, requireMetrics } from './metrics/metrics';
import { UsageRecorder, UsageService } from './usage/usage';
import { usageHandlers } from './usage/usage.routes';
import { requireSso } from './sso/sso-auth';
import { ssoPageRouter } from './sso/sso-page';
import { ssoHandlers } from './sso/sso.routes';
import { SsoService } from './sso/sso.service';
import { meHandlers } from './me/me.routes';
import { listOperations, loadSpec } from './openapi/spec';
import { RateLimits } from './rate-limit/rate-limits';
import { bcryptHasher, type SecretHasher } from './tokens/secret-hasher';
import { LastUseRecorder } from './tokens/last-use';
import { BUILT_IN_SCOPES, scopeCatalog } from './tokens/scopes';
import { selfServiceTokensHandlers, tokensHandlers } from './tokens/tokens.routes';
import { TokensService } from './tokens/tokens.service';
import { usersHandlers } from './users/users.routes';
import { UsersService } from './users/users.service';

export interface AppDeps {
  config: Config;
  db: Db;
  clock?: Clock;
  hasher?: SecretHasher;
  logger?: Logger;
  lifecycle?: Lifecycle;
}

export interface KeywardApp extends Express {
  readonly verifier: TokenVerifier;
  /** Last use of each token, written in batches. */
  readonly lastUse: LastUseRecorder;
  /** Requests per token and day, written in batches. */
  readonly usage: UsageRecorder;
  readonly bots: BotsService;
  readonly audit: AuditLog;
  /** Stops the timers and writes what is pending (last use, usage, failed sign-ins); before the database closes. */
  stopBackground(): Promise<void>;
}

/**
 * The composition root: config → services → app. It never listens and reads no globals, so tests
 * build the real thing around a fresh database.
 */
export function createApp(deps: AppDeps): KeywardApp {
  const { config, db } = deps;
  const clock = deps.clock ?? systemClock;
  const hasher = deps.hasher ?? bcryptHasher(config.bcryptRounds, config.bcryptConcurrency);
  const logger = deps.logger ?? createLogger(config.logLevel);
  const lifecycle = deps.lifecycle ?? { draining: false };

  const catalog = scopeCatalog(config.extraScopes);
  const lastUse = new LastUseRecorder({ db, clock, logger });
  const usageRecorder = new UsageRecorder({ db, clock, logger });
  const usage = new UsageService({ db, clock, recorder: usageRecorder });
  const audit = new AuditLog({ db, clock, logger, retentionSeconds: config.auditRetentionSeconds });
  // An address blocked for wrong keys keeps trying: those attempts are failures too (code RATE_LIMITED).
  const limits = new RateLimits(config, (ip) => audit.authFailed(ip, 'RATE_LIMITED'));
  const bots = new BotsService({ db, clock, logger, retentionSeconds: config.botRetentionSeconds, creditsPerBot: config.creditsPerBot });
  const sso = new SsoService({
    db,
    clock,
    allowedDomains: config.ssoAllowedDomains,
    allowedGroups: config.ssoAllowedGroups,
    autoProvision: config.ssoAutoProvision,
    defaultMaxConcurrentBots: config.ssoDefaultMaxConcurrentBots,
    defaultRateLimit: config.rateLimitPerMinute,
  });
  const users = new UsersService({ db, clock, defaultRateLimit: config.rateLimitPerMinute, activeBots: (ids) => bots.activeCounts(ids) });
  const tokens = new TokensService({
    db,
    clock,
    hasher,
    tokenPrefix: config.tokenPrefix,
    users,
    lastUse,
    scopeCatalog: catalog,
    maxLifetimeSeconds: config.maxTokenLifetimeSeconds,
    maxTokensPerUser: config.maxTokensPerUser,
  });
  const verifier = new TokenVerifier({ db, clock, hasher, tokenPrefix: config.tokenPrefix, cacheSize: config.verifyCacheSize, lastUse, usage: usageRecorder });
  const metrics = new Metrics({ db, databasePath: config.databasePath, verifier: verifier.stats, limits, activeBots: () => bots.activeTotal() });

  const app = express() as unknown as KeywardApp;
  const stopBackground = async () => {
    bots.stop();
    await Promise.all([lastUse.stop(), usageRecorder.stop(), audit.stop()]);
  };
  Object.defineProperties(app, {
    verifier: { value: verifier },
    lastUse: { value: lastUse },
    usage: { value: usageRecorder },
    bots: { value: bots },
    audit: { value: audit },
    stopBackground: { value: stopBackground },
  });
  app.disable('x-powered-by');
  // API responses are not cacheable resources; skipping ETags also saves hashing every body.
  app.set('etag', false);
  app.set('trust proxy', config.trustProxy);

  // Failed authentication reaches the audit log aggregated (see AuditLog.authFailed), never per attempt.
  const auditFailures: RequestObserver = (outcome) => {
    if (outcome.errorCode !== null && AUTH_FAILURE_CODES.has(outcome.errorCode)) audit.authFailed(outcome.ip, outcome.errorCode);
  };
  const adminKeys = config.adminKeyNextDigest ? [config.adminKeyDigest, config.adminKeyNextDigest] : [config.adminKeyDigest];
  const observers = config.metricsEnabled ? [metrics.observe, auditFailures] : [auditFailures];
  app.use(requestContext(logger, securityHeaders(), () => lifecycle.draining, observers, adminKeys));
  if (config.trustProxy !== false) app.use(requireClientAddress);

  const doc = loadSpec();
  const operations = listOperations(doc);
  // A route may only require a built-in scope: EXTRA_SCOPES are for the self-hoster's services.
  for (const op of operations) {
    if (op.requiredScope !== null && !(BUILT_IN_SCOPES as readonly string[]).includes(op.requiredScope)) {
      throw new Error(`openapi: ${op.operationId} requires unknown scope ${op.requiredScope}`);
    }
  }
  const router = express.Router();
  mountOperations(
    router,
    operations,
    {
      ...healthHandlers(db, lifecycle),
      ...usersHandlers(users),
      ...tokensHandlers(tokens),
      ...selfServiceTokensHandlers(tokens),
      ...botsHandlers(bots),
      ...adminBotsHandlers(bots, users),
      ...meHandlers(),
      ...forwardAuthHandlers(),
      ...ssoHandlers(tokens, config.ssoUserScopes),
      ...auditHandlers(audit),
      ...usageHandlers(usage, users),
      ...creditsHandlers(users, config.creditsPerBot),
      ...metricsHandlers(metrics),
      ...backupHandlers(db, clock, logger),
    },
    {
      admin: requireAdmin(adminKeys, limits),
      user: requireUser(verifier, limits),
      sso: requireSso(config, sso, limits),
      metrics: requireMetrics(config),
    },
  );
  app.use(router);
  app.use(docsRouter(doc));
  app.use(ssoPageRouter());
  // Only once start-up can no longer throw: a failed createApp leaves no timer behind.
  lastUse.start();
  usageRecorder.start();
  audit.start();
  bots.start();

  app.use(() => {
    throw new AppError(404, 'NOT_FOUND', 'No such route.');
  });
  app.use(errorHandler(logger));
  return app;
}
