import { createServer, type Server } from 'node:http';
import { connect } from 'node:net';
import type { AddressInfo } from 'node:net';
import { answerClientError } from '../src/http/client-errors';
import { createTestApp, type TestContext } from './helpers/app';

/** Raw bytes in, raw response out: these requests never reach Express. */
function rawExchange(port: number, payload: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1', () => socket.write(payload));
    let out = '';
    socket.on('data', (d) => (out += d.toString()));
    socket.on('close', () => resolve(out));
    socket.on('error', reject);
    socket.setTimeout(5000, () => socket.destroy(new Error('no answer')));
  });
}

function parse(raw: string) {
  const [head, body] = raw.split('\r\n\r\n');
  return { statusLine: head!.split('\r\n')[0], headers: head!, body: JSON.parse(body!) };
}

describe('requests the HTTP parser refuses still get the error envelope', () => {
  let ctx: TestContext;
  let server: Server;
  let port: number;
  beforeAll(async () => {
    ctx = await createTestApp();
    server = createServer(ctx.app);
    server.on('clientError', answerClientError);
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    port = (server.address() as AddressInfo).port;
  });
  afterAll(async () => {
    await new Promise((r) => server.close(r));
    await ctx.close();
  });

  test('headers over 16 KiB get 431 PAYLOAD_TOO_LARGE', async () => {
    const res = parse(await rawExchange(port, `GET /v1/me HTTP/1.1\r\nHost: x\r\nX-API-Key: ${'a'.repeat(20_000)}\r\n\r\n`));
    expect(res.statusLine).toBe('HTTP/1.1 431 Request Header Fields Too Large');
    expect(res.body).toEqual({ error: { code: 'PAYLOAD_TOO_LARGE', message: 'The request headers are larger than 16 KiB.', details: null, request_id: expect.any(String) } });
    expect(res.headers).toContain(`X-Request-Id: ${res.body.error.request_id}`);
  });

  test('bytes that are not HTTP get 400 VALIDATION_ERROR', async () => {
    const res = parse(await rawExchange(port, 'HELLO THERE\r\n\r\n'));
    expect(res.statusLine).toBe('HTTP/1.1 400 Bad Request');
    expect(res.body.error.code).toBe('VALIDATION_ERROR');
  });
});
