import { randomBytes } from 'node:crypto';
import { Client } from 'pg';
import { POSTGRES_URL } from './app';
import { assertBuilt, removeTempDirs } from './server-process';

/** PostgreSQL schemas of their own for tests that start real server processes on one database. */

/**
 * The connection string the servers get: the test database with the schema as search_path, through
 * the `options` startup parameter (node-postgres passes it on; the first test checks it arrives). The
 * schema's name is also the connections' application_name, so pg_stat_activity tells them apart.
 */
export function schemaUrl(schema: string): string {
  const base = POSTGRES_URL ?? '';
  return `${base}${base.includes('?') ? '&' : '?'}options=${encodeURIComponent(`-c search_path=${schema}`)}&application_name=${schema}`;
}


export interface TestSchema {
  readonly name: string;
  /** DATABASE_URL for servers on this schema. */
  readonly url: string;
  /** A query on the test's own connection (not on the schema's search_path: name tables as `${q}.bots`). */
  query<R extends Record<string, unknown> = Record<string, any>>(text: string, params?: unknown[]): Promise<R[]>;
  /** The schema, quoted, to qualify table names with. */
  readonly q: string;
  /** A second connection, for watching while the first is busy. */
  connect(): Promise<Client>;
}

/**
 * A fresh, empty schema for the enclosing describe: created before its tests (with the `pg` client,
 * not by keyward) and dropped with everything in it afterwards, once the servers are gone.
 */
export function useFreshSchema(label: string, stopServers: () => Promise<void>): TestSchema {
  const name = `kw_inst_${label}_${process.pid}_${randomBytes(4).toString('hex')}`;
  let client: Client | undefined;
  const extra: Client[] = [];
  const schema: TestSchema = {
    name,
    url: schemaUrl(name),
    q: `"${name}"`,
    query: async (text, params) => {
      if (!client) throw new Error('the schema is not set up yet');
      return (await client.query(text, params)).rows;
    },
    connect: async () => {
      const c = new Client({ connectionString: POSTGRES_URL });
      await c.connect();
      extra.push(c);
      return c;
    },
  };
  beforeAll(async () => {
    assertBuilt();
    client = new Client({ connectionString: POSTGRES_URL });
    await client.connect();
    await client.query(`create schema "${name}"`);
  });
  afterAll(async () => {
    await stopServers();
    for (const c of extra.splice(0)) await c.end().catch(() => undefined);
    if (client) {
      await client.query(`drop schema if exists "${name}" cascade`);
      await client.end();
    }
    removeTempDirs();
  });
  return schema;
}

