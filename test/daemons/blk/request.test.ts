import test from 'ava';

import { BlkOp, BlkRequest, parseRequest, writeStatus, type RequestLimits } from '../../../daemons/blk/request';
import {
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_GET_LIFETIME,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_SECURE_ERASE,
  VIRTIO_BLK_T_WRITE_ZEROES,
} from '../../../daemons/blk/virtio-blk';
import { Translation } from '../../../lib/memory/guest-memory';
import { DescriptorChain } from '../../../lib/virtqueue/descriptor-chain';
import { fillIovecs } from '../../../lib/virtqueue/iovecs';
import { FakeGuestMemory } from '../../helpers/fake-guest-memory';
import { concat } from '../../lib/vhost-user/harness';
import { blkHeader as header, discardSegment as segment } from './wire';

const CAPACITY = 1 << 20; // 1 MiB image: 2048 sectors

function limits(over: Partial<RequestLimits> = {}): RequestLimits {
  return {
    capacityBytes: CAPACITY,
    logicalBlockSize: 512,
    readOnly: false,
    discard: true,
    writeZeroes: true,
    maxDiscardSectors: 1024,
    maxDiscardSeg: 4,
    maxWriteZeroesSectors: 1024,
    maxWriteZeroesSeg: 4,
    ...over,
  };
}

const fake = new FakeGuestMemory();

/** Add guest range [gpa, gpa+len) to `chain` as segments (split where the memory map splits it). */
function addRange(chain: DescriptorChain, gpa: number, len: number, writable: boolean): void {
  const t = new Translation();
  while (len > 0) {
    if (!fake.memory.translate(gpa, len, t)) throw new RangeError('unmapped');
    chain.addSegment(t.viewId, t.offset, t.length, writable);
    gpa += t.length;
    len -= t.length;
  }
}

interface Part {
  bytes?: Uint8Array;
  len?: number;
  writable?: boolean;
}

let next = 0x1_0000;
/** Lay `parts` out in guest memory (each at a fresh address) and build the chain. */
function chainOf(...parts: Part[]): DescriptorChain {
  const chain = new DescriptorChain();
  chain.clear(fake.memory);
  for (const p of parts) {
    const len = p.bytes?.length ?? p.len ?? 0;
    const gpa = next;
    next += Math.ceil((len + 1) / 512) * 512;
    if (next > 0x1f_0000) next = 0x1_0000;
    if (p.bytes !== undefined) fake.write(gpa, p.bytes);
    addRange(chain, gpa, len, p.writable === true);
  }
  return chain;
}

function parse(chain: DescriptorChain, l: RequestLimits = limits()): BlkRequest {
  const req = new BlkRequest(8);
  if (!parseRequest(chain, l, req)) throw new Error(`malformed: ${req.reason}`);
  return req;
}

const status = { len: 1, writable: true };

test('IN: data in its own descriptor, status in another', (t) => {
  const req = parse(chainOf({ bytes: header(VIRTIO_BLK_T_IN, 8) }, { len: 4096, writable: true }, status));
  t.is(req.op, BlkOp.READ);
  t.is(req.offset, 8 * 512);
  t.is(req.length, 4096);
});

test('IN: data and status share one writable descriptor (ANY_LAYOUT)', (t) => {
  const req = parse(chainOf({ bytes: header(VIRTIO_BLK_T_IN, 1) }, { len: 1025, writable: true }));
  t.is(req.op, BlkOp.READ);
  t.is(req.length, 1024);
});

test('OUT: header and data in one readable descriptor', (t) => {
  const req = parse(chainOf({ bytes: concat([header(VIRTIO_BLK_T_OUT, 2046), new Uint8Array(1024)]) }, status));
  t.is(req.op, BlkOp.WRITE);
  t.is(req.offset, 2046 * 512);
  t.is(req.length, 1024);
});

test('header split over two descriptors still parses', (t) => {
  const h = header(VIRTIO_BLK_T_OUT, 5);
  const req = parse(chainOf({ bytes: h.subarray(0, 7) }, { bytes: h.subarray(7) }, { bytes: new Uint8Array(512) }, status));
  t.is(req.op, BlkOp.WRITE);
  t.is(req.offset, 5 * 512);
  t.is(req.length, 512);
});

test('zero-length IN completes OK without I/O', (t) => {
  const req = parse(chainOf({ bytes: header(VIRTIO_BLK_T_IN, 0) }, status));
  t.is(req.op, BlkOp.COMPLETE);
  t.is(req.status, VIRTIO_BLK_S_OK);
});

