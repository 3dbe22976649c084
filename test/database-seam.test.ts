import { migrateToLatest, openSqlite, type Storage } from '../db/database';
import { findCredentialBySelector } from '../src/tokens/tokens.repository';

let storage: Storage;
beforeEach(async () => {
  storage = openSqlite(':memory:');
  await migrateToLatest(storage.db);
  const now = '2026-01-01T00:00:00.000Z';
  const { id } = await storage.db
    .insertInto('users')
    .values({ email: 'a@example.com', email_lower: 'a@example.com', name: null, max_concurrent_bots: 3, data: null, created_at: now, updated_at: now })
    .returning('id')
    .executeTakeFirstOrThrow();
  await storage.db
    .insertInto('tokens')
    .values({ user_id: id, name: null, selector: 'AAAAAAAAAAAA', secret_hash: 'x', last4: 'abcd', environment: 'live', scopes: 'bots:read', created_at: now })
    .execute();
});
afterEach(() => storage.close());

describe('the credential lookup (hotRead)', () => {
  test('finds a token by selector, with its user, and nothing for an unknown selector', async () => {
    expect(await findCredentialBySelector(storage.db, 'AAAAAAAAAAAA')).toMatchObject({ token_id: 1, email: 'a@example.com', revoked_at: null });
    expect(await findCredentialBySelector(storage.db, 'BBBBBBBBBBBB')).toBeUndefined();
  });

  test('never reads a transaction that has not committed: it waits for it, then sees its result', async () => {
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    let inside!: () => void;
    const started = new Promise<void>((resolve) => (inside = resolve));
    const transaction = storage.db.transaction().execute(async (trx) => {
      await trx.updateTable('tokens').set({ revoked_at: '2026-01-01T00:00:01.000Z' }).where('id', '=', 1).execute();
      inside();
      await held;
      throw new Error('roll back');
    });
    await started;
    let answered = false;
    const lookup = findCredentialBySelector(storage.db, 'AAAAAAAAAAAA').then((row) => {
      answered = true;
      return row;
    });
    await new Promise((resolve) => setTimeout(resolve, 50));
    // The revocation is uncommitted: the lookup must neither see it nor answer before the transaction ends.
    expect(answered).toBe(false);
    release();
    await expect(transaction).rejects.toThrow('roll back');
    expect((await lookup)?.revoked_at).toBeNull();
  });
});
