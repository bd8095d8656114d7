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
 * Packed rings (QueueRegionPacked) are not tracked yet: they run without the area (vring.ts).
 * Each queue's area is rounded up to 64 bytes (libvhost-user's and DPDK's INFLIGHT_ALIGNMENT), so an
 * area written by one of them fits ours.
 */
import { RingError } from '../errors';

/** vhost-user.rst: "The version of this region. It's 1 currently. Zero value indicates an uninitialized buffer". */
const INFLIGHT_VERSION = 1;
const ALIGNMENT = 64;
const SPLIT_HEADER = 16;
const SPLIT_DESC = 16;

/** Bytes of one queue's inflight area for a split ring of `size` (a multiple of 64). */
export function inflightQueueBytes(size: number): number {
  return Math.ceil((SPLIT_HEADER + SPLIT_DESC * size) / ALIGNMENT) * ALIGNMENT;
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
    if (area.byteLength < inflightQueueBytes(size)) throw badInflight(`of ${area.byteLength} bytes is too small for ${size} descriptors`);
    this.u8 = area;
    this.u16 = new Uint16Array(area.buffer, area.byteOffset, area.byteLength >>> 1);
    this.u32 = new Uint32Array(area.buffer, area.byteOffset, area.byteLength >>> 2);
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
}
