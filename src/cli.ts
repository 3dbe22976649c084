#!/usr/bin/env node
import { existsSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { BackupError, backupToFile, restoreFromFile } from './backup/backup';
import { VARIABLES } from './config';
import { MigrateDataError, migrateData } from './migrate-data/migrate-data';

/**
 * The `keyward` command for operators. It needs the database path (or, for migrate-data, the two
 * databases) only: not ADMIN_API_TOKEN nor the rest of the configuration, so a backup job can run with
 * nothing but DATABASE_PATH.
 */

const USAGE = `usage: keyward <command> [options]

commands:
  backup <file> [--database <path>] [--force]
      Copy the database to <file> (mode 0600) while keyward keeps running.
      Refuses to replace an existing <file> unless --force.
  restore <file> [--database <path>]
      Check the backup <file>, keep the current database as <path>.before-restore-<UTC time>,
      and put the backup in its place. Stop keyward first; restore refuses while it runs.
  migrate-data --from <sqlite file> --to <postgres url>
      Copy a SQLite deployment into an empty PostgreSQL database (creating keyward's tables), then
      compare every row of both. Stop keyward first; the SQLite file is only read.
  help
      Show this text.

The database is --database, else DATABASE_PATH (from the environment or ./.env), else ./data/keyward.db.
Exit status: 0 done, 1 failed (stderr says why in one line), 2 usage error.
`;

class UsageError extends Error {}

const DEFAULT_DATABASE_PATH = VARIABLES.find((v) => v.name === 'DATABASE_PATH')?.default ?? './data/keyward.db';

function databasePath(flag: string | undefined): string {
  if (flag !== undefined) {
    if (flag.trim() === '') throw new UsageError('--database must not be empty');
    return flag;
  }
  // Like the server: variables already in the environment win over .env.
  if (existsSync('.env')) {
    try {
      process.loadEnvFile('.env');
    } catch (err) {
      throw new BackupError(`cannot read .env: ${err instanceof Error ? err.message : String(err)}`);
    }
  }
  // A PostgreSQL deployment has no file to copy; its own tools do this job.
  if ((process.env.DATABASE_URL ?? '').trim() !== '') {
    throw new BackupError('this keyward uses PostgreSQL (DATABASE_URL is set): back it up with pg_dump and restore with pg_restore');
  }
  const fromEnv = process.env.DATABASE_PATH;
  if (fromEnv === undefined) return DEFAULT_DATABASE_PATH;
  if (fromEnv.trim() === '') throw new BackupError('DATABASE_PATH must not be empty');
  return fromEnv.trim();
}

function parse(args: string[], withForce: boolean) {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      database: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
      ...(withForce ? { force: { type: 'boolean' as const } } : {}),
    },
  });
  if (values.help) return { help: true as const };
  if (positionals.length !== 1 || positionals[0]!.trim() === '') throw new UsageError('name exactly one backup file');
  return { help: false as const, file: positionals[0]!, database: values.database as string | undefined, force: values.force === true };
}

async function run(argv: string[]): Promise<number> {
  const [command, ...args] = argv;
  if (command === 'help' || command === '--help' || command === '-h') {
    process.stdout.write(USAGE);
    return 0;
  }
  if (command === 'backup') {
    const options = parse(args, true);
    if (options.help) return run(['help']);
    const database = databasePath(options.database);
    const result = await backupToFile(database, options.file, { overwrite: options.force });
    process.stdout.write(`backed up ${database} to ${result.path}: ${result.bytes} bytes, schema ${result.schemaVersion}\n`);
    return 0;
  }
  if (command === 'restore') {
    const options = parse(args, false);
    if (options.help) return run(['help']);
    const database = databasePath(options.database);
    const r = await restoreFromFile(options.file, database);
    const previous = r.previousPath === null ? 'there was no database before' : `the previous database is kept as ${r.previousPath}`;
    const unchecked = r.checkedStopped ? '' : ' (it was not a readable database, so make sure keyward was stopped)';
    const pending = r.migrationsPending ? '; keyward applies its newer migrations when it starts' : '';
    process.stdout.write(`restored ${options.file} (${r.bytes} bytes, schema ${r.schemaVersion}) to ${database}; ${previous}${unchecked}${pending}\n`);
    return 0;
  }
  if (command === 'migrate-data') {
    const { values, positionals } = parseArgs({ args, allowPositionals: true, options: { from: { type: 'string' }, to: { type: 'string' }, help: { type: 'boolean', short: 'h' } } });
    if (values.help) return run(['help']);
    if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"`);
    if (!values.from || !values.to) throw new UsageError('migrate-data needs --from <sqlite file> and --to <postgres url>');
    if (!/^postgres(ql)?:\/\//.test(values.to)) throw new UsageError('--to must be a postgres:// URL');
    const result = await migrateData(values.from, values.to);
    const counts = Object.entries(result.rows).map(([table, n]) => `${n} ${table}`).join(', ');
    // The URL is not repeated: it may hold a password.
    process.stdout.write(`migrated ${values.from} (schema ${result.schemaVersion}) to PostgreSQL: ${counts}; every row checked\n`);
    return 0;
  }
  throw new UsageError(command === undefined ? 'name a command' : `unknown command "${command}"`);
}

function isUsageError(err: unknown): boolean {
  if (err instanceof UsageError) return true;
  const code = typeof err === 'object' && err !== null && 'code' in err ? String(err.code) : '';
  return code.startsWith('ERR_PARSE_ARGS_');
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const label = argv[0] === 'backup' || argv[0] === 'restore' || argv[0] === 'migrate-data' ? `keyward ${argv[0]}` : 'keyward';
  try {
    process.exitCode = await run(argv);
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    if (isUsageError(err)) {
      process.stderr.write(`${label}: ${message}\n\n${USAGE}`);
      process.exitCode = 2;
    } else if (err instanceof BackupError || err instanceof MigrateDataError) {
      process.stderr.write(`${label}: ${message}\n`);
      process.exitCode = 1;
    } else {
      // Still one line: an operator's cron mail should say what failed, not where in the code.
      process.stderr.write(`${label}: unexpected error: ${message.replace(/\s+/g, ' ')}\n`);
      process.exitCode = 1;
    }
  }
}

void main();
