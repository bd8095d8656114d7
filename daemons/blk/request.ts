/**
 * Parse and validate one virtio-blk request from a descriptor chain, without doing any I/O
 * (vm-virtio keeps `request.rs` apart from its executor the same way). The result goes into a
 * preallocated {@link BlkRequest}: the datapath parses into the same objects over and over.
 *
 * Wire layout (virtio 1.2 §5.2.6):
 * ```
 * device-readable:  le32 type | le32 reserved | le64 sector | OUT data, or DISCARD/WRITE_ZEROES segments
 * device-writable:  IN data, or GET_ID string | u8 status (the last writable byte)
 * ```
 * Header, data and status need not sit in separate descriptors (VIRTIO_F_ANY_LAYOUT is implied by
 * VERSION_1), so everything here is byte positions within the readable or writable part.
 *
 * Two kinds of failure:
 * - a chain that cannot carry a request at all (header shorter than 16 bytes, no writable status
 *   byte) is a driver bug that breaks the queue: {@link parseRequest} returns false;
 * - anything else wrong (range, alignment, segments, read-only, unknown type) is data: the request
 *   completes with VIRTIO_BLK_S_IOERR or VIRTIO_BLK_S_UNSUPP and the device keeps serving.
 */
import type { DescriptorChain } from '../../lib/virtqueue/descriptor-chain';
import {
  DISCARD_SEGMENT_SIZE,
  REQUEST_HEADER_SIZE,
  SECTOR_SIZE,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
} from './virtio-blk';

/** What the device has to do for a request. */
export const BlkOp = {
  /** Nothing to do: complete at once with {@link BlkRequest.status}. */
  COMPLETE: 0,
  READ: 1,
  WRITE: 2,
  FLUSH: 3,
  GET_ID: 4,
  DISCARD: 5,
  WRITE_ZEROES: 6,
} as const;
export type BlkOp = (typeof BlkOp)[keyof typeof BlkOp];

/** What requests are checked against; the device updates `capacityBytes` on resize. */
export interface RequestLimits {
  /** capacity × 512. */
  capacityBytes: number;
  /** 512 or 4096: offsets and lengths must be multiples of it. */
  logicalBlockSize: number;
  readOnly: boolean;
  discard: boolean;
  writeZeroes: boolean;
  maxDiscardSectors: number;
  maxDiscardSeg: number;
  maxWriteZeroesSectors: number;
  maxWriteZeroesSeg: number;
}

/** One parsed request. Preallocated and reused: {@link parseRequest} overwrites every field it needs. */
export class BlkRequest {
  op: BlkOp = BlkOp.COMPLETE;
  /** The request type as the driver wrote it. */
  type = 0;
  /** Status for {@link BlkOp.COMPLETE}. */
  status: number = VIRTIO_BLK_S_OK;
  /** Why a request failed or a chain is malformed (constant strings: no allocation). */
  reason = '';
  /** READ/WRITE: byte offset in the image and data length. */
  offset = 0;
  length = 0;
  /** DISCARD/WRITE_ZEROES: byte ranges and their unmap flags. */
  ranges = 0;
  readonly rangeOffset: Float64Array;
  readonly rangeLength: Float64Array;
  readonly rangeUnmap: Uint8Array;

  constructor(maxRanges: number) {
    this.rangeOffset = new Float64Array(maxRanges);
    this.rangeLength = new Float64Array(maxRanges);
    this.rangeUnmap = new Uint8Array(maxRanges);
  }

  private complete(status: number, reason: string): true {
    this.op = BlkOp.COMPLETE;
    this.status = status;
    this.reason = reason;
    return true;
  }

  /** Mark the request failed with VIRTIO_BLK_S_IOERR. Returns true (the chain itself is fine). */
  ioError(reason: string): true {
    return this.complete(VIRTIO_BLK_S_IOERR, reason);
  }

  unsupported(reason: string): true {
    return this.complete(VIRTIO_BLK_S_UNSUPP, reason);
  }

  ok(): true {
    return this.complete(VIRTIO_BLK_S_OK, '');
  }
}

const scratch = new Uint8Array(REQUEST_HEADER_SIZE);
const scratchView = new DataView(scratch.buffer);

