import { LRUCache } from 'lru-cache';

const DIGEST_BYTES = 32;

/**
 * token id → sha256 digest, least recently used first out. The digests live in one preallocated slab
 * (32 bytes a slot) instead of one Buffer each: a Buffer per entry costs several hundred bytes of
 * bookkeeping, which at 100,000 cached tokens doubled the server's memory.
 *
 * It also answers "is this digest cached?" without knowing the token id, through an open-addressing
 * index of slot numbers (4 bytes a bucket, at most half full): an address blocked for sending wrong
 * keys may still use a key this process already verified, and finding that out must cost no lookup.
 */
export class DigestCache {
  private readonly slab: Buffer;
  private readonly free: number[] = [];
  private nextSlot = 0;
  private readonly slots: LRUCache<number, number>;
  /** slot + 1 per bucket, 0 for empty; linear probing, deletion by backward shift (no tombstones). */
  private readonly index: Uint32Array;
  private readonly mask: number;

  constructor(max: number) {
    // One spare slot: a new entry takes it before the LRU evicts, then the evicted slot is the spare.
    this.slab = Buffer.alloc((max + 1) * DIGEST_BYTES);
    let buckets = 2;
    while (buckets < 2 * (max + 1)) buckets *= 2;
    this.index = new Uint32Array(buckets);
    this.mask = buckets - 1;
    this.slots = new LRUCache<number, number>({
      max,
      dispose: (slot) => {
        this.unindex(slot);
        this.free.push(slot);
      },
    });
  }

  get(id: number): Buffer | undefined {
    const slot = this.slots.get(id);
    return slot === undefined ? undefined : this.digestAt(slot);
  }

  set(id: number, digest: Buffer): void {
    if (digest.length !== DIGEST_BYTES) throw new Error('DigestCache holds sha256 digests only');
    let slot = this.slots.get(id);
    if (slot === undefined) {
      slot = this.free.pop() ?? this.nextSlot++;
      this.slots.set(id, slot);
    } else {
      if (this.digestAt(slot).equals(digest)) return;
      this.unindex(slot);
    }
    digest.copy(this.slab, slot * DIGEST_BYTES);
    let bucket = this.home(digest);
    while (this.index[bucket] !== 0) bucket = (bucket + 1) & this.mask;
    this.index[bucket] = slot + 1;
  }

  /** Whether some cached token has this digest. Does not count as a use for the LRU order. */
  has(digest: Buffer): boolean {
    for (let bucket = this.home(digest); this.index[bucket] !== 0; bucket = (bucket + 1) & this.mask) {
      if (this.digestAt(this.index[bucket]! - 1).equals(digest)) return true;
    }
    return false;
  }

  get size(): number {
    return this.slots.size;
  }

  private digestAt(slot: number): Buffer {
    return this.slab.subarray(slot * DIGEST_BYTES, (slot + 1) * DIGEST_BYTES);
  }

  /** sha256 output is uniform, so its first four bytes are a good enough hash. */
  private home(digest: Buffer): number {
    return digest.readUInt32LE(0) & this.mask;
  }

  private unindex(slot: number): void {
    let hole = this.home(this.digestAt(slot));
    while (this.index[hole] !== slot + 1) {
      if (this.index[hole] === 0) return;
      hole = (hole + 1) & this.mask;
    }
    this.index[hole] = 0;
    // Backward shift: pull later entries of the probe run into the hole unless they sit at or after
    // their home bucket's position relative to it.
    for (let next = (hole + 1) & this.mask; this.index[next] !== 0; next = (next + 1) & this.mask) {
      const home = this.home(this.digestAt(this.index[next]! - 1));
      const stays = hole <= next ? home > hole && home <= next : home > hole || home <= next;
      if (!stays) {
        this.index[hole] = this.index[next]!;
        this.index[next] = 0;
        hole = next;
      }
    }
  }
}
