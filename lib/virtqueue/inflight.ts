/**
 * Inflight I/O tracking (QEMU docs/interop/vhost-user.rst, "Inflight I/O tracking"): a queue records
 * in shared memory which chains it popped and has not completed yet, in an order that leaves the
 * record consistent whatever instruction the process dies at, so that a new process (after a crash or
 * a SIGKILL) resubmits exactly those chains, oldest first, before it takes new ones.
 *
 * The area comes from the front-end (SET_INFLIGHT_FD) which keeps it across back-end restarts, so
 * every value read from it is checked like guest input (a bad area is a {@link RingError}
 * VIRTQ_BAD_INFLIGHT: the queue does not start, the daemon keeps serving; the DPDK CVE-2021-3839 and
 * CVE-2022-0669 class of bugs is indexes taken from it unchecked).
 *
 * Split layout, one area per queue (vhost-user.rst QueueRegionSplit, little-endian):
 * ```
 *   0 u64 features (0)   8 u16 version (1; 0 = not initialized)   10 u16 desc_num (= queue size)
 *  12 u16 last_batch_head   14 u16 used_idx   16 DescStateSplit desc[desc_num], 16 bytes each:
 *      0 u8 inflight   1 u8 padding[5]   6 u16 next   8 u64 counter
 * ```
 * Packed layout (QueueRegionPacked):
 * ```
 *   0 u64 features (0)   8 u16 version   10 u16 desc_num   12 u16 free_head   14 u16 old_free_head
 *  16 u16 used_idx   18 u16 old_used_idx   20 u8 used_wrap_counter   21 u8 old_used_wrap_counter
 *  32 DescStatePacked desc[desc_num], 32 bytes each:
 *      0 u8 inflight   2 u16 next   4 u16 last   6 u16 num   8 u64 counter   16 u16 id   18 u16 flags
 *     20 u32 len   24 u64 addr
 * ```
 * Each queue gets room for the packed layout (the larger one) whatever the ring turns out to be:
 * QEMU asks for the area once and keeps it over driver resets that can switch ring layouts (scsi
 * never frees it), so its size cannot depend on the features of the moment. The area is rounded up
 * to 64 bytes per queue (libvhost-user's and DPDK's INFLIGHT_ALIGNMENT). A queue stopped by
 * GET_VRING_BASE with nothing in flight marks its record uninitialized ({@link SplitInflight.clear}),
 * so the next start begins afresh, from the front-end's base, in whichever layout the ring then has.
 * Any other stop (disconnect, daemon exit, crash) keeps it: for a packed ring it is the only place
 * the ring position survives, as QEMU cannot restore one (virtio_queue_packed_restore_last_avail_idx).
 */
import { RingError } from '../errors';

/** vhost-user.rst: "The version of this region. It's 1 currently. Zero value indicates an uninitialized buffer". */
const INFLIGHT_VERSION = 1;
const ALIGNMENT = 64;
const SPLIT_HEADER = 16;
const SPLIT_DESC = 16;
const PACKED_HEADER = 32;
const PACKED_DESC = 32;

/** Bytes of one queue's inflight area for a ring of `size`, split or packed (a multiple of 64). */
export function inflightQueueBytes(size: number): number {
  return Math.ceil((PACKED_HEADER + PACKED_DESC * size) / ALIGNMENT) * ALIGNMENT;
}

/** 2^32, to split counters into two u32 words. */
const TWO_32 = 0x1_0000_0000;
/** Counters are kept as exact numbers: one from the area must stay below 2^53. */
const COUNTER_HIGH_LIMIT = 1 << 21;

function badInflight(why: string): RingError {
  return new RingError('VIRTQ_BAD_INFLIGHT', `inflight area ${why}`);
}

/** Header checks; returns false for an area never initialized (version 0). */
function checkInflightHeader(u16: Uint16Array, u32: Uint32Array, size: number): boolean {
  const version = u16[4]!;
  if (version === 0) return false;
  if (version !== INFLIGHT_VERSION) throw badInflight(`has version ${version}, expected ${INFLIGHT_VERSION}`);
  // "The feature flags of this region. Now it's initialized to 0": nothing else is understood.
  if (u32[0] !== 0 || u32[1] !== 0) throw badInflight(`has unknown feature flags 0x${u32[1]!.toString(16)}${u32[0]!.toString(16).padStart(8, '0')}`);
  if (u16[5] !== size) throw badInflight(`tracks ${u16[5]} descriptors, the queue has ${size}`);
  return true;
}

