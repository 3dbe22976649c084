import { LRUCache } from 'lru-cache';

const DIGEST_BYTES = 32;

/**
 * token id → sha256 digest, least recently used first out. The digests live in one preallocated slab
 * (32 bytes a slot) instead of one Buffer each: a Buffer per entry costs several hundred bytes of
 * bookkeeping, which at 100,000 cached tokens doubled the server's memory.
 */
export class DigestCache {
  private readonly slab: Buffer;
  private readonly free: number[] = [];
  private nextSlot = 0;
  private readonly slots: LRUCache<number, number>;

  constructor(max: number) {
    // One spare slot: a new entry takes it before the LRU evicts, then the evicted slot is the spare.
    this.slab = Buffer.alloc((max + 1) * DIGEST_BYTES);
    this.slots = new LRUCache<number, number>({ max, dispose: (slot) => this.free.push(slot) });
  }

  get(id: number): Buffer | undefined {
    const slot = this.slots.get(id);
    return slot === undefined ? undefined : this.slab.subarray(slot * DIGEST_BYTES, (slot + 1) * DIGEST_BYTES);
  }

  set(id: number, digest: Buffer): void {
    if (digest.length !== DIGEST_BYTES) throw new Error('DigestCache holds sha256 digests only');
    let slot = this.slots.get(id);
    if (slot === undefined) {
      slot = this.free.pop() ?? this.nextSlot++;
      this.slots.set(id, slot);
    }
    digest.copy(this.slab, slot * DIGEST_BYTES);
  }

  get size(): number {
    return this.slots.size;
  }
}
