import type { Migration, MigrationProvider } from 'kysely';
import * as initial from './20261123-0001-initial';
import * as tokenLifecycle from './20261123-0002-token-lifecycle';
import * as botsAndRateLimits from './20261123-0003-bots-and-rate-limits';
import * as ssoSubject from './20261123-0004-sso-subject';
import * as auditUsageCredits from './20261123-0005-audit-usage-credits';
import * as adminKeys from './20261204-0006-admin-keys';
import * as rateLimits from './20261204-0007-rate-limits';
import * as externalId from './20261204-0008-external-id';
import * as tokenMetadata from './20261204-0009-token-metadata';
import * as tokenRateLimit from './20261204-0010-token-rate-limit';

/**
 * A static list rather than a folder scan: it works the same under ts-jest, from dist/ and in the
 * Docker image. Append new migrations here; never edit one that has landed.
 */
const MIGRATIONS: Record<string, Migration> = {
  '20261123-0001-initial': initial,
  '20261123-0002-token-lifecycle': tokenLifecycle,
  '20261123-0003-bots-and-rate-limits': botsAndRateLimits,
  '20261123-0004-sso-subject': ssoSubject,
  '20261123-0005-audit-usage-credits': auditUsageCredits,
  '20261204-0006-admin-keys': adminKeys,
  '20261204-0007-rate-limits': rateLimits,
  '20261204-0008-external-id': externalId,
  '20261204-0009-token-metadata': tokenMetadata,
  '20261204-0010-token-rate-limit': tokenRateLimit,
};

export const migrationProvider: MigrationProvider = {
  getMigrations: async () => MIGRATIONS,
};

export const LATEST_MIGRATION = Object.keys(MIGRATIONS).sort().at(-1) as string;