/** The u64 counter at word `w` of `u32`, checked to be exact as a number. */
function readCounter(u32: Uint32Array, w: number, what: string): number {
  const high = u32[w + 1]!;
  if (high >= COUNTER_HIGH_LIMIT) throw badInflight(`${what} has counter 0x${high.toString(16)}${u32[w]!.toString(16).padStart(8, '0')} (2^53 or more)`);
  return high * TWO_32 + u32[w]!;
}

function writeCounter(u32: Uint32Array, w: number, counter: number): void {
  u32[w] = counter >>> 0;
  u32[w + 1] = Math.floor(counter / TWO_32);
}

/**
 * The entries (indexes) whose counters are given, ordered by counter: the order they were popped in.
 * Equal counters cannot come from a back-end that followed the protocol: refused.
 */
function byCounter(indexes: number[], counters: number[], what: string): Uint16Array {
  const order = indexes.map((_, k) => k).sort((a, b) => counters[a]! - counters[b]!);
  for (let k = 1; k < order.length; k++) {
    if (counters[order[k]!] === counters[order[k - 1]!]) {
      throw badInflight(`has two ${what} with counter ${counters[order[k]!]}`);
    }
  }
  return Uint16Array.from(order, (k) => indexes[k]!);
}

/** A queue's part of the area as byte, u16 and u32 views, once it is known to be large enough. */
function queueAreaViews(area: Uint8Array, size: number): { u8: Uint8Array; u16: Uint16Array; u32: Uint32Array } {
  if (area.byteLength < inflightQueueBytes(size)) throw badInflight(`of ${area.byteLength} bytes is too small for ${size} descriptors`);
  return {
    u8: area,
    u16: new Uint16Array(area.buffer, area.byteOffset, area.byteLength >>> 1),
    u32: new Uint32Array(area.buffer, area.byteOffset, area.byteLength >>> 2),
  };
}

/** What a queue resumes from after {@link SplitInflight.recover}. */
export interface InflightRecovery {
  /** Head indexes to resubmit, oldest first. */
  resubmit: Uint16Array;
}

/**
 * A split queue's inflight record. The ring calls, in this order per chain (vhost-user.rst):
 * `popped(head)` when it pops it (counter, then inflight = 1); `used(head)` when it writes its used
 * element (next = last_batch_head, last_batch_head = head); `published(usedIdx)` right after the
 * `used.idx` store of the batch (inflight = 0 for the batch, then used_idx). A crash between any two
 * stores leaves a state {@link recover} completes: before the used.idx store the chain is still in
 * flight (resubmitted); after it, `used_idx` in the area lags the ring's, and the last batch, found
 * through the list from last_batch_head, is cleared. Nothing here allocates per request.
 */
export class SplitInflight {
  private readonly u8: Uint8Array;
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  /** Heads of the batch pushed since the last publish. */
  private readonly batch: Uint16Array;
  private batchCount = 0;
  /** The next pop's counter. */
  private counter = 0;

  /** `area`: this queue's part of the inflight area, at least {@link inflightQueueBytes} long, 8-aligned. */
  constructor(
    area: Uint8Array,
    readonly size: number,
  ) {
    ({ u8: this.u8, u16: this.u16, u32: this.u32 } = queueAreaViews(area, size));
    this.batch = new Uint16Array(size);
  }

