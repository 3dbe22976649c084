import express, { type Express } from 'express';
import type { Db } from '../db/database';
import { requireAdmin } from './auth/admin-auth';
import { TokenVerifier } from './auth/token-verifier';
import { requireUser } from './auth/user-auth';
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
  /** Last use of each token, written in batches; server.ts stops it (flushing) before closing the database. */
  readonly lastUse: LastUseRecorder;
  readonly bots: BotsService;
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
  const limits = new RateLimits(config);
  const lastUse = new LastUseRecorder({ db, clock, logger });
  const bots = new BotsService({ db, clock, logger, retentionSeconds: config.botRetentionSeconds });
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
  const verifier = new TokenVerifier({ db, clock, hasher, tokenPrefix: config.tokenPrefix, cacheSize: config.verifyCacheSize, lastUse });

  const app = express() as unknown as KeywardApp;
  Object.defineProperties(app, { verifier: { value: verifier }, lastUse: { value: lastUse }, bots: { value: bots } });
  app.disable('x-powered-by');
  // API responses are not cacheable resources; skipping ETags also saves hashing every body.
  app.set('etag', false);
  app.set('trust proxy', config.trustProxy);

  app.use(requestContext(logger, securityHeaders(), () => lifecycle.draining));

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
    },
    { admin: requireAdmin(config.adminKeyDigest, limits), user: requireUser(verifier, limits), sso: requireSso(config, sso, limits) },
  );
  app.use(router);
  app.use(docsRouter(doc));
  app.use(ssoPageRouter());
  // Only once start-up can no longer throw: a failed createApp leaves no timer behind.
  lastUse.start();
  bots.start();

  app.use(() => {
    throw new AppError(404, 'NOT_FOUND', 'No such route.');
  });
  app.use(errorHandler(logger));
  return app;
}
