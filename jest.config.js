/**
 * `npm test` runs every suite on SQLite and needs nothing installed; `npm run test:postgres` sets
 * KEYWARD_TEST_POSTGRES_URL and runs the same suites with each test app on a PostgreSQL schema of its
 * own. A few files only mean something on one of the two, so each run leaves them out instead of
 * skipping tests inside them:
 * - on PostgreSQL only: several server processes on one database, and moving a SQLite file into one;
 * - on SQLite only: real server processes on a SQLite file, testing the file itself (SIGKILL and
 *   integrity_check, a full or read-only disk, a corrupt file) or the HTTP server in front of it
 *   (SIGTERM, slow and oversized requests); in the PostgreSQL run they would only run again unchanged.
 */
const POSTGRES_ONLY = ['postgres-instances', 'migrate-data'];
const SQLITE_ONLY = ['crash-safety', 'storage-faults', 'graceful-shutdown', 'http-limits'];
const onPostgres = Boolean(process.env.KEYWARD_TEST_POSTGRES_URL);
const leftOut = onPostgres ? SQLITE_ONLY : POSTGRES_ONLY;

/** @type {import('jest').Config} */
module.exports = {
  preset: 'ts-jest',
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  testPathIgnorePatterns: ['/node_modules/', ...leftOut.map((name) => `/test/${name}\\.test\\.ts$`)],
  testTimeout: 30000,
  transform: { '^.+\\.ts$': 'ts-jest' },
};
