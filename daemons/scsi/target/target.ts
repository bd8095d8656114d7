/**
 * A SCSI target: logical units by LUN and the command set they emulate (SPC-4, SBC-3). Transport free,
 * as vhost-device-scsi keeps `src/scsi` apart from virtio: the transport hands over a CDB, and
 * {@link ScsiTarget.execute} either completes the command (status, sense data, data-in bytes in
 * {@link ScsiResult.data}) or describes the block I/O to do (READ/WRITE byte ranges, a cache flush,
 * ranges to deallocate), which the transport performs straight between its buffers and the image and
 * reports with {@link completeIo}.
 *
 * Errors are SCSI: every refusal is CHECK CONDITION with the sense key and ASC/ASCQ SPC-4 names, and a
 * field pointer to the CDB byte (and bit) in error for ILLEGAL REQUEST / INVALID FIELD IN CDB.
 */
import { constants as osConstants } from 'node:os';

import { Asc, MAX_LUN, Op, SAI_READ_CAPACITY_16, SenseKey, Status } from './constants';
import type { LogicalUnit } from './logical-unit';
import { SENSE_BUFFER_LENGTH, SenseInfo, encodeSense } from './sense';

/** What the transport has to do for a command. */
export const ScsiAction = {
  /** Nothing: status, sense and data-in are in the result. */
  COMPLETE: 0,
  /** Read `length` bytes at `offset` of the unit's image into the data-in buffer. */
  READ: 1,
  /** Write `length` bytes of the data-out buffer at `offset` (`fua`: durable before completion). */
  WRITE: 2,
  /** Make written data durable (fdatasync). */
  FLUSH: 3,
  /** Deallocate `rangeCount` byte ranges (punch holes). */
  UNMAP: 4,
  /**
   * WRITE SAME: write one logical block over `offset .. offset+length`: zeroes when `zeroes` (NDOB, or
   * a data-out block of zeroes; `unmap`: deallocating is allowed too), else the first `dataOutLength`
   * bytes of the data-out buffer, repeated. `fua` as for WRITE.
   */
  WRITE_SAME: 5,
  /**
   * VERIFY: read `offset .. offset+length` and, with `compare`, compare it with the data-out buffer
   * (BYTCHK 01b: all of it; 11b: its first block, repeated); the transport reports the first byte that
   * differs in {@link ScsiResult.miscompare}.
   */
  VERIFY: 6,
} as const;
export type ScsiAction = (typeof ScsiAction)[keyof typeof ScsiAction];

/** Largest READ/WRITE: 32 MiB (VPD B0h MAXIMUM TRANSFER LENGTH). */
export const MAX_TRANSFER_BYTES = 32 << 20;
/** Largest UNMAP range: 1 GiB (VPD B0h MAXIMUM UNMAP LBA COUNT). */
export const MAX_UNMAP_BYTES = 1 << 30;
/** Block descriptors per UNMAP (VPD B0h MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT). */
export const MAX_UNMAP_DESCRIPTORS = 32;
/** Largest WRITE SAME and VERIFY range: 1 GiB (VPD B0h MAXIMUM WRITE SAME LENGTH). */
export const MAX_WRITE_SAME_BYTES = 1 << 30;

/** VERIFY BYTCHK (SBC-3 §5.33, table 66): what the data-out buffer holds. */
export const Bytchk = {
  /** No data-out: check the medium can be read. */
  NONE: 0,
  /** The blocks to compare, all of them. */
  ALL: 1,
  /** One block, compared with every block of the range. */
  ONE_BLOCK: 3,
} as const;

/** MAINTENANCE IN service actions (SPC-4 §6.35, §6.36). */
const SA_REPORT_SUPPORTED_OPCODES = 0x0c;
const SA_REPORT_SUPPORTED_TMFS = 0x0d;

/** The commands a unit supports: [opcode, service action or -1, CDB length]. */
function supportedCommands(unit: LogicalUnit): [number, number, number][] {
  const list: [number, number, number][] = [
    [Op.TEST_UNIT_READY, -1, 6], [Op.REQUEST_SENSE, -1, 6], [Op.READ_6, -1, 6], [Op.WRITE_6, -1, 6], [Op.INQUIRY, -1, 6],
    [Op.MODE_SELECT_6, -1, 6], [Op.MODE_SENSE_6, -1, 6], [Op.START_STOP_UNIT, -1, 6], [Op.PREVENT_ALLOW_MEDIUM_REMOVAL, -1, 6],
    [Op.READ_CAPACITY_10, -1, 10], [Op.READ_10, -1, 10], [Op.WRITE_10, -1, 10], [Op.VERIFY_10, -1, 10], [Op.SYNCHRONIZE_CACHE_10, -1, 10],
    [Op.MODE_SELECT_10, -1, 10], [Op.MODE_SENSE_10, -1, 10], [Op.READ_16, -1, 16], [Op.WRITE_16, -1, 16], [Op.VERIFY_16, -1, 16],
    [Op.SYNCHRONIZE_CACHE_16, -1, 16], [Op.SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16, 16], [Op.REPORT_LUNS, -1, 12],
    [Op.MAINTENANCE_IN, SA_REPORT_SUPPORTED_OPCODES, 12], [Op.MAINTENANCE_IN, SA_REPORT_SUPPORTED_TMFS, 12], [Op.READ_12, -1, 12], [Op.WRITE_12, -1, 12],
    [Op.WRITE_SAME_10, -1, 10], [Op.WRITE_SAME_16, -1, 16],
  ];
  if (unit.options.discard) list.push([Op.UNMAP, -1, 10]);
  return list;
}

