import { isIP } from 'node:net';
import { LRUCache } from 'lru-cache';
import { validationError } from '../http/errors';

/**
 * IP allowlists: IPv4/IPv6 addresses and CIDR ranges. One representation (a family, a network as a
 * bigint and a prefix length) serves both questions keyward asks: is this client inside the list (every
 * request of a token that has one), and is this list inside that one (a key minting a key may not
 * widen its own allowlist).
 */
export const MAX_ALLOWED_IPS = 100;

interface Range {
  family: 4 | 6;
  /** The network address, host bits cleared. */
  network: bigint;
  prefix: number;
}

const BITS = { 4: 32, 6: 128 } as const;

function ipv4ToBigInt(address: string): bigint {
  return address.split('.').reduce((acc, part) => (acc << 8n) | BigInt(Number(part)), 0n);
}

/** `address` must have passed net.isIP() === 6. */
function ipv6ToBigInt(address: string): bigint {
  let text = address.split('%')[0]!;
  // An embedded IPv4 address (::ffff:1.2.3.4) stands for the last two groups.
  let v4: bigint | undefined;
  const lastColon = text.lastIndexOf(':');
  if (text.includes('.', lastColon)) {
    v4 = ipv4ToBigInt(text.slice(lastColon + 1));
    text = text.slice(0, lastColon + 1);
    if (!text.endsWith('::')) text = text.slice(0, -1);
  }
  const parse = (s: string) => (s === '' ? [] : s.split(':').map((g) => BigInt(parseInt(g, 16))));
  const [head, rest] = text.split('::') as [string, string | undefined];
  let groups = parse(head);
  if (rest !== undefined) {
    const right = parse(rest);
    const fill = (v4 === undefined ? 8 : 6) - groups.length - right.length;
    groups = [...groups, ...Array<bigint>(fill).fill(0n), ...right];
  }
  if (v4 !== undefined) groups.push(v4 >> 16n, v4 & 0xffffn);
  return groups.reduce((acc, g) => (acc << 16n) | g, 0n);
}

const MAPPED_V4 = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i;

/**
 * An IPv4 client reaches a dual-stack socket as ::ffff:a.b.c.d; logs, errors and last use show it as
 * the IPv4 address it is.
 */
export function normalizeClientIp(address: string): string {
  const mapped = MAPPED_V4.exec(address);
  return mapped ? mapped[1]! : address;
}

function toRange(entry: string): Range | undefined {
  const [address, bits, ...extra] = entry.split('/');
  if (extra.length > 0 || address === undefined) return undefined;
  const family = isIP(address);
  if (family !== 4 && family !== 6) return undefined;
  const width: number = BITS[family];
  let prefix = width;
  if (bits !== undefined) {
    if (!/^\d{1,3}$/.test(bits)) return undefined;
    prefix = Number(bits);
    if (prefix > width) return undefined;
  }
  let value = family === 4 ? ipv4ToBigInt(address) : ipv6ToBigInt(address);
  // An IPv4-mapped IPv6 address or range (::ffff:0:0/96 and inside it), however it is spelt, is the
  // IPv4 address or range it maps: that is how IPv4 clients of a dual-stack socket are matched.
  if (family === 6 && prefix >= 96 && value >> 32n === 0xffffn) {
    value &= 0xffffffffn;
    const v4Prefix = prefix - 96;
    const shift = BigInt(32 - v4Prefix);
    return { family: 4, network: (value >> shift) << shift, prefix: v4Prefix };
  }
  const shift = BigInt(width - prefix);
  return { family, network: (value >> shift) << shift, prefix };
}

