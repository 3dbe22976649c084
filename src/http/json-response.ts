import type { ServerResponse } from 'node:http';

/**
 * A JSON answer written with Node's own response: what Express's `res.json` sends (the same
 * Content-Type and Content-Length; HEAD gets the head only), without its `send` path.
 */
export function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.statusCode = status;
  res.setHeader('Content-Type', 'application/json; charset=utf-8');
  res.setHeader('Content-Length', Buffer.byteLength(text));
  res.end(text);
}
