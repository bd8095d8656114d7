import fs from 'node:fs';

import test from 'ava';

import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE } from '../../../native/io-batch';
import { MemoryError } from '../../../lib/errors';
import { GuestMemory, Translation, type RangePiece } from '../../../lib/memory/guest-memory';
import { MappedRegion, type MemoryRegionSpec } from '../../../lib/memory/mapped-region';
import { native } from '../../../native';
import { FakeGuestMemory } from '../../helpers/fake-guest-memory';

/**
 * Three memfd regions, sent out of address order: A and B adjacent, then a gap up to C above 4 GiB.
 * Non-zero mmap offsets, one of them past 2 MiB and not page aligned in the 2 MiB sense.
 */
const SPECS: readonly MemoryRegionSpec[] = [
  { guestPhysAddr: 0x1_0000_0000, size: 0x20_0000, userAddr: 0x7f30_0000_0000, mmapOffset: 0x20_1000 }, // C
  { guestPhysAddr: 0x10_0000, size: 0x10_0000, userAddr: 0x7f10_0000_0000, mmapOffset: 0x3000 }, // A
  { guestPhysAddr: 0x20_0000, size: 0x8_0000, userAddr: 0x7f20_0000_0000, mmapOffset: 0 }, // B
];
const [C, A, B] = [0, 1, 2];

function mapRegions(): { memory: GuestMemory; regions: MappedRegion[]; fds: number[] } {
  const fds = SPECS.map((s, i) => native.memfdCreate(`vhostd-test-range-${i}`, s.mmapOffset + s.size));
  const regions = SPECS.map((s, i) => new MappedRegion(s, fds[i]!));
  const memory = new GuestMemory(regions);
  for (const r of regions) r.release(); // the map holds them now
  return { memory, regions, fds };
}

/** Write `bytes` at `gpa` through the backend's own mapping. */
function writeGuest(memory: GuestMemory, gpa: number, bytes: Uint8Array): void {
  const t = new Translation();
  let done = 0;
  while (done < bytes.length) {
    if (!memory.translate(gpa + done, bytes.length - done, t)) throw new RangeError('unmapped');
    t.view.set(bytes.subarray(done, done + t.length), t.offset);
    done += t.length;
  }
}

/** `length` bytes of `fd` at `offset` (pread). */
function readFd(fd: number, offset: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, out, done, length - done, offset + done);
    if (n === 0) throw new RangeError('short read');
    done += n;
  }
  return out;
}

/** The pieces without the region objects, regions named by their index in SPECS. */
function summary(memory: GuestMemory, pieces: RangePiece[]): unknown[] {
  return pieces.map((p) =>
    p.region === null
      ? { hole: true, gpa: p.guestPhysAddr, length: p.length }
      : { region: memory.regions.indexOf(p.region), gpa: p.guestPhysAddr, length: p.length, fileOffset: p.fileOffset },
  );
}

test('a range across several regions and gaps becomes (fd, file offset, length) pieces and reported holes', (t) => {
  const { memory, fds } = mapRegions();
  t.teardown(() => memory.close());
  const start = 0x8_0000;
  const end = 0x1_0000_0000 + 0x1800;
  const pieces = memory.resolveRange(start, end - start);
  t.deepEqual(summary(memory, pieces), [
    { hole: true, gpa: 0x8_0000, length: 0x8_0000 },
    { region: A, gpa: 0x10_0000, length: 0x10_0000, fileOffset: 0x3000 },
    { region: B, gpa: 0x20_0000, length: 0x8_0000, fileOffset: 0 },
    { hole: true, gpa: 0x28_0000, length: 0x1_0000_0000 - 0x28_0000 },
    { region: C, gpa: 0x1_0000_0000, length: 0x1800, fileOffset: 0x20_1000 },
  ]);
  t.is(
    pieces.reduce((n, p) => n + p.length, 0),
    end - start,
    'the pieces cover the range exactly',
  );
  // Each piece's fd and offset name the bytes the guest sees at its address, and its host address is
  // the one translation gives.
  const tr = new Translation();
  pieces.forEach((p, i) => {
    if (p.region === null) return;
    t.is(p.region.fd, fds[memory.regions.indexOf(p.region)]!);
    const probe = Uint8Array.from({ length: 64 }, (_, k) => (i * 31 + k) & 0xff);
    const gpa = p.guestPhysAddr + p.length - 64;
    writeGuest(memory, gpa, probe);
    t.deepEqual(readFd(p.region.fd!, p.fileOffset + p.length - 64, 64), probe);
    t.true(memory.translate(p.guestPhysAddr, 1, tr));
    t.is(p.hostAddress, tr.address);
  });
});

