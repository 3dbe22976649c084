#!/usr/bin/env node
// First-run helper for `npm run quickstart`: writes a .env (mode 0600) with a fresh random admin key,
// unless .env exists or ADMIN_API_TOKEN is already set. The key is never printed.
const { existsSync, writeFileSync } = require('node:fs');
const { randomBytes } = require('node:crypto');

if (process.env.ADMIN_API_TOKEN) {
  console.log('setup: ADMIN_API_TOKEN is set in the environment; leaving .env alone.');
} else if (existsSync('.env')) {
  console.log('setup: .env exists; leaving it alone.');
} else {
  writeFileSync('.env', `ADMIN_API_TOKEN=${randomBytes(32).toString('hex')}\n`, { mode: 0o600 });
  console.log('setup: wrote .env with a new random ADMIN_API_TOKEN (readable by you only).');
  console.log("setup: to use it from another shell: export ADMIN_TOKEN=$(sed -n 's/^ADMIN_API_TOKEN=//p' .env)");
}
