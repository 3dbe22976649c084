import type { IncomingMessage, RequestListener, ServerResponse } from 'node:http';
import express from 'express';
import type { Db } from '../db/database';
import { AdminKeyVerifier } from './admin-keys/admin-key-verifier';
import { adminKeysHandlers } from './admin-keys/admin-keys.routes';
import { AdminKeysService } from './admin-keys/admin-keys.service';
import { requireAdmin } from './auth/admin-auth';
import { TokenVerifier } from './auth/token-verifier';
import { requireUser } from './auth/user-auth';
import { type Clock, systemClock } from './clock';
import type { Config } from './config';
import { docsRouter } from './docs/docs.routes';
import { healthHandlers, type Lifecycle } from './health/health.routes';
import { errorHandler, errorResponder } from './http/error-handler';
import { AppError } from './http/errors';
import { parseQuery, verificationLane } from './http/lane';
import { mountOperations, operationRunners } from './http/operations';
import { requestPipeline, trustFunction } from './http/request-context';
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
import { staticPage } from './http/static-page';
import { requireSso, ssoAdmins } from './sso/sso-auth';
import { ssoHandlers } from './sso/sso.routes';
import { SsoService } from './sso/sso.service';
import { meHandlers } from './me/me.routes';
import { listOperations, loadSpec } from './openapi/spec';
import { type Counters, openCounters } from './rate-limit/counters';
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
  /** Where the rate limits count; default: what RATE_LIMIT_STORE names. */
  rateLimitCounters?: Counters;
}

/** The request listener (the verification lane, then Express) and the parts tests and shutdown reach. */
export interface KeywardApp extends RequestListener<typeof IncomingMessage, typeof ServerResponse> {
  readonly verifier: TokenVerifier;
  /** Last use of each token, written in batches. */
  readonly lastUse: LastUseRecorder;
  /** The same for named admin keys. */
  readonly adminLastUse: LastUseRecorder;
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
  const lastUse = new LastUseRecorder({ db, clock, logger, table: 'tokens' });
  const adminLastUse = new LastUseRecorder({ db, clock, logger, table: 'admin_keys' });
  const usageRecorder = new UsageRecorder({ db, clock, logger });
  const usage = new UsageService({ db, clock, recorder: usageRecorder });
  const audit = new AuditLog({ db, clock, logger, retentionSeconds: config.auditRetentionSeconds });
  // An address blocked for wrong keys keeps trying: those attempts are failures too (code RATE_LIMITED).
  const counters = deps.rateLimitCounters ?? openCounters(config, logger);
  const limits = new RateLimits(config, (ip) => audit.authFailed(ip, 'RATE_LIMITED'), counters);
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
  const adminKeyVerifier = new AdminKeyVerifier({ db, clock, hasher, tokenPrefix: config.tokenPrefix, lastUse: adminLastUse });
  const adminKeys = new AdminKeysService({ db, clock, hasher, tokenPrefix: config.tokenPrefix, lastUse: adminLastUse, maxAdminKeys: config.maxAdminKeys });
  const metrics = new Metrics({ db, databasePath: config.databasePath, verifier: verifier.stats, limits, activeBots: () => bots.activeTotal() });

  const app = express();
  app.disable('x-powered-by');
  // API responses are not cacheable resources; skipping ETags also saves hashing every body.
  app.set('etag', false);
  // The request context and the lane apply the same two rules; Express gets them as functions.
  app.set('trust proxy', trustFunction(config.trustProxy));
  app.set('query parser', parseQuery);

  // Failed authentication reaches the audit log aggregated (see AuditLog.authFailed), never per attempt.
  const auditFailures: RequestObserver = (outcome) => {
    if (outcome.errorCode !== null && AUTH_FAILURE_CODES.has(outcome.errorCode)) audit.authFailed(outcome.ip, outcome.errorCode);
  };
  const rootKeys = config.adminKeyNextDigest ? [config.adminKeyDigest, config.adminKeyNextDigest] : [config.adminKeyDigest];
  const observers = config.metricsEnabled ? [metrics.observe, auditFailures] : [auditFailures];
  const beginRequest = requestPipeline({
    logger,
    headers: securityHeaders(),
    isDraining: () => lifecycle.draining,
    observers,
    secretDigests: rootKeys,
    trustProxy: config.trustProxy,
  });
  const respondWithError = errorResponder(logger);

  const doc = loadSpec();
  const operations = listOperations(doc);
  // A route may only require a built-in scope: EXTRA_SCOPES are for the self-hoster's services.
  for (const op of operations) {
    if (op.auth === 'user' && op.requiredScope !== null && !(BUILT_IN_SCOPES as readonly string[]).includes(op.requiredScope)) {
      throw new Error(`openapi: ${op.operationId} requires unknown scope ${op.requiredScope}`);
    }
  }
  // Handlers that need only Node's request and response: the verification lane answers their operations.
  const lean = { ...meHandlers(), ...forwardAuthHandlers() };
  const runners = operationRunners(
    operations,
    {
      ...lean,
      ...healthHandlers(db, lifecycle, () => counters.state()),
      ...usersHandlers(users),
      ...tokensHandlers(tokens),
      ...selfServiceTokensHandlers(tokens),
      ...botsHandlers(bots),
      ...adminBotsHandlers(bots, users),
      ...ssoHandlers(tokens, config.ssoUserScopes),
      ...auditHandlers(audit),
      ...usageHandlers(usage, users),
      ...creditsHandlers(users, config.creditsPerBot),
      ...metricsHandlers(metrics),
      ...backupHandlers(db, clock, logger),
      ...adminKeysHandlers(adminKeys),
    },
    {
      admin: requireAdmin(rootKeys, adminKeyVerifier, limits, ssoAdmins(config)),
      user: requireUser(verifier, limits),
      sso: requireSso(config, sso, limits),
      metrics: requireMetrics(config),
    },
  );
  const lane = verificationLane(runners, Object.keys(lean), respondWithError);
  const router = express.Router();
  mountOperations(router, runners);
  app.use(router);
  app.use(docsRouter(doc));
  app.use(staticPage('/sso', 'sso'));
  app.use(staticPage('/console', 'console'));
  // Only once start-up can no longer throw: a failed createApp leaves no timer behind.
  lastUse.start();
  adminLastUse.start();
  usageRecorder.start();
  audit.start();
  bots.start();
  counters.start();

  app.use(() => {
    throw new AppError(404, 'NOT_FOUND', 'No such route.');
  });
  app.use(errorHandler(logger));

  // One pipeline: every request gets its context first, then the lane takes what it serves and
  // Express the rest, through the same runners, guards and error responder.
  const listener: RequestListener = (req, res) => {
    const refused = beginRequest(req, res);
    if (refused) respondWithError(refused, req, res);
    else if (!lane(req, res)) app(req, res);
  };
  const stopBackground = async () => {
    bots.stop();
    await Promise.all([lastUse.stop(), adminLastUse.stop(), usageRecorder.stop(), audit.stop(), counters.close()]);
  };
  return Object.assign(listener, { verifier, lastUse, adminLastUse, usage: usageRecorder, bots, audit, stopBackground });
}
