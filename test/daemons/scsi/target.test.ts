/**
 * The transport-free SCSI target: every command with plain Uint8Arrays, including the CHECK CONDITION
 * paths (sense key, ASC/ASCQ, field pointer) and hostile CDBs.
 */
import test from 'ava';

import { Asc, Op, SenseKey, Status } from '../../../daemons/scsi/target/constants';
import { LogicalUnit, naaDesignator, type LogicalUnitOptions } from '../../../daemons/scsi/target/logical-unit';
import { Bytchk, MAX_TRANSFER_BYTES, MAX_WRITE_SAME_BYTES, ScsiAction, ScsiResult, ScsiTarget } from '../../../daemons/scsi/target/target';

const BLOCKS = 2048;

function unitOptions(over: Partial<LogicalUnitOptions> = {}): LogicalUnitOptions {
  return { blockSize: 512, readOnly: false, discard: true, serial: 'SERIAL0', naa: naaDesignator('SERIAL0'), ...over };
}

function target(): ScsiTarget {
  const t = new ScsiTarget();
  t.addUnit(0, new LogicalUnit(unitOptions(), BLOCKS * 512));
  t.addUnit(1, new LogicalUnit(unitOptions({ readOnly: true, discard: false, serial: 'RO' }), BLOCKS * 512));
  t.addUnit(300, new LogicalUnit(unitOptions({ blockSize: 4096, serial: 'BIG' }), 10 * 4096 + 100));
  t.addUnit(400, new LogicalUnit(unitOptions({ blockSize: 4096, serial: 'HUGE' }), 2 ** 40)); // room for the largest ranges
  return t;
}

function run(t: ScsiTarget, lun: number, cdb: number[], dataOut: Uint8Array = new Uint8Array(0)): ScsiResult {
  const out = new ScsiResult();
  const bytes = new Uint8Array(32);
  bytes.set(cdb);
  t.execute(lun, { cdb: bytes, readDataOut: (dst) => (dst.set(dataOut.subarray(0, dst.length)), Math.min(dst.length, dataOut.length)) }, out);
  return out;
}

function data(out: ScsiResult): Uint8Array {
  return out.data.subarray(0, out.dataLength);
}

/** [sense key, ASC/ASCQ, field pointer or -1, bit or -1] of a CHECK CONDITION (fixed format). */
function sense(out: ScsiResult): [number, number, number, number] {
  const s = out.sense;
  const sksv = (s[15]! & 0x80) !== 0;
  return [s[2]! & 0x0f, (s[12]! << 8) | s[13]!, sksv ? (s[16]! << 8) | s[17]! : -1, sksv && (s[15]! & 0x08) !== 0 ? s[15]! & 7 : -1];
}

const rwCdb = (op: number, lba: number, blocks: number) => [op, 0, (lba >>> 24) & 0xff, (lba >>> 16) & 0xff, (lba >>> 8) & 0xff, lba & 0xff, 0, blocks >> 8, blocks & 0xff, 0];
const be32 = (b: Uint8Array, at: number) => new DataView(b.buffer, b.byteOffset).getUint32(at);

test('TEST UNIT READY, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL: GOOD', (t) => {
  const tg = target();
  for (const cdb of [[Op.TEST_UNIT_READY], [Op.START_STOP_UNIT, 0, 0, 0, 1], [Op.PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1]]) {
    const out = run(tg, 0, cdb);
    t.is(out.status, Status.GOOD);
    t.is(out.senseLength, 0);
    t.is(out.action, ScsiAction.COMPLETE);
  }
});

test('standard INQUIRY: direct-access disk, SPC-4, vendor and product, cut to the allocation length', (t) => {
  const out = run(target(), 0, [Op.INQUIRY, 0, 0, 0, 96]);
  t.is(out.status, Status.GOOD);
  const d = data(out);
  t.is(d.length, 36);
  t.is(d[0], 0x00);
  t.is(d[2], 0x06);
  t.is(d[3]! & 0x0f, 2);
  t.is(d[4], 31);
  t.is(Buffer.from(d.subarray(8, 16)).toString(), 'VHOSTD  ');
  t.is(data(run(target(), 0, [Op.INQUIRY, 0, 0, 0, 5])).length, 5);
});

test('INQUIRY of a LUN without a unit: peripheral qualifier 3; other commands LOGICAL UNIT NOT SUPPORTED', (t) => {
  const tg = target();
  const inq = run(tg, 7, [Op.INQUIRY, 0, 0, 0, 36]);
  t.is(inq.status, Status.GOOD);
  t.is(data(inq)[0], 0x7f);
  for (const cdb of [[Op.TEST_UNIT_READY], [Op.READ_10, 0, 0, 0, 0, 0, 0, 0, 1, 0], [Op.INQUIRY, 1, 0x80, 0, 64]]) {
    const out = run(tg, 7, cdb);
    t.is(out.status, Status.CHECK_CONDITION);
    t.deepEqual(sense(out).slice(0, 2), [SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED]);
  }
  const rs = run(tg, 7, [Op.REQUEST_SENSE, 0, 0, 0, 18]);
  t.is(rs.status, Status.GOOD);
  t.is(data(rs)[2], SenseKey.ILLEGAL_REQUEST);
  t.is(data(rs)[12], Asc.LOGICAL_UNIT_NOT_SUPPORTED >> 8);
});

