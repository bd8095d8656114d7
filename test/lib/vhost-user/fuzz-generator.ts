/**
 * Pieces of the vhost-user fuzzer (fuzz.test.ts): a seeded PRNG, boundary values, and encoders for
 * one mutated message. Everything is deterministic in the seed so that a failure replays with
 * `VHOSTD_FUZZ_SEED=<seed>`.
 */
import { Request, VRING_IDX_MASK, VRING_NOFD_MASK } from '../../../lib/vhost-user/messages';
import { encodeU64 } from '../../helpers/frontend';

/** xorshift32: small, fast, and the same sequence on every machine. */
export class Rng {
  private s: number;

  constructor(readonly seed: number) {
    this.s = (Math.imul(seed ^ 0x9e3779b9, 0x85ebca6b) ^ 0x2545f491) >>> 0 || 1;
    for (let i = 0; i < 8; i++) this.u32();
  }

  u32(): number {
    let x = this.s;
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    this.s = x;
    return x;
  }

  /** 0 .. n-1 */
  int(n: number): number {
    return n <= 1 ? 0 : Math.floor((this.u32() / 0x1_0000_0000) * n);
  }

  /** lo .. hi inclusive */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }

  chance(p: number): boolean {
    return this.u32() / 0x1_0000_0000 < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }

  u64(): bigint {
    return (BigInt(this.u32()) << 32n) | BigInt(this.u32());
  }

  bytes(n: number): Uint8Array {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i++) out[i] = this.u32() & 0xff;
    return out;
  }

  /** A child generator, so that one decision's randomness does not shift every later one. */
  fork(): Rng {
    return new Rng(this.u32());
  }
}

const TWO64 = 1n << 64n;
export const U64_MAX = TWO64 - 1n;

export const U32_EDGES = [
  0, 1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 64, 100, 128, 255, 256, 257, 1024, 0x7fff, 0x8000, 0x8001, 0xffff, 0x10000,
  0x10001, 0x8000_8000, 0x7fff_ffff, 0x8000_0000, 0xffff_fffe, 0xffff_ffff,
] as const;

export const U64_EDGES: readonly bigint[] = [
  0n,
  1n,
  0xfffn,
  0x1000n,
  0xffff_ffffn,
  0x1_0000_0000n,
  1n << 52n,
  (1n << 53n) - 0x1000n,
  (1n << 53n) - 1n,
  1n << 53n,
  (1n << 53n) + 1n,
  1n << 63n,
  TWO64 - 0x1000n,
  TWO64 - 2n,
  U64_MAX,
];

/** Where a region lives, in all three address spaces. */
export interface RegionNumbers {
  gpa: number;
  size: number;
  userAddr: number;
  mmapOffset: number;
}

const wrap64 = (v: bigint): bigint => ((v % TWO64) + TWO64) % TWO64;

/** A u32 that is usually a boundary, sometimes anything. */
export function fuzzU32(rng: Rng, typical: readonly number[] = []): number {
  const r = rng.int(10);
  if (r < 4 && typical.length > 0) return rng.pick(typical) >>> 0;
  if (r < 8) return rng.pick(U32_EDGES);
  return rng.u32();
}

/** A u64 address near the edges of the known regions (inside, at, just past), or a global boundary. */
export function fuzzAddress(rng: Rng, regions: readonly RegionNumbers[], space: 'user' | 'gpa' | 'offset'): bigint {
  const r = rng.int(10);
  if (r < 7 && regions.length > 0) {
    const region = rng.pick(regions);
    const base = BigInt(space === 'user' ? region.userAddr : space === 'gpa' ? region.gpa : region.mmapOffset);
    const size = BigInt(region.size);
    const anchor = rng.pick([0n, size, size / 2n, size - 0x1000n]);
    const delta = BigInt(rng.pick([-0x1000, -64, -16, -8, -2, -1, 0, 0, 1, 2, 8, 16, 0x1000]));
    return wrap64(base + anchor + delta);
  }
  if (r < 9) return rng.pick(U64_EDGES);
  return rng.u64();
}

/** A region size: small, page-ish, exact, or absurd. */
export function fuzzSize(rng: Rng, fdSize: number): bigint {
  switch (rng.int(6)) {
    case 0:
      return BigInt(fdSize);
    case 1:
      return BigInt(Math.max(0, fdSize + rng.pick([-0x1000, -1, 1, 0x1000])));
    case 2:
      return BigInt(rng.pick([0, 1, 0x1000, 0x10000, 0x100000]));
    case 3:
      return rng.pick(U64_EDGES);
    default:
      return BigInt(rng.range(1, 0x40) * 0x1000);
  }
}

/** SET_VRING_KICK/CALL/ERR payload: index in bits 0-7, optional no-fd bit, optional junk bits. */
export function vringFdPayload(rng: Rng, index: number): Uint8Array {
  let value = BigInt(index & VRING_IDX_MASK);
  if (rng.chance(0.1)) value |= BigInt(VRING_NOFD_MASK);
  if (rng.chance(0.05)) value |= BigInt(rng.pick([0x200, 0x1_0000, 0x8000_0000])) | (rng.chance(0.5) ? 1n << 63n : 0n);
  return encodeU64(value);
}

/** Request codes the engine does not implement (or that do not exist), for the unknown-request path. */
export const UNKNOWN_CODES = [
  0,
  Request.SET_LOG_BASE,
  Request.SET_LOG_FD,
  Request.IOTLB_MSG,
  Request.SET_VRING_ENDIAN,
  Request.CREATE_CRYPTO_SESSION,
  Request.POSTCOPY_ADVISE,
  Request.GET_INFLIGHT_FD,
  Request.SET_INFLIGHT_FD,
  Request.VRING_KICK,
  41,
  42,
  58,
  255,
  0x8000_0001,
  0xffff_ffff,
] as const;

/** Change a payload's length: cut it, extend it with junk, or replace it by junk of any length. */
export function resize(rng: Rng, payload: Uint8Array): Uint8Array {
  switch (rng.int(4)) {
    case 0:
      return payload.subarray(0, rng.int(payload.length + 1));
    case 1: {
      const out = new Uint8Array(payload.length + rng.range(1, 16));
      out.set(payload);
      out.set(rng.bytes(out.length - payload.length), payload.length);
      return out;
    }
    case 2:
      return rng.bytes(rng.pick([0, 1, 4, 7, 8, 9, 12, 16, 39, 40, 41, 48, 264, 300]));
    default:
      return rng.bytes(rng.chance(0.2) ? rng.range(256, 4096) : rng.int(64));
  }
}
