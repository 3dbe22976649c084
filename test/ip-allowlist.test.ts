import { IpAllowlist, MAX_ALLOWED_IPS, normalizeClientIp, parseAllowlist } from '../src/tokens/ip-allowlist';

/**
 * The allowlist's two questions, answered from one representation: is this client inside the list
 * (every request of a token that has one), and is this list inside that one (a key minting a key may
 * not widen its own allowlist). Canonical forms matter because they are what is stored and shown.
 */

const canonical = (...entries: string[]) => {
  const parsed = parseAllowlist(entries);
  if (!parsed.ok) throw new Error(`expected ${JSON.stringify(entries)} to parse, got invalid ${JSON.stringify(parsed.invalid)}`);
  return parsed.entries;
};

const allowlist = (...entries: string[]) => new IpAllowlist(canonical(...entries));

describe('parseAllowlist: canonical forms', () => {
  test.each([
    // IPv4
    ['10.1.2.3', '10.1.2.3'],
    ['10.1.2.3/32', '10.1.2.3'],
    ['10.1.2.3/8', '10.0.0.0/8'],
    ['192.168.17.200/20', '192.168.16.0/20'],
    ['0.0.0.0/0', '0.0.0.0/0'],
    ['203.0.113.77/0', '0.0.0.0/0'],
    [' 10.0.0.1 ', '10.0.0.1'],
    // IPv6: lower case, leading zeros dropped, the longest run of zero groups as "::" (RFC 5952)
    ['2001:DB8::1', '2001:db8::1'],
    ['2001:0db8:0000:0000:0000:0000:0000:0001', '2001:db8::1'],
    ['2001:db8:0:0:1:0:0:1', '2001:db8::1:0:0:1'],
    ['2001:db8:0:1:0:0:0:1', '2001:db8:0:1::1'],
    ['1:0:1:0:1:0:1:0', '1:0:1:0:1:0:1:0'],
    ['2001:db8:0:1:1:1:1:1', '2001:db8:0:1:1:1:1:1'],
    ['1:0:0:0:0:0:0:0', '1::'],
    ['::1', '::1'],
    ['::1/128', '::1'],
    ['::', '::'],
    ['::/0', '::/0'],
    ['2001:db8:abcd:12::1/32', '2001:db8::/32'],
    ['2001:db8::1/64', '2001:db8::/64'],
    ['2001:db8::ff/127', '2001:db8::fe/127'],
    // An embedded IPv4 address stands for the last two groups.
    ['64:ff9b::1.2.3.4', '64:ff9b::102:304'],
    ['::1.2.3.4', '::102:304'],
    ['1:2:3:4:5:6:1.2.3.4', '1:2:3:4:5:6:102:304'],
    ['1::5:6:1.2.3.4', '1::5:6:102:304'],
    // A zone id names an interface, not an address: the address is what the list keeps.
    ['fe80::1%eth0', 'fe80::1'],
    ['fe80::%eth0/10', 'fe80::/10'],
    // An IPv4-mapped address is the IPv4 address, because that is how such a client is matched.
    ['::ffff:1.2.3.4', '1.2.3.4'],
    ['::FFFF:10.9.8.7', '10.9.8.7'],
  ])('%s is stored as %s', (entry, expected) => {
    expect(canonical(entry)).toEqual([expected]);
  });

  test('folds duplicates, including different spellings of the same range, keeping first-seen order', () => {
    expect(
      canonical('10.1.2.3/8', '2001:db8::/32', '10.0.0.0/8', '10.200.0.1/8', '2001:0DB8:0:0::/32', '::ffff:127.0.0.1', '127.0.0.1/32', '::1/128', '::1'),
    ).toEqual(['10.0.0.0/8', '2001:db8::/32', '127.0.0.1', '::1']);
  });

  test('does not merge a narrower range into a wider one: the admin\'s entries stay recognisable', () => {
    expect(canonical('10.0.0.0/8', '10.1.0.0/16')).toEqual(['10.0.0.0/8', '10.1.0.0/16']);
  });

  test('an empty input is an empty list (the API refuses it before it gets here)', () => {
    expect(parseAllowlist([])).toEqual({ ok: true, entries: [] });
  });

  test('MAX_ALLOWED_IPS is the documented 100', () => {
    expect(MAX_ALLOWED_IPS).toBe(100);
  });
});