test('VPD pages: supported list, serial, NAA designator stable per unit, block limits, non-rotational, provisioning', (t) => {
  const tg = target();
  const list = data(run(tg, 0, [Op.INQUIRY, 1, 0x00, 0, 255]));
  t.deepEqual([...list.subarray(4)], [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
  t.deepEqual([...data(run(tg, 1, [Op.INQUIRY, 1, 0x00, 0, 255])).subarray(4)], [0x00, 0x80, 0x83, 0xb0, 0xb1], 'no B2h without discard');
  const serial = data(run(tg, 1, [Op.INQUIRY, 1, 0x80, 0, 255]));
  t.is(serial[1], 0x80);
  t.is(Buffer.from(serial.subarray(4)).toString(), 'RO');
  const id = data(run(tg, 0, [Op.INQUIRY, 1, 0x83, 0, 255]));
  t.is(id[1], 0x83);
  t.is((id[2]! << 8) | id[3]!, id.length - 4);
  t.is(id[5]! & 0x0f, 3, 'NAA designator first');
  t.is(id[8]! >> 4, 3, 'NAA 3h: locally assigned');
  t.deepEqual(id.subarray(8, 16), naaDesignator('SERIAL0'));
  t.notDeepEqual(naaDesignator('SERIAL0'), naaDesignator('SERIAL1'));
  const limits = data(run(tg, 0, [Op.INQUIRY, 1, 0xb0, 0, 255]));
  t.is(limits.length, 64);
  t.is(be32(limits, 8), MAX_TRANSFER_BYTES / 512);
  t.true(be32(limits, 20) > 0, 'unmap LBA count with discard');
  t.is(be32(data(run(tg, 1, [Op.INQUIRY, 1, 0xb0, 0, 255])), 20), 0, 'no unmap without discard');
  const chars = data(run(tg, 0, [Op.INQUIRY, 1, 0xb1, 0, 255]));
  t.is((chars[4]! << 8) | chars[5]!, 1);
  const prov = data(run(tg, 0, [Op.INQUIRY, 1, 0xb2, 0, 255]));
  t.is(prov[5]! & 0x80, 0x80, 'LBPU');
});

const invalid: [string, number, number[], number, number, number, number][] = [
  // name, lun, cdb, key, asc, field, bit
  ['unknown opcode', 0, [0xd7], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE, 0, -1],
  ['INQUIRY page code without EVPD', 0, [Op.INQUIRY, 0, 0x83, 0, 36], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 2, -1],
  ['INQUIRY unknown VPD page', 0, [Op.INQUIRY, 1, 0x99, 0, 36], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 2, -1],
  ['INQUIRY B2h without discard', 1, [Op.INQUIRY, 1, 0xb2, 0, 36], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 2, -1],
  ['READ(10) past the end', 0, [Op.READ_10, 0, 0, 0, 0x07, 0xff, 0, 0, 2, 0], SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE, -1, -1],
  ['READ(10) LBA beyond', 0, [Op.READ_10, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE, -1, -1],
  ['READ(16) LBA 2^64-1', 0, [Op.READ_16, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE, -1, -1],
  ['READ(16) LBA 2^53', 0, [Op.READ_16, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE, -1, -1],
  ['READ(12) length 2^32-1', 0, [Op.READ_12, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE, -1, -1],
  ['READ(10) RDPROTECT', 0, [Op.READ_10, 0x20, 0, 0, 0, 0, 0, 0, 1, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1, 7],
  ['READ(6) past the end', 300, [Op.READ_6, 0, 0, 9, 2, 0], SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE, -1, -1],
  ['WRITE(10) to a read-only unit', 1, [Op.WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1, 0], SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED, -1, -1],
  ['WRITE(6) to a read-only unit', 1, [Op.WRITE_6, 0, 0, 0, 1, 0], SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED, -1, -1],
  ['UNMAP on a unit without discard', 1, [Op.UNMAP, 0, 0, 0, 0, 0, 0, 0, 24, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE, 0, -1],
  ['SERVICE ACTION IN(16) unknown action', 0, [Op.SERVICE_ACTION_IN_16, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1, 4],
  ['SYNCHRONIZE CACHE(10) past the end', 0, [Op.SYNCHRONIZE_CACHE_10, 0, 0, 0, 0x08, 0x01, 0, 0, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE, -1, -1],
  ['VERIFY(10) BYTCHK 10b (reserved)', 0, [Op.VERIFY_10, 0x04, 0, 0, 0, 0, 0, 0, 1, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1, 2],
  ['VERIFY(10) VRPROTECT', 0, [Op.VERIFY_10, 0x20, 0, 0, 0, 0, 0, 0, 1, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1, 7],
  ['VERIFY(16) past the end', 0, [Op.VERIFY_16, 0, 0, 0, 0, 0, 0, 0, 0x08, 0, 0, 0, 0, 1, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE, -1, -1],
  ['VERIFY(16) BYTCHK 01b longer than a transfer', 400, [Op.VERIFY_16, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 10, -1],
  ['VERIFY(16) BYTCHK 11b longer than 1 GiB', 400, [Op.VERIFY_16, 0x06, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 1, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 10, -1],
  ['WRITE SAME(10) 0 blocks (WSNZ)', 0, [Op.WRITE_SAME_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 7, -1],
  ['WRITE SAME(16) 0 blocks (WSNZ)', 0, [Op.WRITE_SAME_16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 10, -1],
  ['WRITE SAME(10) past the end', 0, [Op.WRITE_SAME_10, 0, 0, 0, 0x07, 0xff, 0, 0, 2, 0], SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE, -1, -1],
  ['WRITE SAME(16) LBA 2^64-1', 0, [Op.WRITE_SAME_16, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE, -1, -1],
  ['WRITE SAME(16) longer than 1 GiB', 400, [Op.WRITE_SAME_16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 1, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 10, -1],
  ['WRITE SAME(10) WRPROTECT', 0, [Op.WRITE_SAME_10, 0x40, 0, 0, 0, 0, 0, 0, 1, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1, 7],
  ['WRITE SAME(16) ANCHOR', 0, [Op.WRITE_SAME_16, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1, 4],
  ['WRITE SAME(10) PBDATA', 0, [Op.WRITE_SAME_10, 0x04, 0, 0, 0, 0, 0, 0, 1, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1, 2],
  ['WRITE SAME(16) LBDATA', 0, [Op.WRITE_SAME_16, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1, 1],
  ['WRITE SAME(10) bit 0 (NDOB only in (16))', 0, [Op.WRITE_SAME_10, 0x01, 0, 0, 0, 0, 0, 0, 1, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1, 0],
  ['WRITE SAME(10) to a read-only unit', 1, [Op.WRITE_SAME_10, 0, 0, 0, 0, 0, 0, 0, 1, 0], SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED, -1, -1],
  ['WRITE SAME(16) NDOB to a read-only unit', 1, [Op.WRITE_SAME_16, 0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0], SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED, -1, -1],
  ['MODE SENSE(6) unknown page', 0, [Op.MODE_SENSE_6, 0, 0x1c, 0, 255, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 2, 5],
  ['MODE SENSE(6) saved values', 0, [Op.MODE_SENSE_6, 0, 0xc8, 0, 255, 0], SenseKey.ILLEGAL_REQUEST, Asc.SAVING_PARAMETERS_NOT_SUPPORTED, 2, 7],
  ['MODE SENSE(10) subpage', 0, [Op.MODE_SENSE_10, 0, 0x08, 0x01, 0, 0, 0, 0, 255, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 3, -1],
  ['REPORT LUNS allocation below 16', 0, [Op.REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 6, -1],
  ['REPORT LUNS unknown select', 0, [Op.REPORT_LUNS, 0, 0x10, 0, 0, 0, 0, 0, 1, 0, 0, 0], SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 2, -1],
];

for (const [name, lun, cdb, key, asc, field, bit] of invalid) {
  test(`CHECK CONDITION: ${name}`, (t) => {
    const out = run(target(), lun, cdb);
    t.is(out.status, Status.CHECK_CONDITION);
    t.is(out.action, ScsiAction.COMPLETE);
    t.is(out.senseLength, 18);
    t.is(out.sense[0], 0x70, 'fixed format, current');
    t.is(out.sense[7], 10);
    t.deepEqual(sense(out), [key, asc, field, bit]);
    t.is((out.sense[15]! & 0x40) !== 0, field >= 0, 'C/D: the field is in the CDB');
    t.is(out.dataLength, 0);
  });
}

test('READ and WRITE 6/10/12/16: byte ranges, FUA, zero length, 4096-byte blocks', (t) => {
  const tg = target();
  const cases: [number, number[], ScsiAction, number, number, boolean][] = [
    [0, [Op.READ_6, 0x00, 0x01, 0x02, 4, 0], ScsiAction.READ, 0x102 * 512, 4 * 512, false],
    [300, [Op.READ_6, 0, 0, 0, 0, 0], ScsiAction.COMPLETE, 0, 0, false], // 256 blocks > 10: out of range (checked below)
    [0, [Op.WRITE_10, 0x08, 0, 0, 0, 16, 0, 0, 8, 0], ScsiAction.WRITE, 16 * 512, 8 * 512, true],
    [0, [Op.WRITE_10, 0, 0, 0, 0, 16, 0, 0, 8, 0], ScsiAction.WRITE, 16 * 512, 8 * 512, false],
    [0, [Op.READ_12, 0x08, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0], ScsiAction.READ, 512, 1024, false],
    [300, [Op.WRITE_16, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 1, 0, 0], ScsiAction.WRITE, 9 * 4096, 4096, false],
    [0, [Op.READ_10, 0, 0, 0, 0x08, 0x00, 0, 0, 0, 0], ScsiAction.COMPLETE, 0, 0, false],
    [0, [Op.READ_16, 0, 0, 0, 0, 0, 0, 0, 0x07, 0xff, 0, 0, 0, 1, 0, 0], ScsiAction.READ, 2047 * 512, 512, false],
  ];
  for (const [lun, cdb, action, offset, length, fua] of cases) {
    const out = run(tg, lun, cdb);
    if (lun === 300 && cdb[0] === Op.READ_6) {
      t.deepEqual(sense(out).slice(0, 2), [SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE], 'READ(6) length 0 means 256 blocks');
      continue;
    }
    t.is(out.status, Status.GOOD, `opcode ${cdb[0]}`);
    t.is(out.action, action);
    if (action === ScsiAction.COMPLETE) continue;
    t.is(out.offset, offset);
    t.is(out.length, length);
    t.is(out.fua, fua);
  }
});

test('a write with the write cache off is FUA; completeIo turns errors into MEDIUM ERROR / DATA PROTECT', (t) => {
  const tg = target();
  tg.unit(0)!.writeCache = false;
  const out = run(tg, 0, [Op.WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
  t.true(out.fua);
  tg.completeIo(out, 512);
  t.is(out.status, Status.GOOD);
  tg.completeIo(out, -28);
  t.deepEqual(sense(out).slice(0, 2), [SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT]);
  const read = run(tg, 0, [Op.READ_10, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
  tg.completeIo(read, 512);
  t.deepEqual(sense(read).slice(0, 2), [SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR], 'a short read is an error');
  const write = run(tg, 0, [Op.WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
  tg.completeIo(write, -5);
  t.deepEqual(sense(write).slice(0, 2), [SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR]);
});

test('READ CAPACITY(10)/(16): last LBA and block size; partial blocks do not count; LBPME with discard', (t) => {
  const tg = target();
  const c10 = data(run(tg, 300, [Op.READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
  t.deepEqual([be32(c10, 0), be32(c10, 4)], [9, 4096]);
  const c16 = data(run(tg, 0, [Op.SERVICE_ACTION_IN_16, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]));
  t.is(c16.length, 32);
  t.deepEqual([be32(c16, 0), be32(c16, 4), be32(c16, 8)], [0, BLOCKS - 1, 512]);
  t.is(c16[14]! & 0x80, 0x80);
  const ro = data(run(tg, 1, [Op.SERVICE_ACTION_IN_16, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]));
  t.is(ro[14]! & 0x80, 0);
  const huge = new ScsiTarget();
  huge.addUnit(0, new LogicalUnit(unitOptions(), 2 ** 33 * 512));
  t.is(be32(data(run(huge, 0, [Op.READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0])), 0), 0xffffffff, 'too big for 32 bits');
});

test('REPORT LUNS: ascending, peripheral addressing below 256 and flat above; SELECT REPORT 1 is empty', (t) => {
  const tg = target();
  tg.removeUnit(400);
  for (const lun of [0, 5]) {
    const d = data(run(tg, lun, [Op.REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]));
    t.is(be32(d, 0), 24);
    t.deepEqual([...d.subarray(8, 10), ...d.subarray(16, 18), ...d.subarray(24, 26)], [0, 0, 0, 1, 0x41, 0x2c]);
  }
  t.is(be32(data(run(tg, 0, [Op.REPORT_LUNS, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0])), 0), 0);
  const cut = run(tg, 0, [Op.REPORT_LUNS, 0, 2, 0, 0, 0, 0, 0, 0, 16, 0, 0]);
  t.is(cut.dataLength, 16, 'cut to the allocation length; the list length still says 24');
  t.is(be32(data(cut), 0), 24);
});

test('REPORT LUNS with 16384 units lists every one', (t) => {
  const tg = new ScsiTarget();
  for (let lun = 16383; lun >= 0; lun--) tg.addUnit(lun, new LogicalUnit(unitOptions(), 512));
  const d = data(run(tg, 0, [Op.REPORT_LUNS, 0, 0, 0, 0, 0x02, 0, 0x10, 0, 0, 0, 0]));
  t.is(be32(d, 0), 16384 * 8);
  for (const lun of [0, 255, 256, 16383]) {
    const at = 8 + 8 * lun;
    t.is(((d[at]! & 0x3f) << 8) | d[at + 1]!, lun);
  }
  t.throws(() => tg.addUnit(16384, new LogicalUnit(unitOptions(), 512)), { instanceOf: RangeError });
  t.throws(() => tg.addUnit(3, new LogicalUnit(unitOptions(), 512)), { instanceOf: RangeError });
});

test('REQUEST SENSE: NO SENSE, fixed or descriptor format as the DESC bit asks', (t) => {
  const tg = target();
  const fixed = data(run(tg, 0, [Op.REQUEST_SENSE, 0, 0, 0, 252, 0]));
  t.is(fixed.length, 18);
  t.is(fixed[0], 0x70);
  t.is(fixed[2], SenseKey.NO_SENSE);
  const desc = data(run(tg, 0, [Op.REQUEST_SENSE, 1, 0, 0, 252, 0]));
  t.is(desc.length, 8);
  t.is(desc[0], 0x72);
  const missing = data(run(tg, 9, [Op.REQUEST_SENSE, 1, 0, 0, 252, 0]));
  t.deepEqual([...missing.subarray(0, 4)], [0x72, SenseKey.ILLEGAL_REQUEST, 0x25, 0x00]);
});

test('MODE SENSE(6)/(10): caching page WCE, control page, block descriptors, WP and DPOFUA', (t) => {
  const tg = target();
  const all6 = data(run(tg, 0, [Op.MODE_SENSE_6, 0, 0x3f, 0, 255, 0]));
  t.is(all6[0], all6.length - 1);
  t.is(all6[2], 0x10, 'DPOFUA, not write protected');
  t.is(all6[3], 8);
  t.is(be32(all6, 4), BLOCKS);
  t.is(be32(all6, 8), 512);
  t.deepEqual([all6[12], all6[13], all6[14]! & 0x04], [0x08, 0x12, 0x04]);
  t.deepEqual([all6[32], all6[33]], [0x0a, 0x0a]);
  t.is(all6.length, 4 + 8 + 20 + 12);
  const ro = data(run(tg, 1, [Op.MODE_SENSE_6, 0x08, 0x08, 0, 255, 0]));
  t.is(ro[2]! & 0x80, 0x80, 'WP');
  t.is(ro[3], 0, 'DBD: no block descriptor');
  t.is(ro.length, 4 + 20);
  tg.unit(0)!.writeCache = false;
  const long = data(run(tg, 0, [Op.MODE_SENSE_10, 0x10, 0x08, 0, 0, 0, 0, 0, 255, 0]));
  t.is((long[0]! << 8) | long[1]!, long.length - 2);
  t.is(long[4]! & 1, 1, 'LONGLBA');
  t.is((long[6]! << 8) | long[7]!, 16);
  t.is(be32(long, 12), BLOCKS);
  t.is(long[24 + 2]! & 0x04, 0, 'WCE off');
  const changeable = data(run(tg, 0, [Op.MODE_SENSE_6, 0x08, 0x48, 0, 255, 0]));
  t.is(changeable[4 + 2], 0x04, 'only WCE is changeable');
  t.is(data(run(tg, 0, [Op.MODE_SENSE_6, 0, 0x3f, 0, 4, 0])).length, 4, 'cut to the allocation length');
});

test('SYNCHRONIZE CACHE flushes (not on a read-only unit)', (t) => {
  const tg = target();
  t.is(run(tg, 0, [Op.SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0]).action, ScsiAction.FLUSH);
  t.is(run(tg, 0, [Op.SYNCHRONIZE_CACHE_16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).action, ScsiAction.FLUSH);
  const ro = run(tg, 1, [Op.SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
  t.is(ro.status, Status.GOOD);
  t.is(ro.action, ScsiAction.COMPLETE);
});

test('VERIFY(10)/(16): BYTCHK 0 reads the range, 01b compares all of the data-out, 11b one block; 0 blocks is nothing', (t) => {
  const tg = target();
  const medium = run(tg, 1, [Op.VERIFY_10, 0, 0, 0, 0, 8, 0, 0, 4, 0]);
  t.deepEqual([medium.status, medium.action, medium.offset, medium.length, medium.compare, medium.dataOutLength], [Status.GOOD, ScsiAction.VERIFY, 8 * 512, 4 * 512, Bytchk.NONE, 0]);
  const all = run(tg, 0, [Op.VERIFY_16, 0x02, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 8, 0, 0]);
  t.deepEqual([all.action, all.offset, all.length, all.compare, all.dataOutLength], [ScsiAction.VERIFY, 16 * 512, 8 * 512, Bytchk.ALL, 8 * 512]);
  const one = run(tg, 300, [Op.VERIFY_10, 0x06, 0, 0, 0, 1, 0, 0, 9, 0]);
  t.deepEqual([one.action, one.offset, one.length, one.compare, one.dataOutLength], [ScsiAction.VERIFY, 4096, 9 * 4096, Bytchk.ONE_BLOCK, 4096]);
  const none = run(tg, 0, [Op.VERIFY_10, 0x02, 0, 0, 0, 0, 0, 0, 0, 0]);
  t.deepEqual([none.status, none.action], [Status.GOOD, ScsiAction.COMPLETE]);
});

test('VERIFY completion: a short read is MEDIUM ERROR; a miscompare is MISCOMPARE with the offset in INFORMATION, fixed and descriptor', (t) => {
  const tg = target();
  const cdb = [Op.VERIFY_10, 0x02, 0, 0, 0, 0, 0, 0, 4, 0];
  const good = run(tg, 0, cdb);
  tg.completeIo(good, good.length);
  t.is(good.status, Status.GOOD);
  const short = run(tg, 0, cdb);
  tg.completeIo(short, 1024);
  t.deepEqual(sense(short).slice(0, 2), [SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR]);
  const failed = run(tg, 0, cdb);
  tg.completeIo(failed, -5);
  t.deepEqual(sense(failed).slice(0, 2), [SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR]);
  const differs = run(tg, 0, cdb);
  differs.miscompare = 0x0123;
  tg.completeIo(differs, differs.length);
  t.is(differs.status, Status.CHECK_CONDITION);
  t.deepEqual(sense(differs), [SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, -1, -1]);
  t.is(differs.sense[0], 0xf0, 'VALID: INFORMATION holds the offset');
  t.is(be32(differs.sense, 3), 0x0123);
  tg.unit(0)!.descriptorSense = true;
  const descriptor = run(tg, 0, cdb);
  descriptor.miscompare = 4097;
  tg.completeIo(descriptor, descriptor.length);
  const d = descriptor.sense;
  t.deepEqual([d[0], d[1], d[2], d[3], d[7]], [0x72, SenseKey.MISCOMPARE, 0x1d, 0x00, 12]);
  t.deepEqual([d[8], d[9], d[10]], [0x00, 0x0a, 0x80], 'information descriptor, VALID');
  t.is(be32(d, 16), 4097);
  t.is(descriptor.senseLength, 20);
});

test('WRITE SAME(10)/(16): the range, zeroes from NDOB or a zero block, UNMAP only with discard, the pattern block otherwise', (t) => {
  const tg = target();
  const pattern = new Uint8Array(512).fill(0xa5);
  const zero = new Uint8Array(512);
  const ws10 = run(tg, 0, [Op.WRITE_SAME_10, 0, 0, 0, 0, 10, 0, 0, 20, 0], pattern);
  t.deepEqual([ws10.status, ws10.action, ws10.offset, ws10.length, ws10.dataOutLength, ws10.zeroes, ws10.unmap, ws10.fua], [Status.GOOD, ScsiAction.WRITE_SAME, 10 * 512, 20 * 512, 512, false, false, false]);
  const zeroBlock = run(tg, 0, [Op.WRITE_SAME_10, 0x08, 0, 0, 0, 0, 0, 0, 8, 0], zero);
  t.deepEqual([zeroBlock.zeroes, zeroBlock.unmap, zeroBlock.dataOutLength], [true, true, 512]);
  const patternUnmap = run(tg, 0, [Op.WRITE_SAME_10, 0x08, 0, 0, 0, 0, 0, 0, 8, 0], pattern);
  t.deepEqual([patternUnmap.zeroes, patternUnmap.unmap], [false, false], 'a pattern is written, never unmapped');
  const ndob = run(tg, 300, [Op.WRITE_SAME_16, 0x09, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 8, 0, 0]);
  t.deepEqual([ndob.action, ndob.offset, ndob.length, ndob.dataOutLength, ndob.zeroes, ndob.unmap], [ScsiAction.WRITE_SAME, 2 * 4096, 8 * 4096, 0, true, true]);
  tg.addUnit(5, new LogicalUnit(unitOptions({ discard: false }), BLOCKS * 512));
  const noDiscard = run(tg, 5, [Op.WRITE_SAME_16, 0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]);
  t.deepEqual([noDiscard.status, noDiscard.zeroes, noDiscard.unmap], [Status.GOOD, true, false], 'UNMAP bit ignored without discard');
  const short = run(tg, 0, [Op.WRITE_SAME_10, 0, 0, 0, 0, 0, 0, 0, 8, 0], new Uint8Array(100));
  t.deepEqual([short.action, short.dataOutLength, short.zeroes], [ScsiAction.WRITE_SAME, 512, false], 'a short data-out is the transport\'s overrun');
  tg.unit(0)!.writeCache = false;
  t.true(run(tg, 0, [Op.WRITE_SAME_10, 0, 0, 0, 0, 0, 0, 0, 1, 0], pattern).fua, 'write cache off: durable');
  const max = run(tg, 400, [Op.WRITE_SAME_16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x04, 0, 0, 0, 0]);
  t.deepEqual([max.status, max.length], [Status.GOOD, MAX_WRITE_SAME_BYTES]);
});

test('WRITE SAME completion: errors are WRITE ERROR or, for ENOSPC, SPACE ALLOCATION FAILED', (t) => {
  const tg = target();
  const cdb = [Op.WRITE_SAME_16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0];
  const good = run(tg, 0, cdb);
  tg.completeIo(good, good.length);
  t.is(good.status, Status.GOOD);
  const eio = run(tg, 0, cdb);
  tg.completeIo(eio, -5);
  t.deepEqual(sense(eio).slice(0, 2), [SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR]);
  const enospc = run(tg, 0, cdb);
  tg.completeIo(enospc, -28);
  t.deepEqual(sense(enospc).slice(0, 2), [SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT]);
});

test('VPD B0h: WSNZ and MAXIMUM WRITE SAME LENGTH; B2h: LBPWS and LBPWS10 with discard', (t) => {
  const tg = target();
  const limits = data(run(tg, 300, [Op.INQUIRY, 1, 0xb0, 0, 255]));
  t.is(limits[4]! & 1, 1, 'WSNZ');
  t.is(be32(limits, 36) * 2 ** 32 + be32(limits, 40), MAX_WRITE_SAME_BYTES / 4096);
  const prov = data(run(tg, 0, [Op.INQUIRY, 1, 0xb2, 0, 255]));
  t.is(prov[5]! & 0xe0, 0xe0, 'LBPU, LBPWS, LBPWS10');
});

function unmapList(descriptors: [number, number][]): Uint8Array {
  const p = new Uint8Array(8 + 16 * descriptors.length);
  const v = new DataView(p.buffer);
  v.setUint16(0, 6 + 16 * descriptors.length);
  v.setUint16(2, 16 * descriptors.length);
  descriptors.forEach(([lba, blocks], i) => {
    v.setBigUint64(8 + 16 * i, BigInt(lba));
    v.setUint32(16 + 16 * i, blocks);
  });
  return p;
}

test('UNMAP: ranges from the parameter list; errors in the list point into it', (t) => {
  const tg = target();
  const list = unmapList([[8, 16], [100, 0], [2000, 48]]);
  const out = run(tg, 0, [Op.UNMAP, 0, 0, 0, 0, 0, 0, 0, list.length, 0], list);
  t.is(out.status, Status.GOOD);
  t.is(out.action, ScsiAction.UNMAP);
  t.is(out.rangeCount, 2);
  t.deepEqual([out.rangeOffset[0], out.rangeLength[0], out.rangeOffset[1], out.rangeLength[1]], [8 * 512, 16 * 512, 2000 * 512, 48 * 512]);
  const beyond = unmapList([[2040, 9]]);
  t.deepEqual(sense(run(tg, 0, [Op.UNMAP, 0, 0, 0, 0, 0, 0, 0, beyond.length, 0], beyond)).slice(0, 2), [SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE]);
  const short = run(tg, 0, [Op.UNMAP, 0, 0, 0, 0, 0, 0, 0, 24, 0], new Uint8Array(4));
  t.deepEqual(sense(short).slice(0, 2), [SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR]);
  const lying = unmapList([[0, 1]]);
  lying[3] = 32; // says two descriptors, carries one
  const bad = run(tg, 0, [Op.UNMAP, 0, 0, 0, 0, 0, 0, 0, lying.length, 0], lying);
  t.deepEqual(sense(bad), [SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, 2, -1]);
  t.is(bad.sense[15]! & 0x40, 0, 'C/D 0: the field is in the parameter list');
  t.is(run(tg, 0, [Op.UNMAP, 0, 0, 0, 0, 0, 0, 0, 0, 0]).action, ScsiAction.COMPLETE, 'empty list: nothing to do');
});

test('hostile CDBs: every opcode with random bytes yields GOOD or a well-formed CHECK CONDITION', (t) => {
  const tg = target();
  let x = 12345;
  const rand = () => ((x = (x * 1103515245 + 12345) >>> 0) >>> 16) & 0xff;
  for (let op = 0; op < 256; op++) {
    for (let round = 0; round < 20; round++) {
      const cdb = [op, ...Array.from({ length: 31 }, rand)];
      const out = run(tg, round % 3 === 0 ? 0 : round % 3 === 1 ? 1 : 9999, cdb);
      if (out.status === Status.GOOD) {
        t.is(out.senseLength, 0);
        if (out.action === ScsiAction.READ || out.action === ScsiAction.WRITE) {
          const unit = out.unit!;
          t.true(out.offset + out.length <= unit.capacityBytes && out.length <= MAX_TRANSFER_BYTES);
        }
        if (out.action === ScsiAction.WRITE_SAME || out.action === ScsiAction.VERIFY) {
          const unit = out.unit!;
          t.true(out.offset + out.length <= unit.capacityBytes && out.length <= MAX_WRITE_SAME_BYTES && out.dataOutLength <= MAX_TRANSFER_BYTES);
        }
      } else {
        t.is(out.status, Status.CHECK_CONDITION);
        t.is(out.sense[0], 0x70);
        t.is(out.action, ScsiAction.COMPLETE);
      }
    }
  }
});

/** A MODE SELECT(10) parameter list: header, optional block descriptor, pages. */
function modeList(pages: number[][], blockLength?: number): Uint8Array {
  const descriptor = blockLength === undefined ? [] : [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, (blockLength >>> 24) & 0xff, (blockLength >>> 16) & 0xff, (blockLength >>> 8) & 0xff, blockLength & 0xff];
  const header = [0, 0, 0, 0, blockLength === undefined ? 0 : 1, 0, 0, descriptor.length];
  return Uint8Array.from([...header, ...descriptor, ...pages.flat()]);
}

function currentPage(tg: ScsiTarget, page: number): number[] {
  const d = data(run(tg, 0, [Op.MODE_SENSE_6, 0x08, page, 0, 255, 0]));
  return [...d.subarray(4)];
}

test('MODE SELECT: WCE and D_SENSE change; other fields, saving and unknown pages are refused', (t) => {
  const tg = target();
  const caching = currentPage(tg, 0x08);
  caching[2] = 0; // WCE off
  const list = modeList([caching], 512);
  const out = run(tg, 0, [Op.MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, list.length, 0], list);
  t.is(out.status, Status.GOOD);
  t.false(tg.unit(0)!.writeCache);
  t.true(run(tg, 0, [Op.WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1, 0]).fua, 'writes are durable with the cache off');
  t.is(currentPage(tg, 0x08)[2]! & 0x04, 0);

  const control = currentPage(tg, 0x0a);
  control[2] = 0x04; // D_SENSE
  const six = modeList([control]).subarray(8);
  const header6 = Uint8Array.from([0, 0, 0, 0, ...six]);
  t.is(run(tg, 0, [Op.MODE_SELECT_6, 0x10, 0, 0, header6.length, 0], header6).status, Status.GOOD);
  const bad = run(tg, 0, [0xd7]);
  t.deepEqual([...bad.sense.subarray(0, 4)], [0x72, SenseKey.ILLEGAL_REQUEST, 0x20, 0x00], 'descriptor format after D_SENSE');
  t.is(bad.senseLength, 16);
  t.deepEqual([bad.sense[8], bad.sense[9], bad.sense[12]! & 0xc0, bad.sense[14]], [0x02, 0x06, 0xc0, 0], 'field pointer descriptor: byte 0 of the CDB');

  const fixed = target();
  const changed = currentPage(fixed, 0x0a);
  changed[3] = 0x00; // QUEUE ALGORITHM MODIFIER is not changeable
  const refused = modeList([changed]);
  const r = run(fixed, 0, [Op.MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, refused.length, 0], refused);
  t.deepEqual(sense(r), [SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, 8 + 3, -1]);
  t.deepEqual(sense(run(fixed, 0, [Op.MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, 0, refused.length, 0], refused)), [SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1, 0], 'SP');
  const unknown = modeList([[0x1c, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]);
  t.deepEqual(sense(run(fixed, 0, [Op.MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, unknown.length, 0], unknown)).slice(0, 3), [SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, 8]);
  const wrongBlock = modeList([currentPage(fixed, 0x08)], 4096);
  t.deepEqual(sense(run(fixed, 0, [Op.MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, wrongBlock.length, 0], wrongBlock)).slice(0, 2), [SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST]);
  const truncated = run(fixed, 0, [Op.MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, 40, 0], new Uint8Array(10));
  t.deepEqual(sense(truncated).slice(0, 2), [SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR]);
  t.true(fixed.unit(0)!.writeCache && !fixed.unit(0)!.descriptorSense, 'refused lists change nothing');
  const changeable = data(run(fixed, 0, [Op.MODE_SENSE_6, 0x08, 0x7f, 0, 255, 0]));
  t.deepEqual([changeable[4 + 2], changeable[24 + 2]], [0x04, 0x04], 'WCE and D_SENSE are changeable');
});

test('REPORT SUPPORTED OPERATION CODES: all commands, one command, one service action', (t) => {
  const tg = target();
  const all = data(run(tg, 0, [Op.MAINTENANCE_IN, 0x0c, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]));
  const count = be32(all, 0) / 8;
  const ops = Array.from({ length: count }, (_, i) => all[4 + 8 * i]);
  t.true(ops.includes(Op.READ_16) && ops.includes(Op.UNMAP) && ops.includes(Op.MODE_SELECT_10));
  t.true(ops.includes(Op.WRITE_SAME_10) && ops.includes(Op.WRITE_SAME_16) && ops.includes(Op.VERIFY_10) && ops.includes(Op.VERIFY_16));
  t.false(data(run(tg, 1, [Op.MAINTENANCE_IN, 0x0c, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0])).subarray(4).some((b, i) => i % 8 === 0 && b === Op.UNMAP), 'no UNMAP without discard');
  const one = data(run(tg, 0, [Op.MAINTENANCE_IN, 0x0c, 1, Op.WRITE_10, 0, 0, 0, 0, 0, 64, 0, 0]));
  t.deepEqual([one[1]! & 7, (one[2]! << 8) | one[3]!, one[4]], [3, 10, Op.WRITE_10]);
  const ws = data(run(tg, 0, [Op.MAINTENANCE_IN, 0x0c, 1, Op.WRITE_SAME_16, 0, 0, 0, 0, 0, 64, 0, 0]));
  t.deepEqual([ws[1]! & 7, (ws[2]! << 8) | ws[3]!], [3, 16]);
  const none = data(run(tg, 0, [Op.MAINTENANCE_IN, 0x0c, 1, 0x8e, 0, 0, 0, 0, 0, 64, 0, 0]));
  t.deepEqual([none[1]! & 7, none.length], [1, 4], 'WRITE AND VERIFY(16) is not supported');
  const sa = data(run(tg, 0, [Op.MAINTENANCE_IN, 0x0c, 2, Op.SERVICE_ACTION_IN_16, 0, 0x10, 0, 0, 0, 64, 0, 0]));
  t.deepEqual([sa[1]! & 7, sa[4], sa[5]], [3, Op.SERVICE_ACTION_IN_16, 0x10]);
  t.deepEqual(sense(run(tg, 0, [Op.MAINTENANCE_IN, 0x0c, 1, Op.SERVICE_ACTION_IN_16, 0, 0, 0, 0, 0, 64, 0, 0])), [SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 2, 2]);
  t.deepEqual(sense(run(tg, 0, [Op.MAINTENANCE_IN, 0x0c, 5, 0, 0, 0, 0, 0, 0, 64, 0, 0])), [SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 2, 2]);
  t.deepEqual(sense(run(tg, 0, [Op.MAINTENANCE_IN, 0x05, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0])), [SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, 1, 4]);
});

test('REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS: the functions the control queue answers', (t) => {
  const tg = target();
  const d = data(run(tg, 0, [Op.MAINTENANCE_IN, 0x0d, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0]));
  t.deepEqual([...d], [0xdc, 0x03, 0, 0]);
  const ext = data(run(tg, 0, [Op.MAINTENANCE_IN, 0x0d, 0x80, 0, 0, 0, 0, 0, 0, 16, 0, 0]));
  t.deepEqual([ext.length, ext[3]], [16, 0x0c]);
});

test('copies of a unit that share their mode buffer see each other\'s MODE SELECT; resetModes restores power-on values', (t) => {
  const tg = target();
  const unit = tg.unit(0)!;
  const copy = new ScsiTarget();
  const twin = new LogicalUnit(unitOptions(), BLOCKS * 512);
  twin.shareModes(unit.modesBuffer);
  copy.addUnit(0, twin);
  const caching = currentPage(tg, 0x08);
  caching[2] = 0;
  const list = modeList([caching]);
  t.is(run(tg, 0, [Op.MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, list.length, 0], list).status, Status.GOOD);
  t.false(twin.writeCache, 'the other copy sees WCE off');
  t.true(run(copy, 0, rwCdb(Op.WRITE_10, 0, 1)).fua, 'and makes its writes durable');
  twin.descriptorSense = true;
  t.is(run(tg, 0, [0xd7]).sense[0], 0x72, 'D_SENSE set through the copy: descriptor sense here');
  unit.resetModes();
  t.true(twin.writeCache && !twin.descriptorSense);
  t.throws(() => twin.shareModes(new SharedArrayBuffer(8)), { instanceOf: RangeError });
});