  /**
   * At queue start, with the ring's `used.idx`: initialize a fresh area (returns null: nothing to
   * resume), or check the area, finish a batch a crash interrupted and return the heads to resubmit.
   * Throws RingError VIRTQ_BAD_INFLIGHT.
   */
  recover(ringUsedIdx: number): InflightRecovery | null {
    const { u8, u16, u32, size } = this;
    if (!checkInflightHeader(u16, u32, size)) {
      // Version last: a crash while initializing leaves an area that is initialized again.
      u8.fill(0, SPLIT_HEADER, SPLIT_HEADER + SPLIT_DESC * size);
      u32[0] = 0;
      u32[1] = 0;
      u16[5] = size;
      u16[6] = 0;
      u16[7] = ringUsedIdx;
      u16[4] = INFLIGHT_VERSION;
      return null;
    }
    const lastBatchHead = u16[6]!;
    const usedIdx = u16[7]!;
    if (usedIdx !== ringUsedIdx) {
      // "If the value of used_idx does not match the idx value of used ring": the last batch was
      // published to the driver but not yet marked done here. Its entries form the list from
      // last_batch_head through `next`.
      const batch = (ringUsedIdx - usedIdx) & 0xffff;
      if (batch > size) throw badInflight(`used_idx ${usedIdx} is ${batch} behind the used ring's ${ringUsedIdx} (queue size ${size})`);
      let head = lastBatchHead;
      for (let k = 0; k < batch; k++) {
        if (head >= size) throw badInflight(`last batch names descriptor ${head}, queue size ${size}`);
        u8[SPLIT_HEADER + SPLIT_DESC * head] = 0;
        head = u16[(SPLIT_HEADER + SPLIT_DESC * head + 6) >>> 1]!;
      }
      u16[7] = ringUsedIdx;
    }
    const heads: number[] = [];
    const counters: number[] = [];
    for (let i = 0; i < size; i++) {
      const at = SPLIT_HEADER + SPLIT_DESC * i;
      const inflight = u8[at]!;
      if (inflight === 0) continue;
      if (inflight !== 1) throw badInflight(`descriptor ${i} has inflight ${inflight}`);
      heads.push(i);
      counters.push(readCounter(u32, (at + 8) >>> 2, `descriptor ${i}`));
    }
    if (counters.length > 0) this.counter = Math.max(...counters) + 1;
    return { resubmit: byCounter(heads, counters, 'descriptors in flight') };
  }

  /** The chain at `head` was popped: "Set desc[i].counter ... Set desc[i].inflight to 1". */
  popped(head: number): void {
    const at = SPLIT_HEADER + SPLIT_DESC * head;
    writeCounter(this.u32, (at + 8) >>> 2, this.counter++);
    this.u8[at] = 1;
  }

  /** The chain at `head` got its used element: "Set desc[i].next to last_batch_head, last_batch_head to i". */
  used(head: number): void {
    const u16 = this.u16;
    u16[(SPLIT_HEADER + SPLIT_DESC * head + 6) >>> 1] = u16[6]!;
    u16[6] = head;
    this.batch[this.batchCount++] = head;
  }

  /** The ring stored `used.idx = usedIdx`: the batch is done ("inflight ... to 0", then "used_idx"). */
  published(usedIdx: number): void {
    const { u8, batch } = this;
    for (let k = 0; k < this.batchCount; k++) u8[SPLIT_HEADER + SPLIT_DESC * batch[k]!] = 0;
    this.batchCount = 0;
    this.u16[7] = usedIdx;
  }

  /** The chain at `head` went back to the ring unused (unpop): no longer in flight. */
  unpopped(head: number): void {
    this.u8[SPLIT_HEADER + SPLIT_DESC * head] = 0;
  }

  /** The queue stopped with nothing in flight: the record is marked uninitialized (version 0). */
  clear(): void {
    this.u16[4] = 0;
  }
}

/** Where a packed ring resumes after {@link PackedInflight.recover} found an initialized area. */
export interface PackedRecovery extends InflightRecovery {
  /** Next slot for a used descriptor and the device wrap counter there (the area's, not the base's). */
  usedIdx: number;
  usedWrap: number;
  /** Next slot to pop and the driver wrap counter expected there: past the slots still in flight. */
  nextAvail: number;
  availWrap: number;
  /** Ring slots the chains in flight occupy, from `usedIdx` on. */
  slots: number;
}

/** Byte offset of entry `e` of a packed area. */
function entryAt(e: number): number {
  return PACKED_HEADER + PACKED_DESC * e;
}