describe('parseAllowlist: invalid entries', () => {
  test.each([
    '1.2.3.4/33',
    '10.0.0.1/',
    'nope',
    '1.2.3',
    '::g',
    '2001:db8::/129',
    '1.2.3.4/08x',
    '1.2.3.4/-1',
    '1.2.3.4/ 8',
    '1.2.3.4/1e1',
    '1.2.3.4/8/8',
    '/8',
    '',
    '256.1.1.1',
    '1.2.3.04',
    '1.2.3.4.5',
    '1:2:3:4:5:6:7:8:9',
    '2001:db8::1::2',
    'fe80::1%',
    'localhost',
    '10.0.0.0 - 10.255.255.255',
  ])('%j is refused', (entry) => {
    expect(parseAllowlist([entry])).toEqual({ ok: false, invalid: [entry] });
  });

  test('names every bad entry, as given, and stores nothing when any is bad', () => {
    expect(parseAllowlist(['10.0.0.1', 'nope', '::1', '1.2.3.4/33', ' bad '])).toEqual({ ok: false, invalid: ['nope', '1.2.3.4/33', ' bad '] });
  });
});

describe('IpAllowlist.allows', () => {
  test('an address entry allows exactly that address', () => {
    const list = allowlist('10.1.2.3', '2001:db8::5');
    expect(list.allows('10.1.2.3')).toBe(true);
    expect(list.allows('10.1.2.4')).toBe(false);
    expect(list.allows('2001:db8::5')).toBe(true);
    expect(list.allows('2001:0db8:0:0:0:0:0:5')).toBe(true);
    expect(list.allows('2001:db8::6')).toBe(false);
  });

  test('an IPv4 range allows its first and last address and nothing either side', () => {
    const list = allowlist('192.168.16.0/20');
    expect(list.allows('192.168.16.0')).toBe(true);
    expect(list.allows('192.168.31.255')).toBe(true);
    expect(list.allows('192.168.15.255')).toBe(false);
    expect(list.allows('192.168.32.0')).toBe(false);
  });

  test('an IPv6 range allows what is inside it', () => {
    const list = allowlist('2001:db8::/32');
    expect(list.allows('2001:db8::1')).toBe(true);
    expect(list.allows('2001:db8:ffff:ffff:ffff:ffff:ffff:ffff')).toBe(true);
    expect(list.allows('2001:db9::1')).toBe(false);
    expect(list.allows('::1')).toBe(false);
  });

  test('/0 allows its whole family and only that family', () => {
    expect(allowlist('0.0.0.0/0').allows('203.0.113.9')).toBe(true);
    expect(allowlist('0.0.0.0/0').allows('::1')).toBe(false);
    expect(allowlist('::/0').allows('2001:db8::1')).toBe(true);
    expect(allowlist('::/0').allows('127.0.0.1')).toBe(false);
  });

  test('/32 and /128 are single addresses', () => {
    expect(allowlist('10.0.0.1/32').allows('10.0.0.1')).toBe(true);
    expect(allowlist('10.0.0.1/32').allows('10.0.0.2')).toBe(false);
    expect(allowlist('::1/128').allows('::1')).toBe(true);
    expect(allowlist('::1/128').allows('::2')).toBe(false);
  });

  test('"::" is the unspecified address only, not everything', () => {
    expect(allowlist('::').allows('::')).toBe(true);
    expect(allowlist('::').allows('::1')).toBe(false);
  });

  test('an IPv4 client on a dual-stack socket (::ffff:a.b.c.d) is matched as the IPv4 address', () => {
    const list = allowlist('127.0.0.0/8');
    expect(list.allows('::ffff:127.0.0.1')).toBe(true);
    expect(list.allows('::FFFF:127.9.9.9')).toBe(true);
    expect(list.allows('::ffff:10.0.0.1')).toBe(false);
    // And an IPv4 entry is not matched by an unrelated IPv6 client whose low bits happen to agree.
    expect(list.allows('::7f00:1')).toBe(false);
  });

  test('an IPv4-mapped entry allows the plain IPv4 client too', () => {
    expect(allowlist('::ffff:10.0.0.7').allows('10.0.0.7')).toBe(true);
  });

  test('a client address with a zone id is matched on its address', () => {
    expect(allowlist('fe80::/10').allows('fe80::1%eth0')).toBe(true);
    expect(allowlist('fe80::1').allows('fe80::1%eth0')).toBe(true);
    expect(allowlist('fe80::1').allows('fe80::2%eth0')).toBe(false);
  });

  test('embedded IPv4 notation in the client address is the same address as the hex groups', () => {
    expect(allowlist('64:ff9b::/96').allows('64:ff9b::192.0.2.1')).toBe(true);
    expect(allowlist('64:ff9b::c000:201').allows('64:ff9b::192.0.2.1')).toBe(true);
  });

  test('a client address that is not an address is never allowed', () => {
    const list = allowlist('0.0.0.0/0', '::/0');
    for (const client of ['', 'unknown', '1.2.3', '::g', 'localhost', '10.0.0.1, 10.0.0.2']) expect([client, list.allows(client)]).toEqual([client, false]);
  });

  test('the constructor refuses a stored entry that is not an address (corrupt data is loud, not "allow")', () => {
    expect(() => new IpAllowlist(['10.0.0.0/8', 'garbage'])).toThrow(/garbage/);
  });
});

