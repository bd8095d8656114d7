/** virtio-scsi requests and responses as a driver builds and reads them (tests). */
import { CDB_SIZE, CMD_HEADER_SIZE, RESP_HEADER_SIZE } from '../../../daemons/scsi/virtio-scsi';
import type { ChainSpec, SegmentSpec } from '../../helpers/frontend';

/** The LUN field as Linux virtio_scsi builds requests: flat space addressing. */
export function requestLun(target: number, lun: number): Uint8Array {
  return Uint8Array.of(1, target, 0x40 | (lun >> 8), lun & 0xff, 0, 0, 0, 0);
}

/** struct virtio_scsi_req_cmd header for `target:lun` with `cdb` (and request id `id`). */
export function cmdHeader(target: number, lun: number, cdb: number[], id = 1): Uint8Array {
  const h = new Uint8Array(CMD_HEADER_SIZE);
  h.set(requestLun(target, lun), 0);
  new DataView(h.buffer).setUint32(8, id, true);
  h.set(cdb.slice(0, CDB_SIZE), 19);
  return h;
}

export interface CommandOptions {
  dataOut?: Uint8Array;
  /** Data-in buffer bytes (several segments when `dataInParts` > 1). */
  dataIn?: number;
  dataInParts?: number;
  id?: number;
  region?: number;
  indirect?: boolean;
  /** The response header as buffers of these lengths (adding up to 108), not one buffer. */
  responseParts?: number[];
}

/** A command chain: header (+ data-out) readable, response header (+ data-in) writable. */
export function command(target: number, lun: number, cdb: number[], o: CommandOptions = {}): ChainSpec {
  const readable: SegmentSpec[] = [{ data: cmdHeader(target, lun, cdb, o.id) }];
  if (o.dataOut !== undefined && o.dataOut.length > 0) {
    const half = Math.floor(o.dataOut.length / 2 / 512) * 512;
    if (half > 0) readable.push({ data: o.dataOut.subarray(0, half), region: o.region ?? 0 }, { data: o.dataOut.subarray(half), region: ((o.region ?? 0) + 1) % 3 });
    else readable.push({ data: o.dataOut });
  }
  const writable: SegmentSpec[] = (o.responseParts ?? [RESP_HEADER_SIZE]).map((length) => ({ length }));
  const dataIn = o.dataIn ?? 0;
  const parts = o.dataInParts ?? 1;
  for (let i = 0, left = dataIn; left > 0; i++) {
    const n = i === parts - 1 ? left : Math.ceil(dataIn / parts);
    writable.push({ length: n, region: (i + (o.region ?? 0)) % 3 });
    left -= n;
  }
  return { readable, writable, indirect: o.indirect };
}

/** The response of a completed command. */
export interface Response {
  senseLength: number;
  residual: number;
  status: number;
  response: number;
  sense: Uint8Array;
  data: Uint8Array;
  /** Bytes the device said it wrote. */
  len: number;
}

export function parseResponse(c: { len: number; written: Uint8Array }): Response {
  const w = c.written;
  const v = new DataView(w.buffer, w.byteOffset, w.length);
  const senseLength = v.getUint32(0, true);
  return {
    senseLength,
    residual: v.getUint32(4, true),
    status: w[10]!,
    response: w[11]!,
    sense: w.subarray(12, 12 + senseLength),
    data: w.subarray(RESP_HEADER_SIZE),
    len: c.len,
  };
}

/** Big-endian CDB fields. */
export function rw10(op: number, lba: number, blocks: number, flags = 0): number[] {
  return [op, flags, (lba >>> 24) & 0xff, (lba >>> 16) & 0xff, (lba >>> 8) & 0xff, lba & 0xff, 0, (blocks >> 8) & 0xff, blocks & 0xff, 0];
}

export function rw16(op: number, lba: number, blocks: number, flags = 0): number[] {
  const hi = Math.floor(lba / 0x100000000);
  return [op, flags, 0, 0, (hi >>> 8) & 0xff, hi & 0xff, (lba >>> 24) & 0xff, (lba >>> 16) & 0xff, (lba >>> 8) & 0xff, lba & 0xff, (blocks >>> 24) & 0xff, (blocks >>> 16) & 0xff, (blocks >>> 8) & 0xff, blocks & 0xff, 0, 0];
}

/** struct virtio_scsi_ctrl_tmf request. */
export function tmf(subtype: number, target: number, lun: number, id = 0): ChainSpec {
  const b = new Uint8Array(24);
  const v = new DataView(b.buffer);
  v.setUint32(0, 0, true);
  v.setUint32(4, subtype, true);
  b.set(requestLun(target, lun), 8);
  v.setUint32(16, id, true);
  return { readable: [{ data: b }], writable: [{ length: 1 }] };
}