/** Little-endian u32 at `at` of `bytes`, without a DataView (the views of guest memory are plain arrays). */
function u32(bytes: Uint8Array, at: number): number {
  return (bytes[at]! | (bytes[at + 1]! << 8) | (bytes[at + 2]! << 16) | (bytes[at + 3]! << 24)) >>> 0;
}

/**
 * Parse `chain` into `out`. Returns false, with `out.reason` set, when the chain cannot carry a
 * virtio-blk request at all; the caller then treats it as a driver error.
 */
export function parseRequest(chain: DescriptorChain, limits: RequestLimits, out: BlkRequest): boolean {
  // virtio 1.2 §5.2.6.1: "The driver MUST ... place the header ... in the device-readable part" and
  // the status byte is the final device-writable byte; without them there is nowhere to answer.
  if (chain.readableLength < REQUEST_HEADER_SIZE) {
    out.reason = 'request header shorter than 16 bytes';
    return false;
  }
  if (chain.writableLength < 1) {
    out.reason = 'request has no writable status byte';
    return false;
  }

  let type: number;
  let sectorLo: number;
  let sectorHi: number;
  if (chain.length[0]! >= REQUEST_HEADER_SIZE) {
    // Fast path: the whole header is in the first segment; read it in place.
    const view = chain.memory.views[chain.viewId[0]!]!;
    const at = chain.offset[0]!;
    type = u32(view, at);
    sectorLo = u32(view, at + 8);
    sectorHi = u32(view, at + 12);
  } else {
    chain.read(0, scratch);
    type = scratchView.getUint32(0, true);
    sectorLo = scratchView.getUint32(8, true);
    sectorHi = scratchView.getUint32(12, true);
  }
  out.type = type;
  out.reason = '';

  switch (type) {
    case VIRTIO_BLK_T_IN:
      return parseData(limits, out, BlkOp.READ, sectorLo, sectorHi, chain.writableLength - 1);
    case VIRTIO_BLK_T_OUT:
      // virtio 1.2 §5.2.6.2: "A device MUST set the status byte to VIRTIO_BLK_S_IOERR for a write
      // request if the VIRTIO_BLK_F_RO feature if offered, and MUST NOT write any data."
      if (limits.readOnly) return out.ioError('write to a read-only device');
      return parseData(limits, out, BlkOp.WRITE, sectorLo, sectorHi, chain.readableLength - REQUEST_HEADER_SIZE);
    case VIRTIO_BLK_T_FLUSH:
      // Nothing can be dirty on a read-only device.
      if (limits.readOnly) return out.ok();
      out.op = BlkOp.FLUSH;
      return true;
    case VIRTIO_BLK_T_GET_ID:
      out.op = BlkOp.GET_ID;
      return true;
    case VIRTIO_BLK_T_DISCARD:
      if (!limits.discard) return out.unsupported('discard is not enabled');
      return parseSegments(chain, limits, out, BlkOp.DISCARD, limits.maxDiscardSeg, limits.maxDiscardSectors);
    case VIRTIO_BLK_T_WRITE_ZEROES:
      if (!limits.writeZeroes) return out.unsupported('write zeroes is not enabled');
      return parseSegments(chain, limits, out, BlkOp.WRITE_ZEROES, limits.maxWriteZeroesSeg, limits.maxWriteZeroesSectors);
    default:
      // GET_LIFETIME, SECURE_ERASE, the zoned commands and anything unknown (contrib/vhost-user-blk
      // and the spec agree: an unsupported request completes with UNSUPP).
      return out.unsupported('unsupported request type');
  }
}

/** Check a byte range of the image: alignment and capacity. Returns the failure reason or ''. */
function checkRange(limits: RequestLimits, sectorLo: number, sectorHi: number, length: number): string {
  // 2^21 × 2^32 sectors is 2^62 bytes: far beyond any capacity, and the number below stays exact.
  if (sectorHi >= 1 << 21) return 'sector beyond capacity';
  const offset = (sectorHi * 0x100000000 + sectorLo) * SECTOR_SIZE;
  const lbs = limits.logicalBlockSize;
  if (offset % lbs !== 0 || length % lbs !== 0) return 'not aligned to the logical block size';
  if (offset + length > limits.capacityBytes) return 'sector beyond capacity';
  return '';
}

