/**
 * virtio-blk structures as a guest driver writes them (virtio 1.2 §5.2.6), encoded independently of
 * daemons/blk so the tests check the daemon's decoding.
 */

/** struct virtio_blk_req header: le32 type, le32 reserved, le64 sector. */
export function blkHeader(type: number, sector: bigint | number = 0): Uint8Array {
  const b = new Uint8Array(16);
  const v = new DataView(b.buffer);
  v.setUint32(0, type, true);
  v.setBigUint64(8, BigInt(sector), true);
  return b;
}

/** struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags. */
export function discardSegment(sector: number, sectors: number, flags = 0): Uint8Array {
  const b = new Uint8Array(16);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt(sector), true);
  v.setUint32(8, sectors, true);
  v.setUint32(12, flags, true);
  return b;
}