test('FLUSH and GET_ID', (t) => {
  t.is(parse(chainOf({ bytes: header(VIRTIO_BLK_T_FLUSH) }, status)).op, BlkOp.FLUSH);
  const ro = parse(chainOf({ bytes: header(VIRTIO_BLK_T_FLUSH) }, status), limits({ readOnly: true, discard: false, writeZeroes: false }));
  t.is(ro.op, BlkOp.COMPLETE);
  t.is(ro.status, VIRTIO_BLK_S_OK);
  t.is(parse(chainOf({ bytes: header(VIRTIO_BLK_T_GET_ID) }, { len: 21, writable: true })).op, BlkOp.GET_ID);
});

test('DISCARD and WRITE_ZEROES segments become byte ranges', (t) => {
  const d = parse(chainOf({ bytes: concat([header(VIRTIO_BLK_T_DISCARD), segment(0, 8), segment(100, 16), segment(50, 0)]) }, status));
  t.is(d.op, BlkOp.DISCARD);
  t.is(d.ranges, 2); // the empty segment is dropped
  t.deepEqual([d.rangeOffset[0], d.rangeLength[0], d.rangeOffset[1], d.rangeLength[1]], [0, 4096, 51200, 8192]);
  const z = parse(chainOf({ bytes: concat([header(VIRTIO_BLK_T_WRITE_ZEROES), segment(8, 8, 1), segment(32, 8)]) }, status));
  t.is(z.op, BlkOp.WRITE_ZEROES);
  t.deepEqual([z.ranges, z.rangeUnmap[0], z.rangeUnmap[1]], [2, 1, 0]);
});

// Every way a well-formed chain gets an error status.
const statusRows: [string, () => DescriptorChain, RequestLimits, number][] = [
  ['IN not a multiple of 512', () => chainOf({ bytes: header(VIRTIO_BLK_T_IN) }, { len: 1000, writable: true }, status), limits(), VIRTIO_BLK_S_IOERR],
  ['IN past capacity', () => chainOf({ bytes: header(VIRTIO_BLK_T_IN, 2047) }, { len: 1024, writable: true }, status), limits(), VIRTIO_BLK_S_IOERR],
  ['IN at a sector above 2^53', () => chainOf({ bytes: header(VIRTIO_BLK_T_IN, 1n << 60n) }, { len: 512, writable: true }, status), limits(), VIRTIO_BLK_S_IOERR],
  ['IN at a sector just above 2^32', () => chainOf({ bytes: header(VIRTIO_BLK_T_IN, 1n << 32n) }, { len: 512, writable: true }, status), limits(), VIRTIO_BLK_S_IOERR],
  ['IN unaligned to 4096-byte blocks', () => chainOf({ bytes: header(VIRTIO_BLK_T_IN, 1) }, { len: 4096, writable: true }, status), limits({ logicalBlockSize: 4096 }), VIRTIO_BLK_S_IOERR],
  ['IN length unaligned to 4096-byte blocks', () => chainOf({ bytes: header(VIRTIO_BLK_T_IN, 8) }, { len: 512, writable: true }, status), limits({ logicalBlockSize: 4096 }), VIRTIO_BLK_S_IOERR],
  ['OUT to a read-only device', () => chainOf({ bytes: concat([header(VIRTIO_BLK_T_OUT), new Uint8Array(512)]) }, status), limits({ readOnly: true }), VIRTIO_BLK_S_IOERR],
  ['OUT past capacity', () => chainOf({ bytes: concat([header(VIRTIO_BLK_T_OUT, 2048), new Uint8Array(512)]) }, status), limits(), VIRTIO_BLK_S_IOERR],
  ['DISCARD not enabled', () => chainOf({ bytes: concat([header(VIRTIO_BLK_T_DISCARD), segment(0, 8)]) }, status), limits({ discard: false }), VIRTIO_BLK_S_UNSUPP],
  ['DISCARD with the unmap flag', () => chainOf({ bytes: concat([header(VIRTIO_BLK_T_DISCARD), segment(0, 8, 1)]) }, status), limits(), VIRTIO_BLK_S_UNSUPP],
  ['DISCARD with an unknown flag', () => chainOf({ bytes: concat([header(VIRTIO_BLK_T_DISCARD), segment(0, 8, 4)]) }, status), limits(), VIRTIO_BLK_S_UNSUPP],
  ['DISCARD with too many segments', () => chainOf({ bytes: concat([header(VIRTIO_BLK_T_DISCARD), ...Array.from({ length: 5 }, (_, i) => segment(i * 8, 8))]) }, status), limits(), VIRTIO_BLK_S_IOERR],
  ['DISCARD segment list of 20 bytes', () => chainOf({ bytes: concat([header(VIRTIO_BLK_T_DISCARD), segment(0, 8), new Uint8Array(4)]) }, status), limits(), VIRTIO_BLK_S_IOERR],
  ['DISCARD without segments', () => chainOf({ bytes: header(VIRTIO_BLK_T_DISCARD) }, status), limits(), VIRTIO_BLK_S_IOERR],
  ['DISCARD past capacity', () => chainOf({ bytes: concat([header(VIRTIO_BLK_T_DISCARD), segment(2040, 16)]) }, status), limits(), VIRTIO_BLK_S_IOERR],
  ['DISCARD longer than max_discard_sectors', () => chainOf({ bytes: concat([header(VIRTIO_BLK_T_DISCARD), segment(0, 1032)]) }, status), limits(), VIRTIO_BLK_S_IOERR],
  ['DISCARD unaligned to 4096-byte blocks', () => chainOf({ bytes: concat([header(VIRTIO_BLK_T_DISCARD), segment(8, 4)]) }, status), limits({ logicalBlockSize: 4096 }), VIRTIO_BLK_S_IOERR],
  ['DISCARD on a read-only device', () => chainOf({ bytes: concat([header(VIRTIO_BLK_T_DISCARD), segment(0, 8)]) }, status), limits({ readOnly: true }), VIRTIO_BLK_S_IOERR],
  ['WRITE_ZEROES not enabled', () => chainOf({ bytes: concat([header(VIRTIO_BLK_T_WRITE_ZEROES), segment(0, 8)]) }, status), limits({ writeZeroes: false }), VIRTIO_BLK_S_UNSUPP],
  ['WRITE_ZEROES with an unknown flag', () => chainOf({ bytes: concat([header(VIRTIO_BLK_T_WRITE_ZEROES), segment(0, 8, 2)]) }, status), limits(), VIRTIO_BLK_S_UNSUPP],
  ['WRITE_ZEROES past capacity', () => chainOf({ bytes: concat([header(VIRTIO_BLK_T_WRITE_ZEROES), segment(4096, 8)]) }, status), limits(), VIRTIO_BLK_S_IOERR],
  ['GET_LIFETIME (not offered)', () => chainOf({ bytes: header(VIRTIO_BLK_T_GET_LIFETIME) }, { len: 7, writable: true }), limits(), VIRTIO_BLK_S_UNSUPP],
  ['SECURE_ERASE (not offered)', () => chainOf({ bytes: concat([header(VIRTIO_BLK_T_SECURE_ERASE), segment(0, 8)]) }, status), limits(), VIRTIO_BLK_S_UNSUPP],
  ['unknown type 0x42', () => chainOf({ bytes: header(0x42) }, status), limits(), VIRTIO_BLK_S_UNSUPP],
];

