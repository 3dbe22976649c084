#!/usr/bin/env node
// `npm run test:system` starts here: it names, in one message, every system part the system tests
// need that this machine lacks, and how to get it, instead of letting a dozen tests fail one by one.
const { accessSync, constants } = require('node:fs');
const { Client } = require('pg');

// The default is test:postgres's own, read from its script so that there is one.
const POSTGRES_URL =
  process.env.KEYWARD_TEST_POSTGRES_URL || /KEYWARD_TEST_POSTGRES_URL:-([^}]+)\}/.exec(require('../package.json').scripts['test:postgres'])[1];

function executable(path) {
  try {
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

function onPath(name) {
  return (process.env.PATH || '').split(':').some((dir) => dir && executable(`${dir}/${name}`));
}

async function postgresAnswers() {
  let client;
  try {
    // Inside the try: a malformed URL throws here, and its message may quote the password.
    client = new Client({ connectionString: POSTGRES_URL, connectionTimeoutMillis: 3000 });
    await client.connect();
    await client.query('select 1');
    return true;
  } catch {
    return false;
  } finally {
    await client?.end().catch(() => {});
  }
}

const REDIS_URL = process.env.KEYWARD_TEST_REDIS_URL || 'redis://127.0.0.1:6379';

/** A PING over a plain socket: whether a Redis answers at REDIS_URL. */
function redisAnswers() {
  return new Promise((resolve) => {
    let url;
    try {
      url = new URL(REDIS_URL);
    } catch {
      return resolve(false);
    }
    const socket = require('node:net').connect(Number(url.port || 6379), url.hostname, () => socket.write('PING\r\n'));
    socket.setTimeout(3000, () => (socket.destroy(), resolve(false)));
    socket.once('data', (d) => (socket.destroy(), resolve(d.toString().startsWith('+PONG'))));
    socket.once('error', () => resolve(false));
  });
}

async function main() {
  const packages = [];
  const problems = [];
  const need = (ok, what, pkg) => {
    if (ok) return;
    problems.push(what);
    if (pkg && !packages.includes(pkg)) packages.push(pkg);
  };
  // The tests use these exact paths: Debian's packages put them there.
  need(executable('/usr/bin/chromium'), '/usr/bin/chromium (the browser tests)', 'chromium');
  need(executable('/usr/sbin/nginx'), '/usr/sbin/nginx (forward auth and the SSO page behind nginx)', 'nginx-light');
  need(executable('/usr/bin/caddy'), '/usr/bin/caddy (forward auth behind Caddy)', 'caddy');
  need(onPath('mkfs.ext4') && onPath('chattr') && onPath('e2fsck'), 'mkfs.ext4, e2fsck and chattr (storage faults)', 'e2fsprogs');
  need(onPath('losetup') && onPath('fallocate'), 'losetup and fallocate (storage faults)', 'util-linux');
  need(onPath('mount') && onPath('umount'), 'mount and umount (storage faults)', 'mount');
  need(executable('/usr/bin/redis-server'), '/usr/bin/redis-server (the rate-limit store outage test starts one of its own)', 'redis-server');
  const root = process.getuid?.() === 0;
  need(root, 'root: the storage-fault tests mount tmpfs and ext4 loop devices and set chattr +i');
  need(await postgresAnswers(), `a PostgreSQL server at ${POSTGRES_URL.replace(/\/\/[^@/]*@/, '//…@')} (set KEYWARD_TEST_POSTGRES_URL; the role must be able to create schemas)`);
  need(await redisAnswers(), `a Redis server at ${REDIS_URL.replace(/\/\/[^@/]*@/, '//…@')} (set KEYWARD_TEST_REDIS_URL, or start one: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no)`);

  if (problems.length === 0) {
    console.log('test:system: chromium, nginx, caddy, redis, filesystem tools, root, PostgreSQL and Redis are here');
    return;
  }
  const lines = [`test:system cannot run: missing ${problems.join('; ')}.`];
  if (packages.length > 0) lines.push(`On Debian or Ubuntu: apt-get install -y ${packages.join(' ')}`);
  if (!root) lines.push('Run it as root (sudo -E npm run test:system).');
  lines.push('npm test runs everything else and needs only Node.');
  console.error(lines.join('\n'));
  process.exit(1);
}

main().catch((error) => {
  console.error(`test:system: ${error.message}`);
  process.exit(1);
});