test('pieces are clipped at region ends; a range in no region is one hole; an empty range has no piece', (t) => {
  const { memory } = mapRegions();
  t.teardown(() => memory.close());
  t.deepEqual(summary(memory, memory.resolveRange(0x1f_f000, 0x2000)), [
    { region: A, gpa: 0x1f_f000, length: 0x1000, fileOffset: 0x3000 + 0xf_f000 },
    { region: B, gpa: 0x20_0000, length: 0x1000, fileOffset: 0 },
  ]);
  t.deepEqual(summary(memory, memory.resolveRange(0x1_0000_0000 + 0x1f_f000, 0x3000)), [
    { region: C, gpa: 0x1_0000_0000 + 0x1f_f000, length: 0x1000, fileOffset: 0x20_1000 + 0x1f_f000 },
    { hole: true, gpa: 0x1_0020_0000, length: 0x2000 },
  ]);
  t.deepEqual(summary(memory, memory.resolveRange(0x40_0000, 0x1000)), [{ hole: true, gpa: 0x40_0000, length: 0x1000 }]);
  t.deepEqual(summary(memory, memory.resolveRange(2 ** 53 - 0x1000, 0x1000)), [{ hole: true, gpa: 2 ** 53 - 0x1000, length: 0x1000 }]);
  t.deepEqual(memory.resolveRange(0x10_0000, 0), []);
  t.deepEqual(summary(memory, GuestMemory.empty().resolveRange(0, 0x1000)), [{ hole: true, gpa: 0, length: 0x1000 }]);
});

test('ranges that overflow or are not integers are refused with GUEST_ADDR_OVERFLOW', (t) => {
  const memory = new FakeGuestMemory().memory;
  for (const [gpa, length] of [
    [2 ** 53 - 0x1000, 0x1001],
    [2 ** 53, 1],
    [-1, 0x1000],
    [0, -1],
    [4096.5, 1],
    [0, Number.NaN],
    [Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER],
  ] as const) {
    t.is(t.throws(() => memory.resolveRange(gpa, length), { instanceOf: MemoryError })?.code, 'GUEST_ADDR_OVERFLOW', `0x${gpa.toString(16)}+${length}`);
  }
});

test('a memfd region has 4 KiB pages and maps at an mmap offset that is only page aligned', (t) => {
  const fd = native.memfdCreate('vhostd-test-page', 0x5000 + 0x10_0000);
  const region = new MappedRegion({ guestPhysAddr: 0, size: 0x10_0000, userAddr: 0x7f00_0000_0000, mmapOffset: 0x5000 }, fd);
  t.teardown(() => region.release());
  t.is(region.pageSize, 4096);
  t.is(region.mappingOffset, 0, 'mapped from the page the region starts on');
  t.is(region.fd, fd);
});

test('punching the pieces of a range frees exactly those bytes of guest memory', (t) => {
  const { memory } = mapRegions();
  t.teardown(() => memory.close());
  const fill = (gpa: number, length: number): void => writeGuest(memory, gpa, new Uint8Array(length).fill(0x5a));
  fill(0x1f_0000, 0x2_0000);
  const pieces = memory.resolveRange(0x1f_f000, 0x2000);
  for (const p of pieces) {
    if (p.region === null) continue;
    t.is(p.length % p.region.pageSize, 0);
    native.fallocate(p.region.fd!, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, p.fileOffset, p.length);
  }
  const tr = new Translation();
  const byteAt = (gpa: number): number => {
    t.true(memory.translate(gpa, 1, tr));
    return tr.view[tr.offset]!;
  };
  t.is(byteAt(0x1f_efff), 0x5a, 'the page before is kept');
  t.is(byteAt(0x1f_f000), 0, 'the punched pages read as zero through the mapping');
  t.is(byteAt(0x20_0fff), 0);
  t.is(byteAt(0x20_1000), 0x5a, 'the page after is kept');
});

test('a region without an fd (test fake) gives pieces with a host address and a null fd', (t) => {
  const fake = new FakeGuestMemory();
  const [piece] = fake.memory.resolveRange(0x20_0000 + 0x10, 0x20);
  if (piece === undefined || piece.region === null) return t.fail();
  t.is(piece.region.fd, null);
  t.is(piece.region.pageSize, 4096);
  t.is(piece.fileOffset, 0x10);
  t.is(piece.hostAddress, fake.regions[1]!.hostAddress + 0x10);
});

test('guestAddress turns a translated view offset back into the guest address, in every region and view', (t) => {
  const fake = new FakeGuestMemory();
  const out = new Translation();
  for (const gpa of [0x0, 0x1234, 0x1f_f000, 0x20_0000, 0x20_0abc, 0x2f_ffff, 0x1_0000_0000, 0x1_000f_f000]) {
    t.true(fake.memory.translate(gpa, 16, out), `0x${gpa.toString(16)} is mapped`);
    t.is(fake.memory.guestAddress(out.viewId, out.offset), gpa);
  }
});
