import { spawnSync } from 'node:child_process';
import { join } from 'node:path';

/**
 * `npm run test:system` starts with scripts/check-system.js: on a machine without the system parts it
 * must stop at once with one message naming what is missing and how to get it.
 */

const SCRIPT = join(__dirname, '..', 'scripts', 'check-system.js');

test('without the filesystem tools, a PostgreSQL or a Redis server it names each, with the apt-get line, and exits 1', () => {
  const result = spawnSync(process.execPath, [SCRIPT], {
    // No PATH: mkfs.ext4, chattr, losetup, mount… cannot be found. Port 1: nothing listens there.
    env: { PATH: '', KEYWARD_TEST_POSTGRES_URL: 'postgres://nobody:pw@127.0.0.1:1/none', KEYWARD_TEST_REDIS_URL: 'redis://:secret@127.0.0.1:1' },
    encoding: 'utf8',
    timeout: 20_000,
  });
  expect(result.status).toBe(1);
  expect(result.stdout).toBe('');
  const message = result.stderr;
  expect(message).toMatch(/^test:system cannot run: missing /);
  expect(message).toContain('mkfs.ext4, e2fsck and chattr (storage faults)');
  expect(message).toContain('losetup and fallocate (storage faults)');
  expect(message).toContain('a PostgreSQL server at postgres://…@127.0.0.1:1/none');
  expect(message).not.toContain('nobody:pw');
  expect(message).toContain('a Redis server at redis://…@127.0.0.1:1');
  expect(message).not.toContain('secret');
  expect(message).toMatch(/\nOn Debian or Ubuntu: apt-get install -y [a-z0-9 -]*\be2fsprogs\b[a-z0-9 -]*\butil-linux\b/);
  expect(message).toContain('npm test runs everything else and needs only Node.');
  if (process.getuid?.() !== 0) expect(message).toContain('Run it as root');
});
