/**
 * Iovecs over a descriptor chain's guest memory, for zero-copy readv/writev: the kernel reads and
 * writes guest pages directly (blk and scsi data transfers).
 */
import type { DescriptorChain } from './descriptor-chain';

/** Linux IOV_MAX: the most iovecs one readv/writev takes. */
export const IOV_MAX = 1024;

/**
 * Write the host addresses of `length` bytes of `chain`, starting `skip` bytes into segments
 * `first .. end-1`, as iovecs into `iovBase`/`iovLen` from index `at` (zero copy: the kernel reads
 * and writes guest memory directly). Returns the number of iovecs, or -1 when more than `max` (or
 * more than the arrays hold from `at`) would be needed.
 */
export function fillIovecs(
  chain: DescriptorChain,
  first: number,
  end: number,
  skip: number,
  length: number,
  iovBase: Float64Array,
  iovLen: Float64Array,
  at: number,
  max: number,
): number {
  let n = 0;
  const limit = Math.min(max, iovBase.length - at, iovLen.length - at);
  for (let i = first; i < end && length > 0; i++) {
    const segLen = chain.length[i]!;
    if (skip >= segLen) {
      skip -= segLen;
      continue;
    }
    if (n === limit) return -1;
    const take = Math.min(segLen - skip, length);
    iovBase[at + n] = chain.address(i) + skip;
    iovLen[at + n] = take;
    n++;
    length -= take;
    skip = 0;
  }
  return n;
}