for (const [name, build, l, expected] of statusRows) {
  test(`status: ${name}`, (t) => {
    const req = parse(build(), l);
    t.is(req.op, BlkOp.COMPLETE);
    t.is(req.status, expected);
    t.not(req.reason, '');
  });
}

test('malformed chains: short header, no writable status byte', (t) => {
  const req = new BlkRequest(4);
  t.false(parseRequest(chainOf({ bytes: header(VIRTIO_BLK_T_IN).subarray(0, 12) }, status), limits(), req));
  t.regex(req.reason, /header/);
  t.false(parseRequest(chainOf({ bytes: concat([header(VIRTIO_BLK_T_OUT), new Uint8Array(512)]) }), limits(), req));
  t.regex(req.reason, /status/);
  t.false(parseRequest(chainOf({ len: 4096, writable: true }), limits(), req));
});

test('fillIovecs skips the header, crosses segments and regions, and respects the limit', (t) => {
  const chain = new DescriptorChain();
  chain.clear(fake.memory);
  fake.write(0x1f_ff00, header(VIRTIO_BLK_T_OUT, 0));
  // 16-byte header + 240 bytes of data at the end of region 0, then 784 bytes in region 1.
  addRange(chain, 0x1f_ff00, 16 + 1024, false);
  addRange(chain, 0x1_0000_0000, 1, true);
  t.is(chain.readableSegments, 2, 'the range crosses from region 0 into region 1');
  const req = parse(chain);
  t.is(req.op, BlkOp.WRITE);
  t.is(req.length, 1024);
  const base = new Float64Array(8);
  const len = new Float64Array(8);
  const n = fillIovecs(chain, 0, chain.readableSegments, 16, 1024, base, len, 1, 8);
  t.is(n, 2);
  t.deepEqual([len[1], len[2]], [240, 784]);
  t.is(base[1], chain.address(0) + 16);
  t.is(base[2], chain.address(1));
  t.is(fillIovecs(chain, 0, chain.readableSegments, 16, 1024, base, len, 0, 1), -1);
});

test('writeStatus writes the last writable byte in place', (t) => {
  const chain = chainOf({ bytes: header(VIRTIO_BLK_T_IN) }, { len: 512, writable: true }, { len: 3, writable: true });
  writeStatus(chain, 0x5a);
  const last = chain.segment(chain.segments - 1);
  t.deepEqual([...last], [0, 0, 0x5a]);
});
