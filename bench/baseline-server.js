// The baseline: the same Express as keyward, one route, no middleware, a constant JSON body.
const express = require('express');
const app = express();
const body = { user: { id: 1, email: 'bench@example.com', name: 'Bench', max_concurrent_bots: 3 } };
app.get('/v1/me', (_req, res) => {
  res.json(body);
});
const server = app.listen(Number(process.env.PORT), '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