/** INQUIRY strings (SPC-4 §6.6.2: left-aligned ASCII, space padded). */
const VENDOR = 'VHOSTD  ';
const PRODUCT = 'VHOSTD SCSI DISK';
const REVISION = '0001';

/** A command as the transport received it. */
export interface ScsiCommand {
  /** The CDB (may be longer than the command's own length: the rest is ignored). */
  readonly cdb: Uint8Array;
  /** Copy up to `dst.length` bytes of the data-out buffer (parameter lists); returns the bytes copied. */
  readDataOut(dst: Uint8Array): number;
}

/** The outcome of one command. Preallocated and reused: {@link ScsiTarget.execute} sets every field it needs. */
export class ScsiResult {
  action: ScsiAction = ScsiAction.COMPLETE;
  status: number = Status.GOOD;
  readonly sense = new Uint8Array(SENSE_BUFFER_LENGTH);
  /** Sense bytes valid in {@link sense} (0 unless CHECK CONDITION). */
  senseLength = 0;
  /** Data-in of an emulated command: the first {@link dataLength} bytes (already cut to the allocation length). */
  data = new Uint8Array(512);
  dataLength = 0;
  /** READ/WRITE: byte offset in the image and length. */
  offset = 0;
  length = 0;
  /** WRITE, WRITE SAME: force unit access (durable before completion). */
  fua = false;
  /**
   * Bytes of the data-out buffer the command transfers (WRITE: `length`; WRITE SAME: one block, or 0
   * with NDOB; VERIFY: `length`, one block or 0): a smaller buffer is the transport's overrun.
   */
  dataOutLength = 0;
  /** WRITE SAME: the block is all zeroes; `unmap`: and the initiator allows deallocating (UNMAP bit, discard on). */
  zeroes = false;
  unmap = false;
  /** VERIFY: {@link Bytchk} value. */
  compare: number = Bytchk.NONE;
  /** VERIFY: set by the transport to the byte offset (from `offset`) of the first difference; -1: none. */
  miscompare = -1;
  /** UNMAP: byte ranges. */
  rangeCount = 0;
  readonly rangeOffset = new Float64Array(MAX_UNMAP_DESCRIPTORS);
  readonly rangeLength = new Float64Array(MAX_UNMAP_DESCRIPTORS);
  /** The unit the I/O is for. */
  unit: LogicalUnit | null = null;
  /** The CHECK CONDITION's cause (for metrics: the sense key). */
  readonly info = new SenseInfo();

  /** Room for `n` bytes of data-in, zeroed. */
  reserve(n: number): Uint8Array {
    if (this.data.length < n) this.data = new Uint8Array(Math.max(n, this.data.length * 2));
    this.data.fill(0, 0, n);
    return this.data;
  }
}

/** Big-endian fields of a CDB or parameter list. */
function be16(b: Uint8Array, at: number): number {
  return (b[at]! << 8) | b[at + 1]!;
}