/**
 * A packed queue's inflight record. Packed rings reuse slots as the device writes used descriptors, so
 * the record keeps a copy of each popped ring descriptor in an entry taken from a free list (entries
 * are linked by `next`; a chain's entries by the same links, its head entry naming the `last` one and
 * their `num`). The ring calls, per vhost-user.rst:
 * - `popped` after a pop (head entry: num 0, counter, inflight 1; then per descriptor a copy,
 *   free_head moves on; last: `last`, and old_free_head catches up, which commits the pop);
 * - `used(entry)` per used descriptor, `publishing(usedIdx, usedWrap)` right before the store that makes
 *   the batch visible (entries back on the free list, used_idx and wrap), `published()` right after it
 *   (inflight 0, then old_free_head, old_used_idx, old_used_wrap_counter: the commit).
 * A crash at any store leaves either the old or the new state, which {@link recover} tells apart by
 * the ring: the batch's first used descriptor went out iff its slot's USED bit equals the old wrap
 * counter. The free list and ring position live in this process (shadows written through to the area),
 * so what the front-end may scribble on the area after the start is never read back.
 */
export class PackedInflight {
  private readonly u8: Uint8Array;
  private readonly u16: Uint16Array;
  private readonly u32: Uint32Array;
  /** Shadows of the area's links and chain ends. */
  private readonly next: Uint16Array;
  private readonly last: Uint16Array;
  private readonly num: Uint16Array;
  /** Resubmitted chains' descriptors, copied out of the area at recovery (4 words per entry, as a chain records them) and ids. */
  private readonly saved: Uint32Array;
  private readonly savedId: Uint16Array;
  private freeHead = 0;
  private freeCount: number;
  private readonly batch: Uint16Array;
  private batchCount = 0;
  private counter = 0;

  constructor(
    area: Uint8Array,
    readonly size: number,
  ) {
    ({ u8: this.u8, u16: this.u16, u32: this.u32 } = queueAreaViews(area, size));
    this.next = new Uint16Array(size);
    this.last = new Uint16Array(size);
    this.num = new Uint16Array(size);
    this.saved = new Uint32Array(4 * size);
    this.savedId = new Uint16Array(size);
    this.batch = new Uint16Array(size);
    this.freeCount = size;
  }

