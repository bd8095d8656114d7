/*
 * Wire formats the load generators speak: the vhost-user control protocol
 * (QEMU docs/interop/vhost-user.rst), the split virtqueue (VIRTIO 1.2 §2.7),
 * virtio-blk requests and config space (VIRTIO 1.2 §5.2) and the virtio-net
 * header (VIRTIO 1.2 §5.1.6).
 *
 * Everything is little-endian on the wire and in guest memory; this program
 * only runs on little-endian hosts (checked at compile time below), so the
 * structs are used in place.
 */
#ifndef LOADGEN_WIRE_H
#define LOADGEN_WIRE_H

#include <stdint.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the load generators assume a little-endian host (virtio 1.x is little-endian)"
/* ---- virtio-net (VIRTIO 1.2 §5.1) ---- */
#define VIRTIO_NET_F_CSUM 0
#define VIRTIO_NET_F_HOST_TSO4 11
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VIRTIO_NET_RX_QUEUE 0 /* of the first pair: rx 0, tx 1 */
#define VIRTIO_NET_TX_QUEUE 1

#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_GSO_NONE 0
#define VIRTIO_NET_HDR_GSO_TCPV4 1

/* The header with VERSION_1 (num_buffers always there): 12 bytes. */
struct virtio_net_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};

#endif

/* ---- vhost-user front-end requests (vhost-user.rst "Front-end message types") ---- */
enum vu_request {
    VU_GET_FEATURES = 1,
    VU_SET_FEATURES = 2,
    VU_SET_OWNER = 3,
    VU_SET_MEM_TABLE = 5,
    VU_SET_VRING_NUM = 8,
    VU_SET_VRING_ADDR = 9,
    VU_SET_VRING_BASE = 10,
    VU_GET_VRING_BASE = 11,
    VU_SET_VRING_KICK = 12,
    VU_SET_VRING_CALL = 13,
    VU_GET_PROTOCOL_FEATURES = 15,
    VU_SET_PROTOCOL_FEATURES = 16,
    VU_GET_QUEUE_NUM = 17,
    VU_SET_VRING_ENABLE = 18,
    VU_GET_CONFIG = 24,
};

/* Header flags: low 2 bits version (1), bit 2 reply, bit 3 need_reply. */
#define VU_FLAG_VERSION 0x1u
#define VU_FLAG_VERSION_MASK 0x3u
#define VU_FLAG_REPLY (1u << 2)
#define VU_FLAG_NEED_REPLY (1u << 3)

/* Virtio feature bits (VIRTIO 1.2 §6) and the vhost-user protocol-features bit. */
#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX 29
#define VHOST_USER_F_PROTOCOL_FEATURES 30
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_F_RING_PACKED 34

/* Protocol feature bits (vhost-user.rst "Protocol features"). */
#define VU_PROTOCOL_F_MQ 0
#define VU_PROTOCOL_F_REPLY_ACK 3
#define VU_PROTOCOL_F_CONFIG 9

/* virtio-blk feature bits (VIRTIO 1.2 §5.2.3). */
#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_MQ 12

/* Kick/call u64 payload: bits 0-7 vring index, bit 8 "no fd, poll". */
#define VU_VRING_IDX_MASK 0xffu
#define VU_VRING_NOFD_MASK (1u << 8)

#define VU_MAX_REGIONS 8
#define VU_MAX_FDS 8

struct vu_header {
    uint32_t request;
    uint32_t flags;
    uint32_t size;
} __attribute__((packed));

struct vu_vring_state {
    uint32_t index;
    uint32_t num;
} __attribute__((packed));

struct vu_vring_addr {
    uint32_t index;
    uint32_t flags;
    uint64_t desc_user_addr;
    uint64_t used_user_addr;
    uint64_t avail_user_addr;
    uint64_t log_guest_addr;
} __attribute__((packed));

struct vu_mem_region {
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t mmap_offset;
} __attribute__((packed));

struct vu_mem_table {
    uint32_t nregions;
    uint32_t padding;
    struct vu_mem_region regions[VU_MAX_REGIONS];
} __attribute__((packed));

struct vu_config_hdr {
    uint32_t offset;
    uint32_t size;
    uint32_t flags;
} __attribute__((packed));

/* ---- split virtqueue (VIRTIO 1.2 §2.7) ---- */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

/* avail: flags, idx, ring[num], used_event  (2 * (3 + num) bytes, align 2) */
/* used:  flags, idx, ring[num], avail_event (6 + 8 * num bytes, align 4)   */

/* VIRTIO 1.2 §2.7.10 (vring_need_event): true when new_idx passed event_idx. */
static inline int vring_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

/* ---- virtio-blk (VIRTIO 1.2 §5.2) ---- */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_SECTOR_SIZE 512

struct virtio_blk_req_hdr {
    uint32_t type;
    uint32_t ioprio; /* "reserved" in VIRTIO 1.2 */
    uint64_t sector;
};

/* virtio-scsi (VIRTIO 1.2 §5.6.6.1): request queues start at 2 (0 control, 1 event). */
#define VIRTIO_SCSI_FIRST_REQUEST_QUEUE 2
#define VIRTIO_SCSI_CDB_SIZE 32
#define VIRTIO_SCSI_SENSE_SIZE 96
#define VIRTIO_SCSI_S_OK 0

struct virtio_scsi_cmd_req {
    uint8_t lun[8];
    uint64_t id;
    uint8_t task_attr;
    uint8_t prio;
    uint8_t crn;
    uint8_t cdb[VIRTIO_SCSI_CDB_SIZE];
} __attribute__((packed));

struct virtio_scsi_cmd_resp {
    uint32_t sense_len;
    uint32_t resid;
    uint16_t status_qualifier;
    uint8_t status;
    uint8_t response;
    uint8_t sense[VIRTIO_SCSI_SENSE_SIZE];
} __attribute__((packed));

/* The config fields up to and including write_zeroes_may_unmap + padding: 60 bytes. */
#define VIRTIO_BLK_CONFIG_SIZE 60
#define VIRTIO_BLK_CFG_CAPACITY 0   /* u64, in 512-byte sectors */
#define VIRTIO_BLK_CFG_SEG_MAX 12   /* u32 */
#define VIRTIO_BLK_CFG_BLK_SIZE 20  /* u32 */
#define VIRTIO_BLK_CFG_NUM_QUEUES 34 /* u16 */

/* ---- virtio-net (VIRTIO 1.2 §5.1) ---- */
#define VIRTIO_NET_F_CSUM 0
#define VIRTIO_NET_F_HOST_TSO4 11
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VIRTIO_NET_RX_QUEUE 0 /* of the first pair: rx 0, tx 1 */
#define VIRTIO_NET_TX_QUEUE 1

#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_GSO_NONE 0
#define VIRTIO_NET_HDR_GSO_TCPV4 1

/* The header with VERSION_1 (num_buffers always there): 12 bytes. */
struct virtio_net_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};

#endif
