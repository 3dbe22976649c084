// The ceiling on this machine: node:http itself, one route, the same constant JSON body as the
// Express baseline, serialised per request as Express does.
const { createServer } = require('node:http');
const body = { user: { id: 1, email: 'bench@example.com', name: 'Bench', max_concurrent_bots: 3 } };
const server = createServer((req, res) => {
  if (req.url !== '/v1/me') {
    res.writeHead(404).end();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(200, { 'Content-Type': 'application/json; charset=utf-8', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
});
server.listen(Number(process.env.PORT), '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