function format(range: Range): string {
  const width = BITS[range.family];
  let text: string;
  if (range.family === 4) {
    text = [24n, 16n, 8n, 0n].map((s) => String((range.network >> s) & 0xffn)).join('.');
  } else {
    const groups = Array.from({ length: 8 }, (_, i) => ((range.network >> BigInt(112 - 16 * i)) & 0xffffn).toString(16));
    // Shorten the longest run of zero groups to "::", as RFC 5952 writes addresses.
    let best = { at: -1, len: 0 };
    for (let i = 0; i < 8; ) {
      if (groups[i] !== '0') { i++; continue; }
      let j = i;
      while (j < 8 && groups[j] === '0') j++;
      if (j - i > best.len && j - i > 1) best = { at: i, len: j - i };
      i = j;
    }
    text = best.at < 0 ? groups.join(':') : `${groups.slice(0, best.at).join(':')}::${groups.slice(best.at + best.len).join(':')}`;
  }
  return range.prefix === width ? text : `${text}/${range.prefix}`;
}

/**
 * A client address as rate limits count it: IPv4 as it is, IPv6 by its /64, the block one subscriber
 * usually gets (otherwise one machine could rotate through addresses and never be counted).
 */
export function clientNetwork(ip: string): string {
  const range = ip.includes('/') ? undefined : toRange(ip);
  if (!range) return ip;
  if (range.family === 4) return format(range);
  return format({ family: 6, network: (range.network >> 64n) << 64n, prefix: 64 });
}

export type AllowlistParse = { ok: true; entries: string[] } | { ok: false; invalid: string[] };

/**
 * Validates and canonicalises entries: `10.1.2.3/8` is stored as `10.0.0.0/8`, IPv6 in its short
 * form, a full-length prefix as a plain address, duplicates folded.
 */
export function parseAllowlist(entries: readonly string[]): AllowlistParse {
  const invalid: string[] = [];
  const out = new Set<string>();
  for (const entry of entries) {
    const range = toRange(entry.trim());
    if (range) out.add(format(range));
    else invalid.push(entry);
  }
  return invalid.length > 0 ? { ok: false, invalid } : { ok: true, entries: [...out] };
}

/** `allowed_ips` of a request body, canonicalised; any entry that is not an address or range is a 400. */
export function allowlistFromBody(entries: readonly string[]): string[] {
  const parsed = parseAllowlist(entries);
  if (!parsed.ok) {
    throw validationError(parsed.invalid.map((entry) => ({ field: 'allowed_ips', in: 'body' as const, message: `"${entry}" is not an IPv4/IPv6 address or CIDR range` })));
  }
  return parsed.entries;
}

function contains(outer: Range, inner: Range): boolean {
  if (outer.family !== inner.family || outer.prefix > inner.prefix) return false;
  const shift = BigInt(BITS[outer.family] - outer.prefix);
  return inner.network >> shift === outer.network >> shift;
}

/** A compiled allowlist, checked on every request of a token that has one. */
export class IpAllowlist {
  private readonly ranges: Range[];

  constructor(readonly entries: readonly string[]) {
    this.ranges = entries.map((e) => {
      const range = toRange(e);
      if (!range) throw new Error(`stored allowlist entry is not an address or range: ${e}`);
      return range;
    });
  }

  allows(clientIp: string): boolean {
    // A client is one address, never a range (a header passed through by a proxy could hold one).
    const client = clientIp.includes('/') ? undefined : toRange(clientIp);
    return client !== undefined && this.ranges.some((r) => contains(r, client));
  }

  /** True when every address `other` allows, this list allows too. */
  covers(other: readonly string[]): boolean {
    return other.every((entry) => {
      const range = toRange(entry);
      return range !== undefined && this.ranges.some((r) => contains(r, range));
    });
  }
}

const compiled = new LRUCache<string, IpAllowlist>({ max: 10_000 });

/**
 * The compiled allowlist for its stored form (the JSON text in the token row). Allowlists are few and
 * each is checked on every request of its tokens, so each is parsed once.
 */
export function compiledAllowlist(stored: string): IpAllowlist {
  let allowlist = compiled.get(stored);
  if (!allowlist) {
    allowlist = new IpAllowlist(JSON.parse(stored) as string[]);
    compiled.set(stored, allowlist);
  }
  return allowlist;
}