function parseData(
  limits: RequestLimits,
  out: BlkRequest,
  op: BlkOp,
  sectorLo: number,
  sectorHi: number,
  length: number,
): boolean {
  // virtio 1.2 §5.2.6.1: IN and OUT data come "in multiples of 512 bytes".
  if (length % SECTOR_SIZE !== 0) return out.ioError('data length is not a multiple of 512');
  const bad = checkRange(limits, sectorLo, sectorHi, length);
  if (bad !== '') return out.ioError(bad);
  if (length === 0) return out.ok();
  out.op = op;
  out.offset = (sectorHi * 0x100000000 + sectorLo) * SECTOR_SIZE;
  out.length = length;
  return true;
}

const segmentBytes = new Uint8Array(DISCARD_SEGMENT_SIZE);
const segmentView = new DataView(segmentBytes.buffer);

function parseSegments(
  chain: DescriptorChain,
  limits: RequestLimits,
  out: BlkRequest,
  op: BlkOp,
  maxSegments: number,
  maxSectors: number,
): boolean {
  if (limits.readOnly) return out.ioError('discard or write zeroes on a read-only device');
  const payload = chain.readableLength - REQUEST_HEADER_SIZE;
  if (payload === 0 || payload % DISCARD_SEGMENT_SIZE !== 0) return out.ioError('segment list is not a multiple of 16 bytes');
  const count = payload / DISCARD_SEGMENT_SIZE;
  // virtio 1.2 §5.2.6.1: requests "MUST NOT contain more than max_discard_seg / max_write_zeroes_seg" segments.
  if (count > maxSegments || count > out.rangeOffset.length) return out.ioError('too many segments');
  const alignment = limits.logicalBlockSize / SECTOR_SIZE;
  let ranges = 0;
  let ioError = '';
  for (let i = 0; i < count; i++) {
    chain.read(REQUEST_HEADER_SIZE + i * DISCARD_SEGMENT_SIZE, segmentBytes);
    const sectorLo = segmentView.getUint32(0, true);
    const sectorHi = segmentView.getUint32(4, true);
    const sectors = segmentView.getUint32(8, true);
    const flags = segmentView.getUint32(12, true);
    // virtio 1.2 §5.2.6.2: "The device MUST set the status byte to VIRTIO_BLK_S_UNSUPP for discard,
    // secure erase and write zeroes commands if any unknown flag is set. Furthermore, the device MUST
    // set the status byte to VIRTIO_BLK_S_UNSUPP for discard commands if the unmap flag is set."
    if ((flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0) return out.unsupported('unknown segment flag');
    if (op === BlkOp.DISCARD && flags !== 0) return out.unsupported('unmap flag on a discard');
    if (ioError !== '') continue;
    if (sectors > maxSectors) {
      ioError = 'segment longer than the advertised maximum';
      continue;
    }
    if (sectors % alignment !== 0) {
      ioError = 'segment not aligned to the logical block size';
      continue;
    }
    const bad = checkRange(limits, sectorLo, sectorHi, sectors * SECTOR_SIZE);
    if (bad !== '') {
      ioError = bad;
      continue;
    }
    if (sectors === 0) continue;
    out.rangeOffset[ranges] = (sectorHi * 0x100000000 + sectorLo) * SECTOR_SIZE;
    out.rangeLength[ranges] = sectors * SECTOR_SIZE;
    out.rangeUnmap[ranges] = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    ranges++;
  }
  if (ioError !== '') return out.ioError(ioError);
  if (ranges === 0) return out.ok();
  out.op = op;
  out.ranges = ranges;
  return true;
}

/** Iovecs a READ or WRITE of `req` needs at most (the number of segments its data can touch). */
export function maxIovecs(chain: DescriptorChain, op: BlkOp): number {
  return op === BlkOp.READ ? chain.segments - chain.readableSegments : chain.readableSegments;
}

/**
 * Write the status byte, the last byte of the chain's writable part, in place (no allocation).
 * The caller checked at parse time that the writable part is not empty (zero-length segments are skipped).
 */
export function writeStatus(chain: DescriptorChain, status: number): void {
  let last = chain.segments - 1;
  while (last > chain.readableSegments && chain.length[last] === 0) last--;
  chain.memory.views[chain.viewId[last]!]![chain.offset[last]! + chain.length[last]! - 1] = status;
}
