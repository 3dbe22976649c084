/**
 * Three runs of one suite, told apart by environment variables:
 * - `npm test`: every test that needs only Node, on SQLite: supertest against createApp(), real
 *   server processes, SIGKILL and SIGTERM, fuzzing, SQLite files in temp dirs. Nothing to install,
 *   no root.
 * - `npm run test:system` (KEYWARD_TEST_GROUP=system): the tests that drive a real system part:
 *   Chromium, nginx, Caddy, and the storage faults that need root (tmpfs, ext4 loop devices,
 *   chattr), after the PostgreSQL run. scripts/check-system.js says first what is missing.
 * - `npm run test:postgres` (KEYWARD_TEST_POSTGRES_URL): the same suites with each test app on a
 *   PostgreSQL schema of its own, system tests included.
 * A few files only mean something on one database, so each run leaves them out instead of skipping
 * tests inside them:
 * - on PostgreSQL only: several server processes on one database, and moving a SQLite file into one;
 * - on SQLite only: real server processes on a SQLite file, testing the file itself (SIGKILL and
 *   integrity_check, a full or read-only disk, a corrupt file) or the HTTP server in front of it
 *   (SIGTERM, slow and oversized requests); in the PostgreSQL run they would only run again unchanged.
 */
const SYSTEM = ['docs-browser', 'sso-page-browser', 'console-browser', 'forward-auth-nginx', 'forward-auth-caddy', 'storage-faults'];
const POSTGRES_ONLY = ['postgres-instances', 'migrate-data', 'rate-limit-stores'];
const SQLITE_ONLY = ['crash-safety', 'storage-faults', 'graceful-shutdown', 'http-limits'];

const onPostgres = Boolean(process.env.KEYWARD_TEST_POSTGRES_URL);
const systemRun = process.env.KEYWARD_TEST_GROUP === 'system';
if (process.env.KEYWARD_TEST_GROUP && !systemRun) {
  throw new Error(`KEYWARD_TEST_GROUP must be empty or "system", not ${JSON.stringify(process.env.KEYWARD_TEST_GROUP)}`);
}
if (systemRun && onPostgres) throw new Error('KEYWARD_TEST_GROUP=system is the SQLite run; npm run test:postgres is the PostgreSQL one');

const file = (name) => `/test/${name}\\.test\\.ts$`;

/** @type {import('jest').Config} */
module.exports = {
  preset: 'ts-jest',
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  ...(systemRun
    ? { testRegex: SYSTEM.map(file), testMatch: undefined }
    : { testPathIgnorePatterns: ['/node_modules/', ...(onPostgres ? SQLITE_ONLY : [...POSTGRES_ONLY, ...SYSTEM]).map(file)] }),
  testTimeout: 30000,
  transform: { '^.+\\.ts$': 'ts-jest' },
};
