import { createReadStream } from 'node:fs';
import { pipeline } from 'node:stream/promises';
import { type Db, sqliteHandle, writeTransaction } from '../../db/database';
import { auditContextOf, recordAudit } from '../audit/audit';
import type { Clock } from '../clock';
import { AppError, unavailable } from '../http/errors';
import type { Handler } from '../http/operations';
import type { Logger } from '../logger';
import { BackupError, backupToTempFile } from './backup';

/**
 * POST /admin/backup: an online copy into a private temporary file, streamed and then deleted. Handing
 * out the whole database is itself an audited event.
 */
export function backupHandlers(db: Db, clock: Clock, logger: Logger): Record<string, Handler> {
  return {
    createBackup: async (req, res) => {
      const handle = sqliteHandle(db);
      // A PostgreSQL deployment has no file to hand out: as if the route did not exist, and why.
      if (!handle) throw new AppError(404, 'NOT_FOUND', 'This keyward uses PostgreSQL: back it up with pg_dump, not through keyward.');
      let backup;
      try {
        backup = await backupToTempFile(handle, { now: clock.now() });
      } catch (err) {
        if (!(err instanceof BackupError)) throw err;
        logger.error({ err }, 'backup failed');
        throw unavailable('The backup could not be written; see the server log.');
      }
      try {
        const now = clock.now().toISOString();
        await writeTransaction(db, (trx) =>
          recordAudit(trx, auditContextOf(res), now, { action: 'backup.downloaded', details: { bytes: backup.bytes, schema_version: backup.schemaVersion } }),
        );
        const name = backup.path.split('/').pop()!;
        res.status(200);
        res.setHeader('Content-Type', 'application/vnd.sqlite3');
        res.setHeader('Content-Length', String(backup.bytes));
        res.setHeader('Content-Disposition', `attachment; filename="${name}"`);
        res.setHeader('X-Keyward-Schema-Version', backup.schemaVersion);
        await pipeline(createReadStream(backup.path), res);
      } finally {
        await backup.remove();
      }
    },
  };
}
