/**
 * A logical unit as the SCSI target sees it: a direct-access block device (peripheral device type
 * 00h) of `blocks` logical blocks. It holds no file: the transport does the I/O the target asks for
 * and tells the unit its capacity (and a new one after the image grew).
 */
import { createHash } from 'node:crypto';

export interface LogicalUnitOptions {
  /** Logical block size in bytes: 512 or 4096. */
  blockSize: number;
  readOnly: boolean;
  /** Logical block provisioning: UNMAP deallocates (VPD B2h LBPU, READ CAPACITY(16) LBPME). */
  discard: boolean;
  /** Unit serial number (VPD 80h), printable ASCII. */
  serial: string;
  /** 8-byte NAA designator (VPD 83h), see {@link naaDesignator}. */
  naa: Uint8Array;
}

/** Bytes of {@link LogicalUnit.modes}: WCE, D_SENSE. */
const WCE = 0;
const D_SENSE = 1;
const MODE_BYTES = 2;

export class LogicalUnit {
  /** Capacity in logical blocks. */
  blocks = 0;
  /**
   * The changeable mode page bits, in shared memory: when copies of the unit serve it in several
   * threads (request queues in workers, each with its own device), they share one buffer
   * ({@link shareModes}), so a MODE SELECT on any queue holds for all of them.
   */
  private modes = new Uint8Array(new SharedArrayBuffer(MODE_BYTES));

  constructor(
    readonly options: LogicalUnitOptions,
    capacityBytes: number,
  ) {
    this.setCapacity(capacityBytes);
    this.resetModes();
  }

  /** Write cache enabled (caching mode page WCE): writes complete in the host page cache, SYNCHRONIZE CACHE makes them durable. */
  get writeCache(): boolean {
    return Atomics.load(this.modes, WCE) !== 0;
  }

  set writeCache(on: boolean) {
    Atomics.store(this.modes, WCE, on ? 1 : 0);
  }

  /** Control mode page D_SENSE: CHECK CONDITIONs carry descriptor-format sense data. */
  get descriptorSense(): boolean {
    return Atomics.load(this.modes, D_SENSE) !== 0;
  }

  set descriptorSense(on: boolean) {
    Atomics.store(this.modes, D_SENSE, on ? 1 : 0);
  }

  /** The buffer of the mode bits, for another copy of the unit ({@link shareModes}). */
  get modesBuffer(): SharedArrayBuffer {
    return this.modes.buffer as SharedArrayBuffer;
  }

  /** Use the mode bits of another copy of this unit (its {@link modesBuffer}) from now on. */
  shareModes(buffer: SharedArrayBuffer): void {
    if (buffer.byteLength !== MODE_BYTES) throw new RangeError(`a unit's mode buffer is ${MODE_BYTES} bytes, not ${buffer.byteLength}`);
    this.modes = new Uint8Array(buffer);
  }

  /** Back to the power-on mode page values (a device reset: the driver's MODE SELECTs are forgotten). */
  resetModes(): void {
    this.writeCache = true;
    this.descriptorSense = false;
  }

  /** Whole logical blocks of an image of `bytes`. */
  setCapacity(bytes: number): void {
    this.blocks = Math.floor(bytes / this.options.blockSize);
  }

  get blockSize(): number {
    return this.options.blockSize;
  }

  get capacityBytes(): number {
    return this.blocks * this.options.blockSize;
  }
}

/**
 * A stable NAA designator for a unit named `name` (the daemon passes the serial number, or the target,
 * LUN and image path): NAA 3h, "locally assigned" (SPC-4 §7.8.6.6.5), whose 60 bits are ours to
 * choose, taken from a hash of the name so the guest sees the same WWN after a restart.
 */
export function naaDesignator(name: string): Uint8Array {
  const digest = createHash('sha256').update(name).digest();
  const out = new Uint8Array(8);
  out.set(digest.subarray(0, 8));
  out[0] = 0x30 | (out[0]! & 0x0f);
  return out;
}
