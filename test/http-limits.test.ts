import { randomBytes } from 'node:crypto';
import { connect, type Socket } from 'node:net';
import { assertBuilt, makeTempDir, removeTempDirs, startServer, stopAllServers, type ServerProcess } from './helpers/server-process';

/**
 * Slow and oversized requests against the real server process, over raw sockets (an HTTP client
 * library would not send a request this badly): headers or bodies trickled in (slow loris) are cut
 * off with 408 after HTTP_HEADERS_TIMEOUT_SECONDS / HTTP_REQUEST_TIMEOUT_SECONDS, headers over 16 KiB
 * get 431, bodies over 64 KiB get 413, each in the one error envelope, and the server keeps serving
 * everyone else while slow clients hold connections.
 */

const adminKey = randomBytes(32).toString('hex');
const HEADERS_TIMEOUT_S = 1;
const REQUEST_TIMEOUT_S = 2;
let server: ServerProcess;

beforeAll(async () => {
  assertBuilt();
  server = await startServer({
    env: {
      ADMIN_API_TOKEN: adminKey,
      DATABASE_PATH: `${makeTempDir('http-limits')}/keyward.db`,
      PORT: '0',
      HOST: '127.0.0.1',
      BCRYPT_ROUNDS: '4',
      HTTP_HEADERS_TIMEOUT_SECONDS: String(HEADERS_TIMEOUT_S),
      HTTP_REQUEST_TIMEOUT_SECONDS: String(REQUEST_TIMEOUT_S),
    },
  });
});
afterAll(async () => {
  await stopAllServers();
  removeTempDirs();
});

interface RawAnswer {
  status: number;
  headers: Record<string, string>;
  body: string;
  /** From the first byte sent until the server closed the connection. */
  elapsedMs: number;
}

/**
 * Opens a socket, writes `parts` one after another with `gapMs` between them (stopping once the
 * server has closed), and collects whatever comes back until the server closes the connection.
 * Bounded: a server that never closes fails the test after `limitMs`.
 */
function rawExchange(parts: Array<string | Buffer>, options: { gapMs?: number; limitMs?: number } = {}): Promise<RawAnswer> {
  const { gapMs = 0, limitMs = 15_000 } = options;
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const socket: Socket = connect(server.port, '127.0.0.1');
    const chunks: Buffer[] = [];
    let closed = false;
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`the server kept the connection open for more than ${limitMs} ms`));
    }, limitMs);
    socket.on('data', (chunk) => chunks.push(chunk));
    socket.on('error', () => undefined); // a reset after the answer is the server hanging up: fine
    socket.on('close', () => {
      closed = true;
      clearTimeout(timer);
      const text = Buffer.concat(chunks).toString('utf8');
      const [head = '', ...rest] = text.split('\r\n\r\n');
      const [statusLine = '', ...headerLines] = head.split('\r\n');
      const headers: Record<string, string> = {};
      for (const line of headerLines) {
        const at = line.indexOf(':');
        if (at > 0) headers[line.slice(0, at).trim().toLowerCase()] = line.slice(at + 1).trim();
      }
      resolve({ status: Number(statusLine.split(' ')[1] ?? 0), headers, body: rest.join('\r\n\r\n'), elapsedMs: Date.now() - started });
    });
    socket.on('connect', async () => {
      for (const part of parts) {
        if (closed) return;
        socket.write(part);
        if (gapMs > 0) await new Promise((r) => setTimeout(r, gapMs));
      }
    });
  });
}

function expectEnvelope(answer: RawAnswer, status: number, code: string): void {
  expect({ status: answer.status, code: JSON.parse(answer.body || '{}').error?.code }).toEqual({ status, code });
  const body = JSON.parse(answer.body) as { error: Record<string, unknown> };
  expect(Object.keys(body.error).sort()).toEqual(['code', 'details', 'message', 'request_id']);
  expect(body.error.request_id).toBe(answer.headers['x-request-id']);
  expect(answer.headers['content-type']).toMatch(/^application\/json/);
}

/** A header line every 300 ms, forever (as far as the server can tell). */
const trickledHeaders = (path: string) => [
  `GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\n`,
  ...Array.from({ length: 60 }, (_, i) => `X-Slow-${i}: ${'a'.repeat(10)}\r\n`),
];