function be32(b: Uint8Array, at: number): number {
  return ((b[at]! << 24) | (b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!) >>> 0;
}

function put16(b: Uint8Array, at: number, v: number): void {
  b[at] = (v >>> 8) & 0xff;
  b[at + 1] = v & 0xff;
}

function put32(b: Uint8Array, at: number, v: number): void {
  b[at] = (v >>> 24) & 0xff;
  b[at + 1] = (v >>> 16) & 0xff;
  b[at + 2] = (v >>> 8) & 0xff;
  b[at + 3] = v & 0xff;
}

/** A 64-bit value known to be below 2^53. */
function put64(b: Uint8Array, at: number, v: number): void {
  put32(b, at, Math.floor(v / 0x100000000));
  put32(b, at + 4, v >>> 0);
}

function putAscii(b: Uint8Array, at: number, s: string, length: number): void {
  for (let i = 0; i < length; i++) b[at + i] = i < s.length ? s.charCodeAt(i) & 0x7f : 0x20;
}

/** LBA as a number, or -1 when it cannot be below 2^53 (beyond any capacity). */
function lba64(b: Uint8Array, at: number): number {
  const hi = be32(b, at);
  if (hi >= 1 << 21) return -1;
  return hi * 0x100000000 + be32(b, at + 4);
}

/** Mode page codes (SPC-4 §7.5.2, SBC-3 §6.4). */
const PAGE_CACHING = 0x08;
const PAGE_CONTROL = 0x0a;
const PAGE_ALL = 0x3f;
const CACHING_PAGE_LENGTH = 20;
const CONTROL_PAGE_LENGTH = 12;

/** Page control values of MODE SENSE (SPC-4 §6.11.1). */
const PC_CURRENT = 0;
const PC_CHANGEABLE = 1;
const PC_DEFAULT = 2;
const PC_SAVED = 3;

/** The changeable bits: WCE (caching byte 2 bit 2) and D_SENSE (control byte 2 bit 2). */
const WCE = 0x04;
const D_SENSE = 0x04;

/**
 * Write mode page `page` (caching or control) as page control `control` asks at `at`; returns the
 * end. Only WCE and D_SENSE change (MODE SELECT); everything else is fixed.
 */
function writeModePage(d: Uint8Array, at: number, page: number, control: number, unit: LogicalUnit): number {
  const length = page === PAGE_CACHING ? CACHING_PAGE_LENGTH : CONTROL_PAGE_LENGTH;
  d.fill(0, at, at + length);
  d[at] = page;
  d[at + 1] = length - 2;
  if (page === PAGE_CACHING) {
    if (control === PC_CHANGEABLE) d[at + 2] = WCE;
    else if (control === PC_DEFAULT || unit.writeCache) d[at + 2] = WCE;
  } else {
    if (control === PC_CHANGEABLE) d[at + 2] = D_SENSE;
    else if (control === PC_CURRENT && unit.descriptorSense) d[at + 2] = D_SENSE;
    if (control !== PC_CHANGEABLE) d[at + 3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
  }
  return at + length;
}

/** VPD pages (SPC-4 §7.8, SBC-3 §6.6). */
const VPD_SUPPORTED = 0x00;
const VPD_SERIAL = 0x80;
const VPD_DEVICE_ID = 0x83;
const VPD_BLOCK_LIMITS = 0xb0;
const VPD_BLOCK_CHARACTERISTICS = 0xb1;
const VPD_PROVISIONING = 0xb2;

/** Standard INQUIRY data length (SPC-4 §6.6.2: at least 36). */
const STANDARD_INQUIRY_LENGTH = 36;

const { ENOSPC, EOPNOTSUPP } = osConstants.errno;

export class ScsiTarget {
  private readonly units = new Map<number, LogicalUnit>();
  /** LUNs in ascending order (REPORT LUNS), rebuilt after a change. */
  private sorted: number[] | null = null;

  /** Units served, by LUN. */
  get size(): number {
    return this.units.size;
  }

  unit(lun: number): LogicalUnit | undefined {
    return this.units.get(lun);
  }

  /** Add unit `lun` (0..16383). Throws RangeError for a LUN out of range or taken. */
  addUnit(lun: number, unit: LogicalUnit): void {
    if (!Number.isInteger(lun) || lun < 0 || lun > MAX_LUN) throw new RangeError(`LUN ${lun} is not in 0..${MAX_LUN}`);
    if (this.units.has(lun)) throw new RangeError(`LUN ${lun} is already in use`);
    this.units.set(lun, unit);
    this.sorted = null;
  }

  removeUnit(lun: number): LogicalUnit | undefined {
    const unit = this.units.get(lun);
    this.units.delete(lun);
    this.sorted = null;
    return unit;
  }

  /** Run `cmd` addressed to `lun` of this target; the outcome goes into `out`. */
  execute(lun: number, cmd: ScsiCommand, out: ScsiResult): void {
    out.action = ScsiAction.COMPLETE;
    out.status = Status.GOOD;
    out.senseLength = 0;
    out.dataLength = 0;
    out.fua = false;
    out.dataOutLength = 0;
    out.miscompare = -1;
    out.rangeCount = 0;
    out.info.clear();
    const cdb = cmd.cdb;
    const unit = this.units.get(lun);
    out.unit = unit ?? null;
    const op = cdb[0]!;
    if (unit === undefined) {
      // SPC-4 §6.6.2 / SAM-5 §5.9: a LUN with no unit answers INQUIRY (peripheral qualifier 011b),
      // REPORT LUNS and REQUEST SENSE; anything else is LOGICAL UNIT NOT SUPPORTED.
      switch (op) {
        case Op.INQUIRY:
          if ((cdb[1]! & 1) !== 0) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED);
          return this.inquiry(cdb, null, out);
        case Op.REPORT_LUNS:
          return this.reportLuns(cdb, out);
        case Op.REQUEST_SENSE:
          return this.requestSense(cdb, out, Asc.LOGICAL_UNIT_NOT_SUPPORTED);
        default:
          return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED);
      }
    }
    switch (op) {
      case Op.TEST_UNIT_READY:
      case Op.PREVENT_ALLOW_MEDIUM_REMOVAL:
      case Op.START_STOP_UNIT:
        // A disk that is always ready, never removable, and has no power conditions to change.
        return;
      case Op.INQUIRY:
        return this.inquiry(cdb, unit, out);
      case Op.REPORT_LUNS:
        return this.reportLuns(cdb, out);
      case Op.REQUEST_SENSE:
        // Sense data travels with the CHECK CONDITION (autosense): nothing is pending.
        return this.requestSense(cdb, out, Asc.NO_ADDITIONAL_SENSE);
      case Op.READ_CAPACITY_10:
        return this.readCapacity10(unit, out);
      case Op.SERVICE_ACTION_IN_16:
        if ((cdb[1]! & 0x1f) !== SAI_READ_CAPACITY_16) return this.invalidField(out, 1, 4);
        return this.readCapacity16(cdb, unit, out);
      case Op.READ_6:
      case Op.WRITE_6: {
        const lba = ((cdb[1]! & 0x1f) << 16) | be16(cdb, 2);
        // SBC-3 §5.14: a TRANSFER LENGTH of 0 in READ(6)/WRITE(6) means 256 blocks.
        return this.readWrite(op === Op.WRITE_6, unit, lba, cdb[4]! || 256, false, out);
      }
      case Op.READ_10:
      case Op.WRITE_10:
        if ((cdb[1]! & 0xe0) !== 0) return this.invalidField(out, 1, 7);
        return this.readWrite(op === Op.WRITE_10, unit, be32(cdb, 2), be16(cdb, 7), (cdb[1]! & 0x08) !== 0, out);
      case Op.READ_12:
      case Op.WRITE_12:
        if ((cdb[1]! & 0xe0) !== 0) return this.invalidField(out, 1, 7);
        return this.readWrite(op === Op.WRITE_12, unit, be32(cdb, 2), be32(cdb, 6), (cdb[1]! & 0x08) !== 0, out);
      case Op.READ_16:
      case Op.WRITE_16:
        if ((cdb[1]! & 0xe0) !== 0) return this.invalidField(out, 1, 7);
        return this.readWrite(op === Op.WRITE_16, unit, lba64(cdb, 2), be32(cdb, 10), (cdb[1]! & 0x08) !== 0, out);
      case Op.SYNCHRONIZE_CACHE_10:
        return this.synchronizeCache(unit, be32(cdb, 2), be16(cdb, 7), out);
      case Op.SYNCHRONIZE_CACHE_16:
        return this.synchronizeCache(unit, lba64(cdb, 2), be32(cdb, 10), out);
      case Op.VERIFY_10:
        return this.verify(cdb, unit, be32(cdb, 2), be16(cdb, 7), 7, out);
      case Op.VERIFY_16:
        return this.verify(cdb, unit, lba64(cdb, 2), be32(cdb, 10), 10, out);
      case Op.WRITE_SAME_10:
        return this.writeSame(cmd, unit, be32(cdb, 2), be16(cdb, 7), false, out);
      case Op.WRITE_SAME_16:
        return this.writeSame(cmd, unit, lba64(cdb, 2), be32(cdb, 10), true, out);
      case Op.MODE_SENSE_6:
        return this.modeSense(cdb, unit, false, out);
      case Op.MODE_SENSE_10:
        return this.modeSense(cdb, unit, true, out);
      case Op.MODE_SELECT_6:
        return this.modeSelect(cmd, unit, false, out);
      case Op.MODE_SELECT_10:
        return this.modeSelect(cmd, unit, true, out);
      case Op.MAINTENANCE_IN:
        switch (cdb[1]! & 0x1f) {
          case SA_REPORT_SUPPORTED_OPCODES:
            return this.reportSupportedOpcodes(cdb, unit, out);
          case SA_REPORT_SUPPORTED_TMFS:
            return this.reportSupportedTmfs(cdb, out);
          default:
            return this.invalidField(out, 1, 4);
        }
      case Op.UNMAP:
        return this.unmap(cmd, unit, out);
      default:
        return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE, 0);
    }
  }

  /**
   * The transport did the I/O `out` asked for: `result` is the bytes moved (READ/WRITE, WRITE SAME,
   * VERIFY), 0 (FLUSH, UNMAP) or -errno. Sets status and sense.
   */
  completeIo(out: ScsiResult, result: number): void {
    switch (out.action) {
      case ScsiAction.READ:
        if (result !== out.length) this.fail(out, SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR);
        return;
      case ScsiAction.VERIFY:
        if (result !== out.length) return this.fail(out, SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR);
        if (out.miscompare >= 0) {
          // SBC-3 §5.33: MISCOMPARE, the offset of the first byte that differs in the INFORMATION field.
          const at = out.miscompare;
          out.info.set(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY);
          out.info.information = at;
          this.check(out);
        }
        return;
      case ScsiAction.WRITE:
      case ScsiAction.WRITE_SAME:
      case ScsiAction.FLUSH:
        if (result === -ENOSPC) this.fail(out, SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT);
        else if (result < 0 || (out.action !== ScsiAction.FLUSH && result !== out.length)) this.fail(out, SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR);
        return;
      case ScsiAction.UNMAP:
        // SBC-3 §4.7.3.4: with LBPRZ 0 unmapped blocks read back anything, so a file system that cannot
        // punch holes leaves the data and the command still succeeds.
        if (result < 0 && result !== -EOPNOTSUPP) this.fail(out, SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE);
        return;
    }
  }

  /** CHECK CONDITION with fixed-format sense data. */
  private fail(out: ScsiResult, key: number, asc: number, field = -1, bit = -1, inCdb = true): void {
    out.info.set(key, asc, field, bit, inCdb);
    this.check(out);
  }

  /** CHECK CONDITION for the cause in `out.info`. */
  private check(out: ScsiResult): void {
    out.action = ScsiAction.COMPLETE;
    out.status = Status.CHECK_CONDITION;
    out.dataLength = 0;
    // The control page's D_SENSE (set by MODE SELECT) asks for descriptor format (SPC-4 §7.5.8).
    out.senseLength = encodeSense(out.info, out.unit?.descriptorSense ?? false, out.sense);
  }

  private invalidField(out: ScsiResult, field: number, bit = -1): void {
    this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, field, bit);
  }

  /** Data-in of `length` bytes was built in `out.data`: hand over at most `allocation` of them. */
  private dataIn(out: ScsiResult, length: number, allocation: number): void {
    out.dataLength = Math.min(length, allocation);
  }

  /** The range `lba .. lba+blocks` within the unit? (-1: an LBA beyond 2^53.) */
  private inRange(unit: LogicalUnit, lba: number, blocks: number): boolean {
    return lba >= 0 && lba <= unit.blocks && blocks <= unit.blocks - lba;
  }

  private readWrite(write: boolean, unit: LogicalUnit, lba: number, blocks: number, fua: boolean, out: ScsiResult): void {
    // SBC-3 §4.5: check the range before the write protection (the LBA is a CDB fault either way).
    if (!this.inRange(unit, lba, blocks)) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE);
    if (blocks * unit.blockSize > MAX_TRANSFER_BYTES) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB);
    if (write && unit.options.readOnly) return this.fail(out, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED);
    if (blocks === 0) return; // SBC-3: a TRANSFER LENGTH of 0 transfers nothing and is not an error
    out.action = write ? ScsiAction.WRITE : ScsiAction.READ;
    out.offset = lba * unit.blockSize;
    out.length = blocks * unit.blockSize;
    out.dataOutLength = write ? out.length : 0;
    // Writes go to the page cache unless FUA or the write cache is off (caching page WCE 0).
    out.fua = write && (fua || !unit.writeCache);
  }

  private synchronizeCache(unit: LogicalUnit, lba: number, blocks: number, out: ScsiResult): void {
    // SBC-3 §5.22: NUMBER OF LOGICAL BLOCKS 0 means "to the end of the medium".
    if (!this.inRange(unit, lba, blocks)) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE);
    if (unit.options.readOnly) return; // nothing can be dirty
    out.action = ScsiAction.FLUSH;
  }

  /**
   * VERIFY(10)/(16) (SBC-3 §5.33, §5.35): read the range back (BYTCHK 00b) and compare it with the
   * data-out buffer (01b: the blocks themselves, at most a transfer's worth; 11b: one block for all).
   * `lengthField`: the CDB byte of VERIFICATION LENGTH.
   */
  private verify(cdb: Uint8Array, unit: LogicalUnit, lba: number, blocks: number, lengthField: number, out: ScsiResult): void {
    if ((cdb[1]! & 0xe0) !== 0) return this.invalidField(out, 1, 7); // VRPROTECT: no protection information
    const bytchk = (cdb[1]! >> 1) & 0x03;
    if (bytchk === 2) return this.invalidField(out, 1, 2); // reserved
    if (!this.inRange(unit, lba, blocks)) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE);
    const length = blocks * unit.blockSize;
    if (length > (bytchk === Bytchk.ALL ? MAX_TRANSFER_BYTES : MAX_WRITE_SAME_BYTES)) return this.invalidField(out, lengthField);
    if (blocks === 0) return; // SBC-3: nothing to verify, not an error
    out.action = ScsiAction.VERIFY;
    out.offset = lba * unit.blockSize;
    out.length = length;
    out.compare = bytchk;
    out.dataOutLength = bytchk === Bytchk.ALL ? length : bytchk === Bytchk.ONE_BLOCK ? unit.blockSize : 0;
  }

  private readonly block = new Uint8Array(4096);

  /**
   * WRITE SAME(10)/(16) (SBC-3 §5.41, §5.42): one block written over the range. NDOB (16 only) or a
   * block of zeroes may become a zero-range fallocate, and with the UNMAP bit on a unit with discard a
   * hole (a hole reads back zeroes). The UNMAP bit allows deallocating, it does not demand it: on a unit
   * without discard (no LBPWS reported) the blocks are written.
   */
  private writeSame(cmd: ScsiCommand, unit: LogicalUnit, lba: number, blocks: number, sixteen: boolean, out: ScsiResult): void {
    const flags = cmd.cdb[1]!;
    const lengthField = sixteen ? 10 : 7; // NUMBER OF LOGICAL BLOCKS
    if ((flags & 0xe0) !== 0) return this.invalidField(out, 1, 7); // WRPROTECT: no protection information
    if ((flags & 0x10) !== 0) return this.invalidField(out, 1, 4); // ANCHOR: no anchored state
    // PBDATA, LBDATA (bits 2, 1) are obsolete; bit 0 is NDOB in WRITE SAME(16), reserved in (10).
    const reserved = sixteen ? 0x06 : 0x07;
    if ((flags & reserved) !== 0) return this.invalidField(out, 1, (flags & 0x04) !== 0 ? 2 : (flags & 0x02) !== 0 ? 1 : 0);
    // WSNZ (VPD B0h): 0 blocks does not mean "to the end of the medium" here.
    if (blocks === 0) return this.invalidField(out, lengthField);
    if (!this.inRange(unit, lba, blocks)) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE);
    if (blocks * unit.blockSize > MAX_WRITE_SAME_BYTES) return this.invalidField(out, lengthField);
    if (unit.options.readOnly) return this.fail(out, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED);
    const ndob = sixteen && (flags & 0x01) !== 0;
    let zeroes = true;
    if (!ndob) {
      const block = this.block.subarray(0, unit.blockSize);
      // A short buffer is the transport's overrun (dataOutLength); only a whole block can be zeroes.
      zeroes = cmd.readDataOut(block) === block.length && block.every((b) => b === 0);
    }
    out.action = ScsiAction.WRITE_SAME;
    out.offset = lba * unit.blockSize;
    out.length = blocks * unit.blockSize;
    out.dataOutLength = ndob ? 0 : unit.blockSize;
    out.zeroes = zeroes;
    out.unmap = zeroes && (flags & 0x08) !== 0 && unit.options.discard;
    out.fua = !unit.writeCache;
  }

  private inquiry(cdb: Uint8Array, unit: LogicalUnit | null, out: ScsiResult): void {
    const allocation = be16(cdb, 3);
    const evpd = (cdb[1]! & 1) !== 0;
    const page = cdb[2]!;
    if (!evpd) {
      // SPC-4 §6.6.1: PAGE CODE must be 0 without EVPD.
      if (page !== 0) return this.invalidField(out, 2);
      const d = out.reserve(STANDARD_INQUIRY_LENGTH);
      d[0] = unit === null ? 0x7f : 0x00; // qualifier 011b type 1Fh: no unit here; else 000b direct access
      d[2] = 0x06; // SPC-4
      d[3] = 0x12; // HISUP, response data format 2
      d[4] = STANDARD_INQUIRY_LENGTH - 5;
      d[7] = 0x02; // CMDQUE
      putAscii(d, 8, VENDOR, 8);
      putAscii(d, 16, PRODUCT, 16);
      putAscii(d, 32, REVISION, 4);
      return this.dataIn(out, STANDARD_INQUIRY_LENGTH, allocation);
    }
    const u = unit!;
    let length: number;
    switch (page) {
      case VPD_SUPPORTED: {
        const pages = [VPD_SUPPORTED, VPD_SERIAL, VPD_DEVICE_ID, VPD_BLOCK_LIMITS, VPD_BLOCK_CHARACTERISTICS];
        if (u.options.discard) pages.push(VPD_PROVISIONING);
        const d = out.reserve(4 + pages.length);
        d.set(pages, 4);
        length = 4 + pages.length;
        break;
      }
      case VPD_SERIAL: {
        const serial = u.options.serial;
        const d = out.reserve(4 + serial.length);
        putAscii(d, 4, serial, serial.length);
        length = 4 + serial.length;
        break;
      }
      case VPD_DEVICE_ID: {
        // Two designators: NAA (binary, associated with the unit) and T10 vendor ID (ASCII, vendor + serial).
        const t10 = VENDOR + u.options.serial;
        const d = out.reserve(4 + 12 + 4 + t10.length);
        let at = 4;
        d[at] = 0x01; // code set: binary
        d[at + 1] = 0x03; // association: logical unit; designator type: NAA
        d[at + 3] = 8;
        d.set(u.options.naa, at + 4);
        at += 12;
        d[at] = 0x02; // code set: ASCII
        d[at + 1] = 0x01; // association: logical unit; designator type: T10 vendor ID
        d[at + 3] = t10.length;
        putAscii(d, at + 4, t10, t10.length);
        length = at + 4 + t10.length;
        break;
      }
      case VPD_BLOCK_LIMITS: {
        const d = out.reserve(64);
        d[4] = 0x01; // WSNZ: WRITE SAME of 0 blocks is refused
        put32(d, 8, MAX_TRANSFER_BYTES / u.blockSize); // MAXIMUM TRANSFER LENGTH
        if (u.options.discard) {
          put32(d, 20, MAX_UNMAP_BYTES / u.blockSize); // MAXIMUM UNMAP LBA COUNT
          put32(d, 24, MAX_UNMAP_DESCRIPTORS); // MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
          put32(d, 28, 1); // OPTIMAL UNMAP GRANULARITY
        }
        put64(d, 36, MAX_WRITE_SAME_BYTES / u.blockSize); // MAXIMUM WRITE SAME LENGTH
        length = 64;
        break;
      }
      case VPD_BLOCK_CHARACTERISTICS: {
        const d = out.reserve(64);
        put16(d, 4, 1); // MEDIUM ROTATION RATE: non-rotating medium
        length = 64;
        break;
      }
      case VPD_PROVISIONING: {
        if (!u.options.discard) return this.invalidField(out, 2);
        const d = out.reserve(8);
        d[5] = 0x80 | 0x40 | 0x20; // LBPU, LBPWS, LBPWS10: UNMAP and WRITE SAME(16)/(10) with UNMAP deallocate
        d[6] = 0x02; // PROVISIONING TYPE: thin
        length = 8;
        break;
      }
      default:
        return this.invalidField(out, 2);
    }
    const d = out.data;
    d[1] = page;
    put16(d, 2, length - 4);
    this.dataIn(out, length, allocation);
  }

  private reportLuns(cdb: Uint8Array, out: ScsiResult): void {
    const allocation = be32(cdb, 6);
    // SPC-4 §6.33: an ALLOCATION LENGTH below 16 is an error.
    if (allocation < 16) return this.invalidField(out, 6);
    const select = cdb[2]!;
    // SELECT REPORT 00h and 02h: every unit (we have no well-known units); 01h: the well-known ones.
    if (select > 2) return this.invalidField(out, 2);
    this.sorted ??= [...this.units.keys()].sort((a, b) => a - b);
    const luns = select === 1 ? [] : this.sorted;
    const length = 8 + 8 * luns.length;
    const d = out.reserve(length);
    put32(d, 0, 8 * luns.length);
    for (let i = 0; i < luns.length; i++) {
      const lun = luns[i]!;
      // SAM-5 §4.7: peripheral device addressing below 256, flat space addressing above.
      const at = 8 + 8 * i;
      d[at] = lun < 256 ? 0 : 0x40 | (lun >> 8);
      d[at + 1] = lun & 0xff;
    }
    this.dataIn(out, length, allocation);
  }

  private requestSense(cdb: Uint8Array, out: ScsiResult, asc: number): void {
    const descriptor = (cdb[1]! & 1) !== 0;
    const info = out.info;
    info.set(asc === Asc.NO_ADDITIONAL_SENSE ? SenseKey.NO_SENSE : SenseKey.ILLEGAL_REQUEST, asc);
    const length = encodeSense(info, descriptor, out.reserve(SENSE_BUFFER_LENGTH));
    info.clear();
    this.dataIn(out, length, cdb[4]!);
  }

  private readCapacity10(unit: LogicalUnit, out: ScsiResult): void {
    const d = out.reserve(8);
    // SBC-3 §5.15: FFFFFFFFh when the last LBA does not fit: the initiator then asks READ CAPACITY(16).
    const last = unit.blocks - 1;
    put32(d, 0, last > 0xfffffffe ? 0xffffffff : Math.max(last, 0));
    put32(d, 4, unit.blockSize);
    out.dataLength = 8;
  }

  private readCapacity16(cdb: Uint8Array, unit: LogicalUnit, out: ScsiResult): void {
    const d = out.reserve(32);
    put64(d, 0, Math.max(unit.blocks - 1, 0));
    put32(d, 8, unit.blockSize);
    if (unit.options.discard) d[14] = 0x80; // LBPME
    this.dataIn(out, 32, be32(cdb, 10));
  }

  /** MODE SENSE(6)/(10) (SPC-4 §6.11, §6.12): caching and control pages, block descriptor. */
  private modeSense(cdb: Uint8Array, unit: LogicalUnit, ten: boolean, out: ScsiResult): void {
    const dbd = (cdb[1]! & 0x08) !== 0;
    const llbaa = ten && (cdb[1]! & 0x10) !== 0;
    const control = cdb[2]! >> 6;
    const page = cdb[2]! & 0x3f;
    const subpage = cdb[3]!;
    const allocation = ten ? be16(cdb, 7) : cdb[4]!;
    if (control === PC_SAVED) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.SAVING_PARAMETERS_NOT_SUPPORTED, 2, 7);
    if (page !== PAGE_CACHING && page !== PAGE_CONTROL && page !== PAGE_ALL) return this.invalidField(out, 2, 5);
    if (subpage !== 0 && !(page === PAGE_ALL && subpage === 0xff)) return this.invalidField(out, 3);
    const header = ten ? 8 : 4;
    const descriptor = dbd ? 0 : llbaa ? 16 : 8;
    const d = out.reserve(header + descriptor + CACHING_PAGE_LENGTH + CONTROL_PAGE_LENGTH);
    let at = header;
    if (descriptor === 16) {
      put64(d, at, unit.blocks);
      put32(d, at + 12, unit.blockSize);
    } else if (descriptor === 8) {
      // SBC-3 §6.4.2 short LBA descriptor: NUMBER OF LOGICAL BLOCKS saturates at FFFFFFFFh; the block
      // length is bytes 5-7 (byte 4 reserved).
      put32(d, at, Math.min(unit.blocks, 0xffffffff));
      put32(d, at + 4, unit.blockSize);
    }
    at += descriptor;
    if (page === PAGE_CACHING || page === PAGE_ALL) at = writeModePage(d, at, PAGE_CACHING, control, unit);
    if (page === PAGE_CONTROL || page === PAGE_ALL) at = writeModePage(d, at, PAGE_CONTROL, control, unit);
    // Device-specific parameter (SBC-3 §6.4.1): WP for a read-only unit, DPOFUA (FUA is honoured).
    const specific = (unit.options.readOnly ? 0x80 : 0) | 0x10;
    if (ten) {
      put16(d, 0, at - 2);
      d[3] = specific;
      d[4] = llbaa && descriptor === 16 ? 1 : 0; // LONGLBA
      put16(d, 6, descriptor);
    } else {
      d[0] = at - 1;
      d[2] = specific;
      d[3] = descriptor;
    }
    this.dataIn(out, at, allocation);
  }

  /**
   * MODE SELECT(6)/(10) (SPC-4 §6.9, §6.10): the caching page's WCE and the control page's D_SENSE
   * change; any other field must keep its current value (else INVALID FIELD IN PARAMETER LIST).
   */
  private modeSelect(cmd: ScsiCommand, unit: LogicalUnit, ten: boolean, out: ScsiResult): void {
    const cdb = cmd.cdb;
    if ((cdb[1]! & 0x01) !== 0) return this.invalidField(out, 1, 0); // SP: saving is not supported
    const listLength = ten ? be16(cdb, 7) : cdb[4]!;
    if (listLength === 0) return;
    const header = ten ? 8 : 4;
    const p = this.parameters;
    if (listLength > p.length) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR);
    const got = cmd.readDataOut(p.subarray(0, listLength));
    if (got < listLength || listLength < header) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR);
    const descriptors = ten ? be16(p, 6) : p[3]!;
    let at = header;
    if (descriptors !== 0) {
      // One block descriptor, whose block length must be the unit's (the last 3 or 4 bytes).
      const size = ten && (p[4]! & 1) !== 0 ? 16 : 8;
      if (descriptors !== size || at + size > listLength) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, ten ? 6 : 3, -1, false);
      const blockLength = size === 16 ? be32(p, at + 12) : be32(p, at + 4) & 0xffffff;
      if (blockLength !== unit.blockSize) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, at + size - 3, -1, false);
      at += size;
    }
    const current = this.modePage;
    let writeCache = unit.writeCache;
    let descriptorSense = unit.descriptorSense;
    while (at < listLength) {
      const page = p[at]! & 0x3f;
      if ((p[at]! & 0x40) !== 0 || (page !== PAGE_CACHING && page !== PAGE_CONTROL)) {
        return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, at, -1, false);
      }
      const end = writeModePage(current, 0, page, PC_CURRENT, unit);
      if (at + 1 >= listLength || p[at + 1] !== end - 2 || at + end > listLength) {
        return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, at + 1, -1, false);
      }
      for (let i = 2; i < end; i++) {
        const mask = i === 2 ? ~WCE & 0xff : 0xff; // WCE and D_SENSE are both bit 2 of byte 2
        if ((p[at + i]! & mask) !== (current[i]! & mask)) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, at + i, -1, false);
      }
      if (page === PAGE_CACHING) writeCache = (p[at + 2]! & WCE) !== 0;
      else descriptorSense = (p[at + 2]! & D_SENSE) !== 0;
      at += end;
    }
    unit.writeCache = writeCache;
    unit.descriptorSense = descriptorSense;
  }

  private readonly modePage = new Uint8Array(CACHING_PAGE_LENGTH);

  /**
   * REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35): every command with its CDB length (reporting
   * options 000b), or one command's support and usage data (001b, 010b).
   */
  private reportSupportedOpcodes(cdb: Uint8Array, unit: LogicalUnit, out: ScsiResult): void {
    const options = cdb[2]! & 0x07;
    const allocation = be32(cdb, 6);
    const supported = supportedCommands(unit);
    if (options === 0) {
      const d = out.reserve(4 + 8 * supported.length);
      put32(d, 0, 8 * supported.length);
      supported.forEach(([op, sa, length], i) => {
        const at = 4 + 8 * i;
        d[at] = op;
        put16(d, at + 2, sa < 0 ? 0 : sa);
        d[at + 5] = sa < 0 ? 0 : 0x01; // SERVACTV
        put16(d, at + 6, length);
      });
      return this.dataIn(out, 4 + 8 * supported.length, allocation);
    }
    if (options !== 1 && options !== 2) return this.invalidField(out, 2, 2);
    const op = cdb[3]!;
    const sa = be16(cdb, 4);
    const hasActions = supported.some(([o, s]) => o === op && s >= 0);
    // Option 1 names a command without service actions, option 2 one with (SPC-4 table 204).
    if ((options === 1) === hasActions) return this.invalidField(out, 2, 2);
    const entry = supported.find(([o, s]) => o === op && (options === 1 || s === sa));
    const length = entry?.[2] ?? 0;
    const d = out.reserve(4 + length);
    d[1] = entry === undefined ? 0x01 : 0x03; // SUPPORT: not supported / supported as the standard says
    put16(d, 2, length);
    if (entry !== undefined) {
      // The CDB usage map: the bits the command looks at (all of them here, the opcode first).
      d.fill(0xff, 4, 4 + length);
      d[4] = op;
      if (options === 2) d[5] = sa & 0x1f;
    }
    this.dataIn(out, 4 + length, allocation);
  }

  /** REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-4 §6.36): what the control queue answers. */
  private reportSupportedTmfs(cdb: Uint8Array, out: ScsiResult): void {
    const extended = (cdb[2]! & 0x80) !== 0; // REPD: the 16-byte extended format
    const length = extended ? 16 : 4;
    const d = out.reserve(length);
    d[0] = 0x80 | 0x40 | 0x10 | 0x08 | 0x04; // ATS, ATSS, CTSS, LURS, QTS (no CLEAR ACA)
    d[1] = 0x03; // QTSS, ITNRS
    if (extended) d[3] = 0x0c; // ADDITIONAL DATA LENGTH
    this.dataIn(out, length, be32(cdb, 6));
  }

  private readonly parameters = new Uint8Array(8 + 16 * MAX_UNMAP_DESCRIPTORS);

  /** UNMAP (SBC-3 §5.28): a parameter list of block descriptors to deallocate. */
  private unmap(cmd: ScsiCommand, unit: LogicalUnit, out: ScsiResult): void {
    if (!unit.options.discard) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE, 0);
    if (unit.options.readOnly) return this.fail(out, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED);
    if ((cmd.cdb[1]! & 0x01) !== 0) return this.invalidField(out, 1, 0); // ANCHOR: no anchored state
    const listLength = be16(cmd.cdb, 7);
    if (listLength === 0) return; // SBC-3: not an error, nothing to do
    if (listLength < 8) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR);
    const p = this.parameters;
    const got = cmd.readDataOut(p.subarray(0, Math.min(listLength, p.length)));
    if (got < 8) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR);
    const descriptorBytes = be16(p, 2);
    if (descriptorBytes % 16 !== 0 || 8 + descriptorBytes > got) {
      return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, 2, -1, false);
    }
    const count = descriptorBytes / 16;
    if (count > MAX_UNMAP_DESCRIPTORS) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, 2, -1, false);
    let ranges = 0;
    for (let i = 0; i < count; i++) {
      const at = 8 + 16 * i;
      const lba = lba64(p, at);
      const blocks = be32(p, at + 8);
      if (!this.inRange(unit, lba, blocks)) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE);
      if (blocks * unit.blockSize > MAX_UNMAP_BYTES) return this.fail(out, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, at + 8, -1, false);
      if (blocks === 0) continue;
      out.rangeOffset[ranges] = lba * unit.blockSize;
      out.rangeLength[ranges] = blocks * unit.blockSize;
      ranges++;
    }
    if (ranges === 0) return;
    out.action = ScsiAction.UNMAP;
    out.rangeCount = ranges;
  }
}
