/**
 * Sense data (SPC-4 §4.5): what a CHECK CONDITION carries. A command fails with a {@link SenseInfo}
 * (key, ASC/ASCQ and, for ILLEGAL REQUEST, the field pointer SPC-4 §4.5.2.4.2 asks for), encoded in
 * fixed format (response code 70h, 18 bytes) or, when the initiator asked for it, descriptor format
 * (72h, 8-byte header plus an 8-byte sense-key-specific descriptor).
 */
import { Asc, SenseKey } from './constants';

/** Fixed-format sense data without vendor bytes (SPC-4 §4.5.3: additional sense length 10). */
export const FIXED_SENSE_LENGTH = 18;
/** Descriptor-format header plus an information descriptor and a sense-key-specific descriptor. */
export const DESCRIPTOR_SENSE_LENGTH = 8 + 12 + 8;
/** Room for either format. */
export const SENSE_BUFFER_LENGTH = DESCRIPTOR_SENSE_LENGTH;

/** One CHECK CONDITION's cause. Field pointers count bytes of the CDB (or of the parameter list). */
export class SenseInfo {
  key = 0;
  /** (ASC << 8) | ASCQ. */
  asc = 0;
  /** Byte of the CDB (`inCdb`) or parameter list in error; -1: no field pointer. */
  field = -1;
  /** Bit of that byte; -1: the whole byte. */
  bit = -1;
  inCdb = true;
  /** INFORMATION field (SPC-4 §4.5.2.2), e.g. the offset of a MISCOMPARE; -1: none. Below 2^32. */
  information = -1;

  set(key: number, asc: number, field = -1, bit = -1, inCdb = true): void {
    this.key = key;
    this.asc = asc;
    this.field = field;
    this.bit = bit;
    this.inCdb = inCdb;
    this.information = -1;
  }

  clear(): void {
    this.set(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE);
  }
}

/** Sense-key-specific bytes (SPC-4 §4.5.2.4.2, field pointer): 3 bytes into `out` at `at`. */
function encodeFieldPointer(info: SenseInfo, out: Uint8Array, at: number): void {
  if (info.field < 0) return;
  out[at] = 0x80 | (info.inCdb ? 0x40 : 0) | (info.bit >= 0 ? 0x08 | (info.bit & 7) : 0);
  out[at + 1] = (info.field >> 8) & 0xff;
  out[at + 2] = info.field & 0xff;
}

/** A 32-bit INFORMATION value, big-endian, at `at`. */
function putInformation(out: Uint8Array, at: number, value: number): void {
  out[at] = (value >>> 24) & 0xff;
  out[at + 1] = (value >>> 16) & 0xff;
  out[at + 2] = (value >>> 8) & 0xff;
  out[at + 3] = value & 0xff;
}

/**
 * Encode `info` into `out` (zeroed first for the bytes written) and return the length: fixed format
 * (70h, current error), or descriptor format (72h) when `descriptor`.
 */
export function encodeSense(info: SenseInfo, descriptor: boolean, out: Uint8Array): number {
  if (descriptor) {
    const length = 8 + (info.information >= 0 ? 12 : 0) + (info.field >= 0 ? 8 : 0);
    out.fill(0, 0, length);
    out[0] = 0x72;
    out[1] = info.key & 0x0f;
    out[2] = info.asc >> 8;
    out[3] = info.asc & 0xff;
    out[7] = length - 8;
    let at = 8;
    if (info.information >= 0) {
      // Information sense data descriptor (SPC-4 §4.5.2.2): VALID, 8-byte INFORMATION.
      out[at] = 0x00;
      out[at + 1] = 0x0a;
      out[at + 2] = 0x80;
      putInformation(out, at + 8, info.information);
      at += 12;
    }
    if (info.field >= 0) {
      out[at] = 0x02; // sense key specific sense data descriptor
      out[at + 1] = 0x06;
      encodeFieldPointer(info, out, at + 4);
    }
    return length;
  }
  out.fill(0, 0, FIXED_SENSE_LENGTH);
  out[0] = info.information >= 0 ? 0xf0 : 0x70; // VALID: the INFORMATION field (bytes 3-6) holds a value
  if (info.information >= 0) putInformation(out, 3, info.information);
  out[2] = info.key & 0x0f;
  out[7] = FIXED_SENSE_LENGTH - 8;
  out[12] = info.asc >> 8;
  out[13] = info.asc & 0xff;
  encodeFieldPointer(info, out, 15);
  return FIXED_SENSE_LENGTH;
}