  /**
   * At queue start: initialize a fresh area from the ring base's used slot and wrap counter (returns
   * null), or check the area, finish or roll back a batch a crash interrupted (`slotFlags` reads a
   * ring slot's flags) and return the head entries to resubmit with the ring position they imply.
   * Throws RingError VIRTQ_BAD_INFLIGHT.
   */
  recover(baseUsedIdx: number, baseUsedWrap: number, slotFlags: (slot: number) => number): PackedRecovery | null {
    const { u8, u16, u32, size } = this;
    if (!checkInflightHeader(u16, u32, size)) {
      for (let e = 0; e < size; e++) {
        const at = entryAt(e);
        u8.fill(0, at, at + PACKED_DESC);
        u16[(at + 2) >>> 1] = e + 1; // the last entry's `size` ends the list
        this.next[e] = e + 1;
      }
      u32[0] = 0;
      u32[1] = 0;
      u16[5] = size;
      u16[6] = 0;
      u16[7] = 0;
      u16[8] = baseUsedIdx;
      u16[9] = baseUsedIdx;
      u8[20] = baseUsedWrap;
      u8[21] = baseUsedWrap;
      u16[4] = INFLIGHT_VERSION; // version last: a crash before it initializes again
      return null;
    }
    const oldUsedIdx = u16[9]!;
    const oldUsedWrap = u8[21]!;
    for (const [what, value, limit] of [
      ['free_head', u16[6]!, size + 1],
      ['old_free_head', u16[7]!, size + 1],
      ['used_idx', u16[8]!, size],
      ['old_used_idx', oldUsedIdx, size],
      ['used_wrap_counter', u8[20]!, 2],
      ['old_used_wrap_counter', oldUsedWrap, 2],
    ] as const) {
      if (value >= limit) throw badInflight(`has ${what} ${value} (queue size ${size})`);
    }
    if (u16[8] !== oldUsedIdx || u8[20] !== oldUsedWrap) {
      // A batch was being published. Its first used descriptor went to old_used_idx: if the driver can
      // see it (USED bit = the old wrap counter; the driver's own descriptor there has the inverse),
      // the batch is done and is committed, otherwise rolled back and resubmitted.
      if (((slotFlags(oldUsedIdx) >>> 15) & 1) === oldUsedWrap) {
        u16[7] = u16[6]!;
        u16[9] = u16[8]!;
        u8[21] = u8[20]!;
      }
    }
    // Roll back whatever is not committed (a pop without its last descriptor, a batch not published).
    u16[6] = u16[7]!;
    u16[8] = u16[9]!;
    u8[20] = u8[21]!;
    const usedIdx = u16[8]!;
    const usedWrap = u8[20]!;

    // Every entry is on the free list or in exactly one chain in flight; anything else is refused.
    const seen = new Uint8Array(size);
    const claim = (e: number, what: string): void => {
      if (e >= size) throw badInflight(`${what} names entry ${e} (queue size ${size})`);
      if (seen[e] !== 0) throw badInflight(`${what} reaches entry ${e} twice`);
      seen[e] = 1;
    };
    let free = 0;
    for (let e = u16[6]!; e !== size; e = u16[(entryAt(e) + 2) >>> 1]!) {
      claim(e, 'the free list');
      u8[entryAt(e)] = 0; // "Set the inflight field of each DescStatePacked entry in free list to 0"
      this.next[e] = u16[(entryAt(e) + 2) >>> 1]!;
      free++;
    }
    const heads: number[] = [];
    const counters: number[] = [];
    let slots = 0;
    for (let e = 0; e < size; e++) {
      const at = entryAt(e);
      const inflight = u8[at]!;
      if (inflight === 0) continue;
      if (inflight !== 1) throw badInflight(`entry ${e} has inflight ${inflight}`);
      const n = u16[(at + 6) >>> 1]!;
      if (n === 0 || n > size) throw badInflight(`entry ${e} has a chain of ${n} descriptors (queue size ${size})`);
      let d = e;
      for (let k = 0; k < n; k++) {
        claim(d, `the chain at entry ${e}`);
        const dat = entryAt(d);
        const flags = u16[(dat + 18) >>> 1]!;
        // Chained with NEXT on every descriptor but the last (virtio 1.2 §2.8.6), as the ring had them.
        if (((flags & 1) !== 0) !== (k < n - 1)) throw badInflight(`entry ${d} of the chain at entry ${e} has flags 0x${flags.toString(16)}`);
        this.saved[4 * d] = u32[(dat + 24) >>> 2]!;
        this.saved[4 * d + 1] = u32[(dat + 28) >>> 2]!;
        this.saved[4 * d + 2] = u32[(dat + 20) >>> 2]!;
        this.saved[4 * d + 3] = flags;
        this.savedId[d] = u16[(dat + 16) >>> 1]!;
        if (k < n - 1) {
          this.next[d] = u16[(dat + 2) >>> 1]!;
          d = this.next[d]!;
        }
      }
      if (u16[(at + 4) >>> 1] !== d) throw badInflight(`entry ${e} names ${u16[(at + 4) >>> 1]} as its last, the chain ends at ${d}`);
      this.last[e] = d;
      this.num[e] = n;
      slots += n;
      heads.push(e);
      counters.push(readCounter(u32, (at + 8) >>> 2, `entry ${e}`));
    }
    if (free + slots !== size) throw badInflight(`loses ${size - free - slots} of its ${size} entries`);
    this.freeHead = u16[6]!;
    this.freeCount = free;
    if (counters.length > 0) this.counter = Math.max(...counters) + 1;
    // The slots between the used position and the next one to pop are exactly those of the chains in flight.
    let nextAvail = usedIdx + slots;
    let availWrap = usedWrap;
    if (nextAvail >= size) {
      nextAvail -= size;
      availWrap ^= 1;
    }
    return { resubmit: byCounter(heads, counters, 'chains in flight'), usedIdx, usedWrap, nextAvail, availWrap, slots };
  }

