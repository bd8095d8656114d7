/**
 * virtio-blk as the spec defines it (virtio 1.2 §5.2, Linux include/uapi/linux/virtio_blk.h): feature
 * bits, request types, status values and the device configuration layout. Pure data and encoders; no
 * I/O and no native code, so unit tests use it directly.
 */

// virtio 1.2 §5.2.3: feature bits.
export const VIRTIO_BLK_F_SIZE_MAX = 1;
export const VIRTIO_BLK_F_SEG_MAX = 2;
export const VIRTIO_BLK_F_GEOMETRY = 4;
export const VIRTIO_BLK_F_RO = 5;
export const VIRTIO_BLK_F_BLK_SIZE = 6;
export const VIRTIO_BLK_F_FLUSH = 9;
export const VIRTIO_BLK_F_TOPOLOGY = 10;
export const VIRTIO_BLK_F_CONFIG_WCE = 11;
export const VIRTIO_BLK_F_MQ = 12;
export const VIRTIO_BLK_F_DISCARD = 13;
export const VIRTIO_BLK_F_WRITE_ZEROES = 14;

// virtio 1.2 §5.2.6: request types.
export const VIRTIO_BLK_T_IN = 0;
export const VIRTIO_BLK_T_OUT = 1;
export const VIRTIO_BLK_T_FLUSH = 4;
export const VIRTIO_BLK_T_GET_ID = 8;
export const VIRTIO_BLK_T_GET_LIFETIME = 10;
export const VIRTIO_BLK_T_DISCARD = 11;
export const VIRTIO_BLK_T_WRITE_ZEROES = 13;
export const VIRTIO_BLK_T_SECURE_ERASE = 14;

// virtio 1.2 §5.2.6: status byte values.
export const VIRTIO_BLK_S_OK = 0;
export const VIRTIO_BLK_S_IOERR = 1;
export const VIRTIO_BLK_S_UNSUPP = 2;

/** virtio_blk_discard_write_zeroes.flags bit 0. */
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;

/** virtio 1.2 §5.2.6: "The device ID string is a NUL-padded ASCII string up to 20 bytes long." */
export const VIRTIO_BLK_ID_BYTES = 20;

/** The `sector` unit of requests and of `capacity`, whatever the logical block size. */
export const SECTOR_SIZE = 512;
export const SECTOR_SHIFT = 9;

/** struct virtio_blk_outhdr: le32 type, le32 reserved (ioprio), le64 sector. */
export const REQUEST_HEADER_SIZE = 16;
/** struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags. */
export const DISCARD_SEGMENT_SIZE = 16;

/**
 * struct virtio_blk_config, byte offsets (virtio 1.2 §5.2.4):
 * ```
 *  0 le64 capacity                 36 le32 max_discard_sectors
 *  8 le32 size_max                 40 le32 max_discard_seg
 * 12 le32 seg_max                  44 le32 discard_sector_alignment
 * 16 geometry {le16 c; u8 h; u8 s} 48 le32 max_write_zeroes_sectors
 * 20 le32 blk_size                 52 le32 max_write_zeroes_seg
 * 24 topology {u8 physical_block_exp; u8 alignment_offset;
 *              le16 min_io_size; le32 opt_io_size}
 * 32 u8 writeback                  56 u8 write_zeroes_may_unmap, u8 unused1[3]
 * 33 u8 unused0                    60 secure erase (3 × le32), 72 zoned characteristics (24 bytes)
 * 34 le16 num_queues               96 end
 * ```
 */
export const CONFIG_OFFSET = {
  capacity: 0,
  sizeMax: 8,
  segMax: 12,
  geometry: 16,
  blkSize: 20,
  physicalBlockExp: 24,
  alignmentOffset: 25,
  minIoSize: 26,
  optIoSize: 28,
  writeback: 32,
  numQueues: 34,
  maxDiscardSectors: 36,
  maxDiscardSeg: 40,
  discardSectorAlignment: 44,
  maxWriteZeroesSectors: 48,
  maxWriteZeroesSeg: 52,
  writeZeroesMayUnmap: 56,
} as const;

/** The whole struct, secure-erase and zoned fields included (they stay zero: we offer neither). */
export const CONFIG_SIZE = 96;

/** The values a device puts in its config space. */
export interface BlkConfigSpace {
  /** In 512-byte sectors. */
  capacity: number;
  sizeMax: number;
  segMax: number;
  blkSize: number;
  physicalBlockExp: number;
  alignmentOffset: number;
  /** In logical blocks. */
  minIoSize: number;
  /** In logical blocks. */
  optIoSize: number;
  writeback: boolean;
  numQueues: number;
  maxDiscardSectors: number;
  maxDiscardSeg: number;
  discardSectorAlignment: number;
  maxWriteZeroesSectors: number;
  maxWriteZeroesSeg: number;
  writeZeroesMayUnmap: boolean;
}

/** Encode the config space (little endian, virtio 1.2 §2.5: "device configuration space ... little-endian"). */
export function encodeConfigSpace(c: BlkConfigSpace): Uint8Array {
  const bytes = new Uint8Array(CONFIG_SIZE);
  const v = new DataView(bytes.buffer);
  const o = CONFIG_OFFSET;
  v.setBigUint64(o.capacity, BigInt(c.capacity), true);
  v.setUint32(o.sizeMax, c.sizeMax, true);
  v.setUint32(o.segMax, c.segMax, true);
  v.setUint32(o.blkSize, c.blkSize, true);
  v.setUint8(o.physicalBlockExp, c.physicalBlockExp);
  v.setUint8(o.alignmentOffset, c.alignmentOffset);
  v.setUint16(o.minIoSize, c.minIoSize, true);
  v.setUint32(o.optIoSize, c.optIoSize, true);
  v.setUint8(o.writeback, c.writeback ? 1 : 0);
  v.setUint16(o.numQueues, c.numQueues, true);
  v.setUint32(o.maxDiscardSectors, c.maxDiscardSectors, true);
  v.setUint32(o.maxDiscardSeg, c.maxDiscardSeg, true);
  v.setUint32(o.discardSectorAlignment, c.discardSectorAlignment, true);
  v.setUint32(o.maxWriteZeroesSectors, c.maxWriteZeroesSectors, true);
  v.setUint32(o.maxWriteZeroesSeg, c.maxWriteZeroesSeg, true);
  v.setUint8(o.writeZeroesMayUnmap, c.writeZeroesMayUnmap ? 1 : 0);
  return bytes;
}

/** The GET_ID string: ASCII, NUL-padded to 20 bytes, no terminator when exactly 20 long. */
export function encodeSerial(serial: string): Uint8Array {
  const out = new Uint8Array(VIRTIO_BLK_ID_BYTES);
  for (let i = 0; i < serial.length && i < VIRTIO_BLK_ID_BYTES; i++) out[i] = serial.charCodeAt(i) & 0x7f;
  return out;
}
