import { existsSync } from 'node:fs';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { migrateToLatest, openDatabase, type Storage, storageFailureHint } from '../db/database';
import { createApp } from './app';
import { ConfigError, loadConfig } from './config';
import { answerClientError } from './http/client-errors';
import { createLogger } from './logger';

/**
 * The only entry point that touches the outside world: environment, database file, socket, signals.
 */
async function main(): Promise<void> {
  // Variables already in the environment win over .env (Node's loader never overwrites them).
  if (existsSync('.env')) process.loadEnvFile('.env');

  let config;
  try {
    config = loadConfig(process.env);
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`${err.message}\n`);
      process.exit(1);
    }
    throw err;
  }
  const logger = createLogger(config.logLevel);

  let storage: Storage;
  try {
    storage = openDatabase(config);
    await migrateToLatest(storage.db);
  } catch (err) {
    const hint = config.databaseUrl ? undefined : storageFailureHint(err, config.databasePath);
    logger.fatal(
      { err, database: config.databaseUrl ? 'postgres' : config.databasePath },
      hint ? `cannot open or migrate the database: ${hint}; refusing to start` : 'cannot open or migrate the database; refusing to start',
    );
    process.exit(1);
  }

  const lifecycle = { draining: false };
  const app = createApp({ config, db: storage.db, logger, lifecycle });
  const server = createServer(
    {
      // Slow clients cannot hold sockets open forever (slow loris): headers within
      // HTTP_HEADERS_TIMEOUT_SECONDS, the whole request within HTTP_REQUEST_TIMEOUT_SECONDS, then 408.
      headersTimeout: config.headersTimeoutMs,
      requestTimeout: config.requestTimeoutMs,
      // Node checks those deadlines on this interval (30 s by default, which would let a 10 s limit
      // run to 40 s).
      connectionsCheckingInterval: 1_000,
      // Headers beyond 16 KiB are refused with 431 (Node's default, stated here because it is a limit
      // keyward documents).
      maxHeaderSize: 16 * 1024,
      keepAliveTimeout: 5_000,
    },
    app,
  );
  server.listen(config.port, config.host);

  server.on('listening', () => {
    const { address, port } = server.address() as AddressInfo;
    logger.info({ host: address, port, database: config.databaseUrl ? 'postgres' : config.databasePath }, 'keyward listening');
  });
  server.on('clientError', answerClientError);
  // Answers still being made when the signal comes close their connection: a kept-alive one would
  // otherwise sit idle until keepAliveTimeout and hold server.close(), and the exit, that long.
  const inFlight = new Set<ServerResponse>();
  server.on('request', (_req: IncomingMessage, res: ServerResponse) => {
    inFlight.add(res);
    res.once('close', () => inFlight.delete(res));
  });
  server.on('error', (err) => {
    logger.fatal({ err }, 'cannot listen');
    process.exit(1);
  });

  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) return;
    stopping = true;
    logger.info({ signal }, 'shutting down: finishing in-flight requests');
    lifecycle.draining = true;
    for (const res of inFlight) {
      if (!res.headersSent) res.shouldKeepAlive = false;
      // Already told its client the connection stays open: close it once it is idle.
      else res.once('close', () => server.closeIdleConnections());
    }
    const force = setTimeout(() => {
      logger.warn('in-flight requests did not finish in time; closing their connections');
      server.closeAllConnections();
    }, config.shutdownTimeoutMs);
    force.unref();
    server.close(() => {
      clearTimeout(force);
      // Last use, usage and failed sign-ins recorded since the last flush are written before the database closes.
      app
        .stopBackground()
        .then(() => storage.close())
        .then(() => {
          logger.info('stopped');
          process.exit(0);
        })
        .catch((err: unknown) => {
          logger.error({ err }, 'closing the database failed');
          process.exit(1);
        });
    });
    // Idle keep-alive sockets would otherwise hold server.close() open until they time out.
    server.closeIdleConnections();
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

void main();