  /**
   * The resubmitted chain at head entry `e`: `take` gets each of its ring descriptors as copied out of
   * the area at recovery; returns its buffer id (the last descriptor's).
   */
  walkSaved(e: number, take: (addrLo: number, addrHi: number, len: number, flags: number) => void): number {
    const { saved, next } = this;
    const n = this.num[e]!;
    let d = e;
    for (let k = 0; k < n; k++) {
      if (k > 0) d = next[d]!;
      take(saved[4 * d]!, saved[4 * d + 1]!, saved[4 * d + 2]!, saved[4 * d + 3]!);
    }
    return this.savedId[d]!;
  }

  /**
   * A chain was popped (`ringDescriptors` descriptors, their words as DescriptorChain records them,
   * buffer `id`): record it and return its head entry. Throws RingError VIRTQ_TOO_MANY_IN_FLIGHT when the driver has more descriptors out than
   * the ring has slots (no free entry is left).
   */
  popped(ringDescriptors: number, words: Uint32Array, id: number): number {
    if (ringDescriptors > this.freeCount) {
      throw new RingError('VIRTQ_TOO_MANY_IN_FLIGHT', `driver offered more than ${this.size} descriptors at once`);
    }
    const { u8, u16, u32, next } = this;
    const e = this.freeHead;
    const at = entryAt(e);
    u16[(at + 6) >>> 1] = 0;
    writeCounter(u32, (at + 8) >>> 2, this.counter++);
    u8[at] = 1;
    let f = e;
    for (let k = 0; k < ringDescriptors; k++) {
      if (k === ringDescriptors - 1) {
        u16[(at + 4) >>> 1] = f;
        this.last[e] = f;
      }
      u16[(at + 6) >>> 1] = k + 1;
      const fat = entryAt(f);
      u32[(fat + 24) >>> 2] = words[4 * k]!;
      u32[(fat + 28) >>> 2] = words[4 * k + 1]!;
      u32[(fat + 20) >>> 2] = words[4 * k + 2]!;
      u16[(fat + 18) >>> 1] = words[4 * k + 3]!;
      u16[(fat + 16) >>> 1] = id;
      f = next[f]!;
      u16[6] = f;
    }
    u16[7] = f; // old_free_head: the pop is committed
    this.num[e] = ringDescriptors;
    this.freeHead = f;
    this.freeCount -= ringDescriptors;
    return e;
  }

  /** The chain at head entry `e` got its used descriptor (published with the batch). */
  used(e: number): void {
    this.batch[this.batchCount++] = e;
  }

  /** Right before the store that publishes the batch: its entries go back on the free list, then the used position. */
  publishing(usedIdx: number, usedWrap: number): void {
    const { u8, u16, next, last, batch } = this;
    for (let k = 0; k < this.batchCount; k++) {
      const e = batch[k]!;
      const l = last[e]!;
      next[l] = this.freeHead;
      u16[(entryAt(l) + 2) >>> 1] = this.freeHead;
      this.freeHead = e;
      u16[6] = e;
      this.freeCount += this.num[e]!;
    }
    u16[8] = usedIdx;
    u8[20] = usedWrap;
  }

  /** Right after the publishing store: the batch is no longer in flight, and the new state is committed. */
  published(): void {
    const { u8, u16, batch } = this;
    for (let k = 0; k < this.batchCount; k++) u8[entryAt(batch[k]!)] = 0;
    this.batchCount = 0;
    u16[7] = u16[6]!;
    u16[9] = u16[8]!;
    u8[21] = u8[20]!;
  }

  /**
   * The chain at head entry `e`, the one popped last, went back to the ring unused: its entries go back
   * to the head of the free list (free_head first, so a crash in between leaves them on the list, where
   * recovery clears inflight).
   */
  unpopped(e: number): void {
    this.u16[6] = e;
    this.u16[7] = e;
    this.u8[entryAt(e)] = 0;
    this.freeHead = e;
    this.freeCount += this.num[e]!;
  }

  /** The queue stopped with nothing in flight: the record is marked uninitialized (version 0). */
  clear(): void {
    this.u16[4] = 0;
  }
}
