/*
 * The vhost-user front-end both load generators share (blk-loadgen, net-loadgen): diagnostics and
 * option parsing, the control channel (QEMU docs/interop/vhost-user.rst), memfd "guest memory" with
 * a bump allocator, split virtqueues as a driver sees them (VIRTIO 1.2 §2.7) and CPU accounting.
 * Each generator adds its device's requests, features and report.
 */
#ifndef LOADGEN_FRONTEND_H
#define LOADGEN_FRONTEND_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "wire.h"

#define EXIT_LOCAL 1
#define EXIT_BACKEND 2
#define EXIT_USAGE 64

#define PAGE 4096u

/* The program's name in messages ("blk-loadgen"); set by main before anything else. */
extern const char *progname;
extern int verbose;

void __attribute__((noreturn, format(printf, 2, 3))) die(int code, const char *fmt, ...);
#define die_errno(what) die(EXIT_LOCAL, "%s: %s", (what), strerror(errno))
void __attribute__((format(printf, 1, 2))) logv(const char *fmt, ...);
uint64_t now_ns(void);
uint64_t align_up(uint64_t v, uint64_t a);
uint64_t parse_u64(const char *opt, const char *s, bool suffixes);
double parse_seconds(const char *opt, const char *s);

/* ---- control channel ---- */
struct vu_conn {
    int fd;
    bool reply_ack; /* VHOST_USER_PROTOCOL_F_REPLY_ACK negotiated */
};

const char *vu_name(uint32_t req);
void vu_connect(struct vu_conn *c, const char *path, double timeout_s);
void vu_send(struct vu_conn *c, uint32_t req, uint32_t flags, const void *payload, uint32_t size, const int *fds,
             unsigned nfds);
/* Reads the reply to `req`; returns its payload size (at most `max`). */
uint32_t vu_recv_reply(struct vu_conn *c, uint32_t req, void *payload, uint32_t max);
uint64_t vu_get_u64(struct vu_conn *c, uint32_t req);
/* Sends a request that has no reply of its own; with REPLY_ACK, waits for the ack. */
void vu_set(struct vu_conn *c, uint32_t req, const void *payload, uint32_t size, const int *fds, unsigned nfds);
void vu_set_u64(struct vu_conn *c, uint32_t req, uint64_t v);

/* What negotiation learnt. */
struct vu_device {
    uint64_t features;       /* offered */
    uint64_t acked;          /* what we set */
    uint64_t protocol;       /* offered protocol features (0 if none) */
    uint64_t protocol_acked;
    uint64_t max_queues;     /* GET_QUEUE_NUM, 0 if unknown */
    bool event_idx;
};

/*
 * SET_OWNER, GET_FEATURES (VERSION_1 required), protocol features (`protocol_want` & offered; REPLY_ACK
 * from then on) and GET_QUEUE_NUM with MQ (at least `queues`). Features are acked separately
 * (vu_ack_features), after the device's own checks.
 */
void vu_negotiate(struct vu_conn *c, struct vu_device *d, uint64_t protocol_want, unsigned queues);
/* SET_FEATURES with `features & want` (EVENT_IDX only if `want` has it). */
void vu_ack_features(struct vu_conn *c, struct vu_device *d, uint64_t want);

/* ---- guest memory ---- */
struct guest_mem {
    int fd;
    uint8_t *base;
    uint64_t size;
    uint64_t next; /* bump allocator, guest-physical = offset */
};

void gm_setup(struct guest_mem *m, uint64_t size);
uint64_t gm_alloc(struct guest_mem *m, uint64_t len, uint64_t align);
/* SET_MEM_TABLE with one region covering all of it: guest-physical = offset. */
void gm_share(struct vu_conn *c, struct guest_mem *m);

/* ---- split virtqueue, the driver's side ---- */
struct vring {
    unsigned index;
    uint16_t num;
    struct vring_desc *desc;
    volatile uint16_t *avail; /* flags, idx, ring[num], used_event */
    volatile uint8_t *used;   /* flags u16, idx u16, ring[num] (8 bytes each), avail_event u16 */
    uint64_t desc_gpa, avail_gpa, used_gpa;
    int kick_fd, call_fd;
    uint16_t avail_idx;     /* next free avail ring position (shadow) */
    uint16_t published_idx; /* avail->idx as last written */
    uint16_t last_used;     /* next used ring entry to read */
    uint64_t kicks, wakeups;
};

void vring_setup(struct guest_mem *m, struct vring *q, unsigned index, uint16_t num);
/* SET_VRING_NUM/BASE/ADDR/CALL/KICK; with `poll`, asks for no notifications first. */
void vring_start(struct vu_conn *c, struct guest_mem *m, struct vring *q, bool event_idx, bool poll);
/* SET_VRING_ENABLE 1 (with PROTOCOL_FEATURES: rings start disabled). */
void vring_enable(struct vu_conn *c, const struct vu_device *d, struct vring *q);
/* Publishes new avail entries and kicks if the device wants a kick (VIRTIO 1.2 §2.7.13.3/4). */
void vring_publish(struct vring *q, bool event_idx);
/* GET_VRING_BASE: the device must have consumed everything made available. */
void vring_check_base(struct vu_conn *c, struct vring *q);

static inline uint16_t used_idx_acquire(struct vring *q)
{
    return __atomic_load_n((uint16_t *)(q->used + 2), __ATOMIC_ACQUIRE);
}

static inline struct vring_used_elem used_elem(struct vring *q, uint16_t pos)
{
    struct vring_used_elem e;
    memcpy(&e, (const void *)(q->used + 4 + 8u * (pos % q->num)), sizeof(e));
    return e;
}

static inline void set_used_event(struct vring *q, uint16_t v)
{
    q->avail[2 + q->num] = v;
}

/* Puts chain `head` in the next avail slot (published by vring_publish). */
static inline void vring_offer(struct vring *q, uint16_t head)
{
    q->avail[2 + (q->avail_idx % q->num)] = head;
    q->avail_idx++;
}

/* Reads a call eventfd (a wakeup); EAGAIN is fine. */
void drain_eventfd(int fd);

/* ---- CPU time ---- */
double self_cpu_s(void);
/* utime + stime of a whole process (all threads) from /proc/PID/stat, seconds. */
double proc_cpu_s(long pid);

#endif