describe('IpAllowlist.covers', () => {
  test('a narrower range, or an address, inside a wider range is covered', () => {
    const list = allowlist('10.0.0.0/8', '2001:db8::/32');
    expect(list.covers(['10.1.0.0/16'])).toBe(true);
    expect(list.covers(['10.1.2.3'])).toBe(true);
    expect(list.covers(['10.0.0.0/8'])).toBe(true);
    expect(list.covers(['2001:db8:1::/48', '10.255.255.255'])).toBe(true);
  });

  test('a wider range is not covered by the narrower one inside it', () => {
    expect(allowlist('10.1.0.0/16').covers(['10.0.0.0/8'])).toBe(false);
    expect(allowlist('10.1.2.3').covers(['10.1.2.0/24'])).toBe(false);
    expect(allowlist('2001:db8::/32').covers(['2001::/16'])).toBe(false);
  });

  test('every entry must be covered, not just one', () => {
    expect(allowlist('10.0.0.0/8').covers(['10.1.0.0/16', '192.168.0.0/16'])).toBe(false);
  });

  test('a range may be covered by several entries only if one of them holds it whole', () => {
    // 10.0.0.0/23 is exactly 10.0.0.0/24 + 10.0.1.0/24, but no single entry holds it; refusing is the
    // safe answer and the one keyward gives.
    expect(allowlist('10.0.0.0/24', '10.0.1.0/24').covers(['10.0.0.0/23'])).toBe(false);
  });

  test('the other family is never covered', () => {
    expect(allowlist('0.0.0.0/0').covers(['::1'])).toBe(false);
    expect(allowlist('::/0').covers(['127.0.0.1'])).toBe(false);
    expect(allowlist('::/0').covers(['::ffff:127.0.0.1'])).toBe(false);
  });

  test('an IPv4-mapped entry counts as the IPv4 address', () => {
    expect(allowlist('127.0.0.0/8').covers(['::ffff:127.0.0.1'])).toBe(true);
  });

  test('an entry that is not an address is never covered', () => {
    expect(allowlist('0.0.0.0/0', '::/0').covers(['nope'])).toBe(false);
  });

  test('an empty list is covered (it allows nothing more)', () => {
    expect(allowlist('10.0.0.0/8').covers([])).toBe(true);
  });
});

describe('normalizeClientIp', () => {
  test('unwraps an IPv4-mapped client address and leaves every other address alone', () => {
    expect(normalizeClientIp('::ffff:127.0.0.1')).toBe('127.0.0.1');
    expect(normalizeClientIp('127.0.0.1')).toBe('127.0.0.1');
    expect(normalizeClientIp('::1')).toBe('::1');
    expect(normalizeClientIp('2001:db8::1')).toBe('2001:db8::1');
  });
});

/**
 * BUG: only one spelling of an IPv4-mapped address (`::ffff:` followed by dotted quad) is recognised
 * as IPv4. Every other spelling of the same IPv6 address is stored as an IPv6 entry that can never
 * match, because the client it is meant for is matched as IPv4; and a mapped CIDR is refused outright
 * because its /96..128 prefix is checked against IPv4's 32 bits.
 */
describe('IPv4-mapped addresses in every spelling', () => {
  test.each([
    ['0:0:0:0:0:ffff:1.2.3.4', '1.2.3.4'],
    ['::ffff:102:304', '1.2.3.4'],
    ['0:0:0:0:0:FFFF:0102:0304', '1.2.3.4'],
  ])('%s is the IPv4 address %s, and allows that client', (entry, expected) => {
    expect(parseAllowlist([entry])).toEqual({ ok: true, entries: [expected] });
    const list = new IpAllowlist([entry]);
    expect(list.allows(expected)).toBe(true);
    expect(list.allows(`::ffff:${expected}`)).toBe(true);
  });

  test.each([
    ['::ffff:10.0.0.0/104', '10.0.0.0/8'],
    ['::ffff:1.2.3.4/128', '1.2.3.4'],
    ['::ffff:192.168.1.77/120', '192.168.1.0/24'],
  ])('the mapped range %s is the IPv4 range %s', (entry, expected) => {
    expect(parseAllowlist([entry])).toEqual({ ok: true, entries: [expected] });
  });
});