describe('slow clients (slow loris)', () => {
  test('headers that never finish are cut off with 408 after HTTP_HEADERS_TIMEOUT_SECONDS', async () => {
    const answer = await rawExchange(trickledHeaders('/v1/me'), { gapMs: 300 });
    expectEnvelope(answer, 408, 'REQUEST_TIMEOUT');
    expect(answer.headers.connection).toBe('close');
    // Node checks deadlines once a second: the cut comes between the timeout and a second or two after.
    expect(answer.elapsedMs).toBeGreaterThanOrEqual(HEADERS_TIMEOUT_S * 1000 - 100);
    expect(answer.elapsedMs).toBeLessThan(HEADERS_TIMEOUT_S * 1000 + 4_000);
  });

  test('a body that never finishes is cut off after HTTP_REQUEST_TIMEOUT_SECONDS, and nothing is created', async () => {
    const body = JSON.stringify({ email: 'slow-body@example.com' });
    const head =
      'POST /admin/users HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n' +
      `X-Admin-API-Key: ${adminKey}\r\nContent-Length: ${body.length}\r\n\r\n`;
    // One byte of the body every 300 ms: the whole body would take far longer than the request timeout.
    const answer = await rawExchange([head, ...body.split('')], { gapMs: 300 });
    expect(answer.elapsedMs).toBeGreaterThanOrEqual(REQUEST_TIMEOUT_S * 1000 - 100);
    expect(answer.elapsedMs).toBeLessThan(REQUEST_TIMEOUT_S * 1000 + 4_000);
    expectEnvelope(answer, 408, 'REQUEST_TIMEOUT');
    const users = (await (await fetch(`${server.baseUrl}/admin/users`, { headers: { 'X-Admin-API-Key': adminKey } })).json()) as { data: unknown[] };
    expect(users.data).toEqual([]);
  });

  test('a body shorter than its Content-Length is not waited for beyond the request timeout', async () => {
    const head =
      'POST /admin/users HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n' +
      `X-Admin-API-Key: ${adminKey}\r\nContent-Length: 1000\r\n\r\n{"email":`;
    const answer = await rawExchange([head]);
    expectEnvelope(answer, 408, 'REQUEST_TIMEOUT');
    expect(answer.elapsedMs).toBeLessThan(REQUEST_TIMEOUT_S * 1000 + 4_000);
  });

  test('while 50 slow clients hold connections, everyone else is served at once', async () => {
    const slow = Array.from({ length: 50 }, () => rawExchange(trickledHeaders('/healthz'), { gapMs: 300 }));
    await new Promise((r) => setTimeout(r, 300));
    const started = Date.now();
    for (let i = 0; i < 5; i++) {
      const res = await fetch(`${server.baseUrl}/healthz`);
      expect(res.status).toBe(200);
    }
    expect(Date.now() - started).toBeLessThan(HEADERS_TIMEOUT_S * 1000);
    const answers = await Promise.all(slow);
    expect(answers.map((a) => a.status)).toEqual(Array(50).fill(408));
  });
});

describe('oversized requests', () => {
  test('headers over 16 KiB get 431 in the envelope', async () => {
    const answer = await rawExchange([`GET /v1/me HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ${'b'.repeat(17 * 1024)}\r\n\r\n`]);
    expectEnvelope(answer, 431, 'PAYLOAD_TOO_LARGE');
  });

  test('a body over 64 KiB gets 413, whether its Content-Length says so or it is chunked', async () => {
    const big = JSON.stringify({ email: 'big@example.com', name: 'n'.repeat(70 * 1024) });
    const declared = await fetch(`${server.baseUrl}/admin/users`, {
      method: 'POST',
      headers: { 'X-Admin-API-Key': adminKey, 'Content-Type': 'application/json' },
      body: big,
    });
    expect(declared.status).toBe(413);
    expect(((await declared.json()) as { error: { code: string } }).error.code).toBe('PAYLOAD_TOO_LARGE');

    const chunked = await rawExchange([
      'POST /admin/users HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n' +
        `X-Admin-API-Key: ${adminKey}\r\nTransfer-Encoding: chunked\r\n\r\n`,
      ...Array.from({ length: 10 }, () => `1c00\r\n${'x'.repeat(0x1c00)}\r\n`),
      '0\r\n\r\n',
    ]);
    expectEnvelope(chunked, 413, 'PAYLOAD_TOO_LARGE');
  });

  test('a Content-Length far beyond the limit is refused before any of the body is read', async () => {
    const answer = await rawExchange([
      'POST /admin/users HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n' +
        `X-Admin-API-Key: ${adminKey}\r\nContent-Length: 10000000000\r\n\r\n{`,
    ]);
    expectEnvelope(answer, 413, 'PAYLOAD_TOO_LARGE');
    expect(answer.elapsedMs).toBeLessThan(REQUEST_TIMEOUT_S * 1000);
  });
});

test('a request refused before its body arrived is answered at once and its connection closed', async () => {
  const answer = await rawExchange([
    'POST /admin/users HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n' +
      'X-Admin-API-Key: not-the-key\r\nContent-Length: 5000\r\n\r\n{',
  ]);
  expectEnvelope(answer, 401, 'INVALID_ADMIN_KEY');
  expect(answer.headers.connection).toBe('close');
  expect(answer.elapsedMs).toBeLessThan(REQUEST_TIMEOUT_S * 1000);
});
