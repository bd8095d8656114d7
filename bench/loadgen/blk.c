/*
 * blk-loadgen: a vhost-user-blk front-end load generator.
 *
 * It plays the part QEMU plays for a vhost-user-blk back-end: it connects to
 * the back-end's unix socket, negotiates features, shares a memfd as "guest
 * memory", lays out split virtqueues in it and keeps a fixed number of
 * 4 KiB-ish requests in flight on every queue for a fixed time. It then prints
 * one JSON object on stdout: IOPS, MB/s, latency percentiles, and the CPU time
 * it and (optionally) the back-end used, so a runner can compare back-ends by
 * CPU time per I/O as well as by throughput.
 *
 * Single-threaded on purpose: the machines this runs on may have two cores,
 * and the back-end under test needs them more than we do. By default it sleeps
 * in epoll on the call eventfds (what a guest with interrupts does); --poll
 * busy-polls the used rings instead and suppresses notifications.
 *
 * Everything read back from the back-end is validated (reply headers, used ids,
 * used lengths, status bytes, ring indexes). A misbehaving back-end ends the
 * run with exit status 2 and a message naming the fault; usage errors exit 64;
 * local failures (syscalls) exit 1.
 *
 * References: QEMU docs/interop/vhost-user.rst; VIRTIO 1.2 §2.7 (split
 * virtqueues) and §5.2 (block device). Written from the specifications.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "frontend.h"

#define DESCS_PER_REQ 3
#define STATUS_SENTINEL 0xa5 /* not a valid virtio-blk status; overwritten by the back-end */

/* ------------------------------------------------------------------------ */
/* Options                                                                    */

struct options {
    const char *socket_path;
    bool write;
    uint32_t bs;
    unsigned iodepth;
    unsigned queues;
    unsigned queue_size;
    double runtime_s;
    double warmup_s;
    uint64_t size; /* bytes of the device addressed; 0 = capacity */
    uint64_t mem_bytes;
    long backend_pid;
    bool event_idx;
    bool poll;
    double connect_timeout_s;
    double stall_timeout_s;
    uint64_t seed;
    bool scsi; /* --device scsi: virtio-scsi READ(10)/WRITE(10) to target 0 LUN 0 */
};

static void usage(FILE *f)
{
    fputs(
        "usage: blk-loadgen --socket-path PATH [options]\n"
        "\n"
        "A vhost-user-blk front-end that keeps requests in flight and reports JSON.\n"
        "\n"
        "  --socket-path PATH     back-end's vhost-user socket (connects, retrying)\n"
        "  --rw randread|randwrite  request type (default randread)\n"
        "  --bs BYTES             request size, multiple of 512 (default 4096)\n"
        "  --iodepth N            requests in flight per queue (default 1)\n"
        "  --queues N             virtqueues to drive (default 1)\n"
        "  --queue-size N         descriptors per virtqueue, power of 2 (default 256)\n"
        "  --runtime SECONDS      measured time (default 5)\n"
        "  --warmup SECONDS       unmeasured time before it (default 1)\n"
        "  --size BYTES[K|M|G]    range addressed from sector 0 (default: capacity)\n"
        "  --mem-mb N             guest memory memfd size (default 256)\n"
        "  --backend-pid PID      also report that process's CPU time (/proc/PID/stat)\n"
        "  --no-event-idx         do not negotiate VIRTIO_RING_F_EVENT_IDX\n"
        "  --poll                 busy-poll used rings, suppress call notifications\n"
        "  --connect-timeout S    how long to retry connecting (default 10)\n"
        "  --stall-timeout S      fail if nothing completes for this long (default 10)\n"
        "  --seed N               random offsets seed (default 1)\n"
        "  --device blk|scsi      virtio-blk requests, or virtio-scsi READ(10)/WRITE(10) to LUN 0\n"
        "                         on request queues 2.. (512-byte blocks; pass --size) (default blk)\n"
        "  -v, --verbose          log the protocol exchange on stderr\n"
        "\n"
        "Exit status: 0 ok, 1 local failure, 2 back-end misbehaved, 64 usage.\n",
        f);
}

static void parse_options(int argc, char **argv, struct options *o)
{
    enum { O_SOCKET = 256, O_RW, O_BS, O_IODEPTH, O_QUEUES, O_QSIZE, O_RUNTIME, O_WARMUP, O_SIZE,
           O_MEM, O_PID, O_NO_EVIDX, O_POLL, O_CONN_TO, O_STALL_TO, O_SEED, O_DEVICE, O_HELP };
    static const struct option longopts[] = {
        { "socket-path", required_argument, 0, O_SOCKET },
        { "rw", required_argument, 0, O_RW },
        { "bs", required_argument, 0, O_BS },
        { "iodepth", required_argument, 0, O_IODEPTH },
        { "queues", required_argument, 0, O_QUEUES },
        { "queue-size", required_argument, 0, O_QSIZE },
        { "runtime", required_argument, 0, O_RUNTIME },
        { "warmup", required_argument, 0, O_WARMUP },
        { "size", required_argument, 0, O_SIZE },
        { "mem-mb", required_argument, 0, O_MEM },
        { "backend-pid", required_argument, 0, O_PID },
        { "no-event-idx", no_argument, 0, O_NO_EVIDX },
        { "poll", no_argument, 0, O_POLL },
        { "connect-timeout", required_argument, 0, O_CONN_TO },
        { "stall-timeout", required_argument, 0, O_STALL_TO },
        { "seed", required_argument, 0, O_SEED },
        { "device", required_argument, 0, O_DEVICE },
        { "verbose", no_argument, 0, 'v' },
        { "help", no_argument, 0, O_HELP },
        { 0, 0, 0, 0 },
    };
    *o = (struct options){
        .bs = 4096, .iodepth = 1, .queues = 1, .queue_size = 256, .runtime_s = 5, .warmup_s = 1,
        .mem_bytes = 256ull << 20, .backend_pid = -1, .event_idx = true, .connect_timeout_s = 10,
        .stall_timeout_s = 10, .seed = 1,
    };
    int c;
    while ((c = getopt_long(argc, argv, "vh", longopts, NULL)) != -1) {
        switch (c) {
        case O_SOCKET: o->socket_path = optarg; break;
        case O_RW:
            if (!strcmp(optarg, "randread"))
                o->write = false;
            else if (!strcmp(optarg, "randwrite"))
                o->write = true;
            else
                die(EXIT_USAGE, "--rw: expected randread or randwrite, got '%s'", optarg);
            break;
        case O_BS: {
            uint64_t v = parse_u64("--bs", optarg, true);
            if (v == 0 || v % VIRTIO_BLK_SECTOR_SIZE || v > (16u << 20))
                die(EXIT_USAGE, "--bs: must be a multiple of 512 up to 16M");
            o->bs = (uint32_t)v;
            break;
        }
        case O_IODEPTH: o->iodepth = (unsigned)parse_u64("--iodepth", optarg, false); break;
        case O_QUEUES: o->queues = (unsigned)parse_u64("--queues", optarg, false); break;
        case O_QSIZE: o->queue_size = (unsigned)parse_u64("--queue-size", optarg, false); break;
        case O_RUNTIME: o->runtime_s = parse_seconds("--runtime", optarg); break;
        case O_WARMUP: o->warmup_s = parse_seconds("--warmup", optarg); break;
        case O_SIZE: o->size = parse_u64("--size", optarg, true); break;
        case O_MEM: o->mem_bytes = parse_u64("--mem-mb", optarg, false) << 20; break;
        case O_PID: o->backend_pid = (long)parse_u64("--backend-pid", optarg, false); break;
        case O_NO_EVIDX: o->event_idx = false; break;
        case O_POLL: o->poll = true; break;
        case O_CONN_TO: o->connect_timeout_s = parse_seconds("--connect-timeout", optarg); break;
        case O_STALL_TO: o->stall_timeout_s = parse_seconds("--stall-timeout", optarg); break;
        case O_SEED: o->seed = parse_u64("--seed", optarg, false); break;
        case O_DEVICE:
            if (!strcmp(optarg, "blk")) o->scsi = false;
            else if (!strcmp(optarg, "scsi")) o->scsi = true;
            else die(EXIT_USAGE, "--device: expected blk or scsi, got '%s'", optarg);
            break;
        case 'v': verbose = 1; break;
        case 'h':
        case O_HELP: usage(stdout); exit(0);
        default: usage(stderr); exit(EXIT_USAGE);
        }
    }
    if (optind != argc)
        die(EXIT_USAGE, "unexpected argument '%s'", argv[optind]);
    if (!o->socket_path)
        die(EXIT_USAGE, "--socket-path is required (see --help)");
    if (o->queues < 1 || o->queues > 256)
        die(EXIT_USAGE, "--queues: 1..256");
    if (o->queue_size < 2 || o->queue_size > 32768 || (o->queue_size & (o->queue_size - 1)))
        die(EXIT_USAGE, "--queue-size: a power of 2 in 2..32768 (VIRTIO 1.2 §2.7)");
    if (o->iodepth < 1 || (uint64_t)o->iodepth * DESCS_PER_REQ > o->queue_size)
        die(EXIT_USAGE, "--iodepth: 1..queue-size/%d (each request is a %d-descriptor chain)",
            DESCS_PER_REQ, DESCS_PER_REQ);
    if (o->runtime_s <= 0)
        die(EXIT_USAGE, "--runtime must be > 0");
    if (o->mem_bytes == 0 || o->mem_bytes > (64ull << 30))
        die(EXIT_USAGE, "--mem-mb: 1..65536");
}

/* ------------------------------------------------------------------------ */
/* Guest memory and virtqueues                                                */

struct slot {
    struct virtio_blk_req_hdr *hdr;
    uint8_t *status;
    uint64_t hdr_gpa, status_gpa, data_gpa;
    uint64_t t_submit;
    bool inflight;
};

struct queue {
    struct vring r; /* first: a struct queue * is a struct vring * */
    struct slot *slots;
    unsigned depth, inflight;
    unsigned *free_slots, nfree;
    uint64_t rng;
    uint64_t short_len;
    bool more; /* reap() stopped with completions left to read */
};

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

/* ------------------------------------------------------------------------ */
/* Latency histogram: exact below 128 ns, then 64 sub-buckets per power of 2
 * (relative error under 1.6%), in nanoseconds.                               */

#define HIST_LINEAR 128
#define HIST_SUB_BITS 6
#define HIST_BUCKETS (HIST_LINEAR + (64 - 7) * (1 << HIST_SUB_BITS))

struct hist {
    uint64_t b[HIST_BUCKETS];
    uint64_t count, sum_ns, min_ns, max_ns;
};

static unsigned hist_index(uint64_t v)
{
    if (v < HIST_LINEAR)
        return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v); /* >= 7 */
    unsigned sub = (unsigned)(v >> (e - HIST_SUB_BITS)) & ((1u << HIST_SUB_BITS) - 1);
    return HIST_LINEAR + (e - 7) * (1u << HIST_SUB_BITS) + sub;
}

static double hist_value(unsigned i)
{
    if (i < HIST_LINEAR)
        return i;
    unsigned e = (i - HIST_LINEAR) / (1u << HIST_SUB_BITS) + 7;
    unsigned sub = (i - HIST_LINEAR) % (1u << HIST_SUB_BITS);
    double lo = (double)((uint64_t)((1u << HIST_SUB_BITS) + sub) << (e - HIST_SUB_BITS));
    double width = (double)(1ull << (e - HIST_SUB_BITS));
    return lo + width / 2;
}

static void hist_add(struct hist *h, uint64_t v)
{
    h->b[hist_index(v)]++;
    if (h->count == 0 || v < h->min_ns)
        h->min_ns = v;
    if (v > h->max_ns)
        h->max_ns = v;
    h->count++;
    h->sum_ns += v;
}

static double hist_percentile_us(const struct hist *h, double p)
{
    if (!h->count)
        return 0;
    uint64_t rank = (uint64_t)ceil(p * (double)h->count);
    if (rank < 1)
        rank = 1;
    uint64_t acc = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        acc += h->b[i];
        if (acc >= rank) {
            double v = hist_value(i);
            if (v > (double)h->max_ns)
                v = (double)h->max_ns;
            if (v < (double)h->min_ns)
                v = (double)h->min_ns;
            return v / 1000.0;
        }
    }
    return (double)h->max_ns / 1000.0;
}

/* ------------------------------------------------------------------------ */
/* Set-up                                                                     */

struct device {
    struct vu_device vu;
    uint64_t capacity;       /* sectors, 0 if unknown */
    uint32_t blk_size;       /* 0 if not offered */
    uint16_t cfg_num_queues; /* 0 if not offered */
};

static void negotiate(struct vu_conn *c, const struct options *o, struct device *d)
{
    memset(d, 0, sizeof(*d));
    vu_negotiate(c, &d->vu, (1ull << VU_PROTOCOL_F_MQ) | (1ull << VU_PROTOCOL_F_REPLY_ACK) | (1ull << VU_PROTOCOL_F_CONFIG),
                 o->queues);

    if (d->vu.protocol_acked & (1ull << VU_PROTOCOL_F_CONFIG)) {
        struct {
            struct vu_config_hdr h;
            uint8_t cfg[VIRTIO_BLK_CONFIG_SIZE];
        } __attribute__((packed)) req = { .h = { .offset = 0, .size = VIRTIO_BLK_CONFIG_SIZE, .flags = 0 } }, rep;
        memset(&rep, 0, sizeof(rep));
        /* GET_CONFIG has a reply of its own; it never carries NEED_REPLY. */
        vu_send(c, VU_GET_CONFIG, 0, &req, sizeof(req), NULL, 0);
        uint32_t n = vu_recv_reply(c, VU_GET_CONFIG, &rep, sizeof(rep));
        if (n == 0)
            die(EXIT_BACKEND, "GET_CONFIG failed (empty reply)");
        if (n != sizeof(rep) || rep.h.size != VIRTIO_BLK_CONFIG_SIZE || rep.h.offset != 0)
            die(EXIT_BACKEND, "GET_CONFIG reply has %u bytes, offset %u, size %u (want %zu, 0, %u)", n,
                rep.h.offset, rep.h.size, sizeof(rep), VIRTIO_BLK_CONFIG_SIZE);
        memcpy(&d->capacity, rep.cfg + VIRTIO_BLK_CFG_CAPACITY, 8);
        if (d->vu.features & (1ull << VIRTIO_BLK_F_BLK_SIZE))
            memcpy(&d->blk_size, rep.cfg + VIRTIO_BLK_CFG_BLK_SIZE, 4);
        if (d->vu.features & (1ull << VIRTIO_BLK_F_MQ))
            memcpy(&d->cfg_num_queues, rep.cfg + VIRTIO_BLK_CFG_NUM_QUEUES, 2);
        logv("capacity %" PRIu64 " sectors, blk_size %u, num_queues %u", d->capacity, d->blk_size,
             d->cfg_num_queues);
    }

    if (o->queues > 1) {
        if (!(d->vu.features & (1ull << VIRTIO_BLK_F_MQ)))
            die(EXIT_USAGE, "--queues %u but the back-end does not offer VIRTIO_BLK_F_MQ", o->queues);
        if (d->cfg_num_queues && o->queues > d->cfg_num_queues)
            die(EXIT_USAGE, "--queues %u but the device config says num_queues=%u", o->queues, d->cfg_num_queues);
    }
    if (o->write && (d->vu.features & (1ull << VIRTIO_BLK_F_RO)))
        die(EXIT_USAGE, "--rw randwrite but the device is read-only (VIRTIO_BLK_F_RO)");
    if (d->blk_size && o->bs % d->blk_size)
        die(EXIT_USAGE, "--bs %u is not a multiple of the device block size %u", o->bs, d->blk_size);

    /* Feature bits we understand and accept. Informational blk features are harmless to ack. */
    uint64_t want = (1ull << VIRTIO_F_VERSION_1) | (1ull << VHOST_USER_F_PROTOCOL_FEATURES) |
                    (1ull << VIRTIO_BLK_F_SIZE_MAX) | (1ull << VIRTIO_BLK_F_SEG_MAX) | (1ull << VIRTIO_BLK_F_RO) |
                    (1ull << VIRTIO_BLK_F_BLK_SIZE) | (1ull << VIRTIO_BLK_F_MQ);
    if (o->scsi)
        want &= ~((1ull << 24) - 1); /* device bits are blk's; take no virtio-scsi ones (no event queue here) */
    if (o->event_idx)
        want |= 1ull << VIRTIO_RING_F_EVENT_IDX;
    vu_ack_features(c, &d->vu, want);
}

static void setup_queue(struct guest_mem *m, struct queue *q, unsigned index, const struct options *o)
{
    memset(q, 0, sizeof(*q));
    vring_setup(m, &q->r, index, (uint16_t)o->queue_size);

    q->depth = o->iodepth;
    q->slots = calloc(q->depth, sizeof(*q->slots));
    q->free_slots = calloc(q->depth, sizeof(*q->free_slots));
    if (!q->slots || !q->free_slots)
        die_errno("calloc");
    /* Per slot: the request header, then the status byte (blk) or the response (scsi). */
    uint64_t hdr_stride = o->scsi ? 256 : 32;
    uint64_t hdrs = gm_alloc(m, hdr_stride * q->depth, 64);
    uint64_t data_stride = align_up(o->bs, PAGE);
    uint64_t data = gm_alloc(m, data_stride * q->depth, PAGE);
    for (unsigned i = 0; i < q->depth; i++) {
        struct slot *s = &q->slots[i];
        s->hdr_gpa = hdrs + hdr_stride * i;
        s->status_gpa = s->hdr_gpa + (o->scsi ? 64 : sizeof(struct virtio_blk_req_hdr));
        s->data_gpa = data + data_stride * i;
        s->hdr = (struct virtio_blk_req_hdr *)(m->base + s->hdr_gpa);
        s->status = m->base + s->status_gpa;
        /* Something recognizable for writes; reads overwrite it. */
        memset(m->base + s->data_gpa, 0x5a ^ (int)(i & 0xff), o->bs);
        q->free_slots[q->nfree++] = q->depth - 1 - i;
    }
    q->rng = (o->seed + 1) * 0x9E3779B97F4A7C15ull ^ (index + 1ull) * 0xBF58476D1CE4E5B9ull;
    if (!q->rng)
        q->rng = 1;

}

/* ------------------------------------------------------------------------ */
/* Datapath                                                                   */

struct run {
    const struct options *o;
    struct device *dev;
    struct queue *queues;
    uint64_t nblocks;      /* bs-sized blocks addressed */
    uint32_t sectors_per_block;
    bool measuring;
    struct hist lat;
    uint64_t ios_measured;
    uint64_t ios_total;
};

/*
 * A virtio-scsi command (VIRTIO 1.2 §5.6.6.1): READ(10) or WRITE(10) of bs/512 blocks to target 0
 * LUN 0 (flat addressing, as Linux builds it). Device-readable parts first: request header (and the
 * data of a write), then the response (and the data of a read).
 */
static void submit_scsi(struct run *r, struct queue *q, struct slot *s, uint16_t head)
{
    struct virtio_scsi_cmd_req *req = (struct virtio_scsi_cmd_req *)s->hdr;
    struct virtio_scsi_cmd_resp *resp = (struct virtio_scsi_cmd_resp *)s->status;
    struct vring_desc *d = &q->r.desc[head];
    bool wr = r->o->write;
    uint64_t lba = (xorshift(&q->rng) % r->nblocks) * r->sectors_per_block;
    uint16_t blocks = (uint16_t)r->sectors_per_block;

    memset(req, 0, sizeof(*req));
    req->lun[0] = 1; /* target 0, LUN 0 */
    req->lun[2] = 0x40;
    req->id = head;
    req->cdb[0] = wr ? 0x2a : 0x28;
    req->cdb[2] = (uint8_t)(lba >> 24);
    req->cdb[3] = (uint8_t)(lba >> 16);
    req->cdb[4] = (uint8_t)(lba >> 8);
    req->cdb[5] = (uint8_t)lba;
    req->cdb[7] = (uint8_t)(blocks >> 8);
    req->cdb[8] = (uint8_t)blocks;
    resp->response = STATUS_SENTINEL;
    resp->status = STATUS_SENTINEL;

    struct vring_desc hdr = { .addr = s->hdr_gpa, .len = sizeof(*req), .flags = VRING_DESC_F_NEXT };
    struct vring_desc data = { .addr = s->data_gpa, .len = r->o->bs, .flags = (uint16_t)(VRING_DESC_F_NEXT | (wr ? 0 : VRING_DESC_F_WRITE)) };
    struct vring_desc rsp = { .addr = s->status_gpa, .len = sizeof(*resp), .flags = (uint16_t)(VRING_DESC_F_WRITE | (wr ? 0 : VRING_DESC_F_NEXT)) };
    d[0] = hdr;
    d[1] = wr ? data : rsp;
    d[2] = wr ? rsp : data;
    d[0].next = (uint16_t)(head + 1);
    d[1].next = (uint16_t)(head + 2);
    d[2].flags &= (uint16_t)~VRING_DESC_F_NEXT;
    d[2].next = 0;
}

/* Did the command of slot `s` succeed? Dies naming the fault otherwise. */
static void check_scsi(const struct queue *q, const struct slot *s, bool wr)
{
    const volatile struct virtio_scsi_cmd_resp *resp = (const volatile struct virtio_scsi_cmd_resp *)s->status;
    if (resp->response != VIRTIO_SCSI_S_OK || resp->status != 0)
        die(EXIT_BACKEND, "queue %u: %s(10) completed with response %u, SCSI status 0x%02x, sense key %u%s", q->r.index,
            wr ? "WRITE" : "READ", resp->response, resp->status, resp->sense_len > 2 ? resp->sense[2] & 0xf : 0,
            resp->response == STATUS_SENTINEL ? " (response never written)" : "");
}

static void submit(struct run *r, struct queue *q, uint64_t t)
{
    unsigned si = q->free_slots[--q->nfree];
    struct slot *s = &q->slots[si];
    uint16_t head = (uint16_t)(si * DESCS_PER_REQ);
    struct vring_desc *d = &q->r.desc[head];
    bool wr = r->o->write;

    if (r->o->scsi) {
        submit_scsi(r, q, s, head);
        goto queued;
    }
    s->hdr->type = wr ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    s->hdr->ioprio = 0;
    s->hdr->sector = (xorshift(&q->rng) % r->nblocks) * r->sectors_per_block;
    *s->status = STATUS_SENTINEL;

    d[0] = (struct vring_desc){ .addr = s->hdr_gpa, .len = sizeof(struct virtio_blk_req_hdr),
                                .flags = VRING_DESC_F_NEXT, .next = (uint16_t)(head + 1) };
    d[1] = (struct vring_desc){ .addr = s->data_gpa, .len = r->o->bs,
                                .flags = (uint16_t)(VRING_DESC_F_NEXT | (wr ? 0 : VRING_DESC_F_WRITE)),
                                .next = (uint16_t)(head + 2) };
    d[2] = (struct vring_desc){ .addr = s->status_gpa, .len = 1, .flags = VRING_DESC_F_WRITE, .next = 0 };

queued:
    q->r.avail[2 + (q->r.avail_idx % q->r.num)] = head;
    q->r.avail_idx++;
    s->inflight = true;
    s->t_submit = t;
    q->inflight++;
}

/* Consumes the used ring; returns completions. Resubmits unless `drain`. */
static unsigned reap(struct run *r, struct queue *q, bool drain)
{
    const struct options *o = r->o;
    bool event_idx = r->dev->vu.event_idx;
    unsigned done = 0;
    uint32_t status_len = o->scsi ? (uint32_t)sizeof(struct virtio_scsi_cmd_resp) : 1;
    uint32_t want_len = o->write ? status_len : o->bs + status_len;
    q->more = false;
    for (unsigned pass = 0;; pass++) {
        if (pass == 8) {
            /* Bounded so the caller gets to look at the clock; it calls again at once. */
            q->more = true;
            break;
        }
        uint16_t used = used_idx_acquire(&q->r);
        uint16_t pending = (uint16_t)(used - q->r.last_used);
        if (pending > q->inflight)
            die(EXIT_BACKEND, "queue %u: used idx %u is %u ahead of our last seen %u, but only %u requests are in flight",
                q->r.index, used, pending, q->r.last_used, q->inflight);
        if (pending == 0) {
            if (!event_idx || o->poll)
                break;
            /* Re-arm the notification, then look once more to close the race (§2.7.10). */
            set_used_event(&q->r, q->r.last_used);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (used_idx_acquire(&q->r) == q->r.last_used)
                break;
            continue;
        }
        uint64_t t = now_ns();
        for (; pending; pending--) {
            struct vring_used_elem e = used_elem(&q->r, q->r.last_used);
            if (e.id >= q->r.num || e.id % DESCS_PER_REQ || e.id / DESCS_PER_REQ >= q->depth)
                die(EXIT_BACKEND, "queue %u: used id %u is not the head of any chain we made", q->r.index, e.id);
            struct slot *s = &q->slots[e.id / DESCS_PER_REQ];
            if (!s->inflight)
                die(EXIT_BACKEND, "queue %u: used id %u returned twice", q->r.index, e.id);
            if (e.len > want_len)
                die(EXIT_BACKEND, "queue %u: used len %u exceeds the %u writable bytes of chain %u", q->r.index,
                    e.len, want_len, e.id);
            if (e.len != want_len && q->short_len++ == 0)
                fprintf(stderr, "blk-loadgen: warning: queue %u: used len %u, expected %u (bytes written)\n",
                        q->r.index, e.len, want_len);
            uint8_t st = o->scsi ? VIRTIO_BLK_S_OK : *(volatile uint8_t *)s->status;
            if (o->scsi)
                check_scsi(q, s, o->write);
            if (st != VIRTIO_BLK_S_OK)
                die(EXIT_BACKEND, "queue %u: request %s sector %" PRIu64 " completed with status %u%s", q->r.index,
                    o->write ? "OUT" : "IN", s->hdr->sector, st,
                    st == STATUS_SENTINEL ? " (status byte never written)"
                    : st == VIRTIO_BLK_S_IOERR ? " (IOERR)"
                    : st == VIRTIO_BLK_S_UNSUPP ? " (UNSUPP)" : " (not a virtio-blk status)");
            s->inflight = false;
            q->inflight--;
            q->free_slots[q->nfree++] = e.id / DESCS_PER_REQ;
            q->r.last_used++;
            done++;
            r->ios_total++;
            if (r->measuring) {
                hist_add(&r->lat, t - s->t_submit);
                r->ios_measured++;
            }
        }
        if (!drain) {
            while (q->nfree)
                submit(r, q, t);
        }
    }
    vring_publish(&q->r, event_idx);
    if (o->poll && event_idx)
        set_used_event(&q->r, (uint16_t)(q->r.last_used + 0x7fff));
    return done;
}

int main(int argc, char **argv)
{
    progname = "blk-loadgen";
    struct options o;
    parse_options(argc, argv, &o);

    struct vu_conn c;
    vu_connect(&c, o.socket_path, o.connect_timeout_s);

    struct device dev;
    negotiate(&c, &o, &dev);

    uint64_t cap_bytes = dev.capacity * VIRTIO_BLK_SECTOR_SIZE;
    uint64_t size = o.size;
    if (!size) {
        if (!dev.capacity)
            die(EXIT_USAGE, "the back-end did not report a capacity (no CONFIG protocol feature); pass --size");
        size = cap_bytes;
    } else if (dev.capacity && size > cap_bytes) {
        die(EXIT_USAGE, "--size %" PRIu64 " exceeds the device capacity %" PRIu64 " bytes", size, cap_bytes);
    }
    if (size < o.bs)
        die(EXIT_USAGE, "addressed range (%" PRIu64 " bytes) is smaller than one request", size);

    struct guest_mem mem;
    gm_setup(&mem, o.mem_bytes);
    struct queue *queues = calloc(o.queues, sizeof(*queues));
    if (!queues)
        die_errno("calloc");
    for (unsigned i = 0; i < o.queues; i++)
        setup_queue(&mem, &queues[i], i + (o.scsi ? VIRTIO_SCSI_FIRST_REQUEST_QUEUE : 0), &o);

    gm_share(&c, &mem);

    for (unsigned i = 0; i < o.queues; i++)
        vring_start(&c, &mem, &queues[i].r, dev.vu.event_idx, o.poll);
    for (unsigned i = 0; i < o.queues; i++)
        vring_enable(&c, &dev.vu, &queues[i].r);

    struct run r = { .o = &o, .dev = &dev, .queues = queues, .nblocks = size / o.bs,
                     .sectors_per_block = o.bs / VIRTIO_BLK_SECTOR_SIZE };

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die_errno("epoll_create1");
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.u32 = UINT32_MAX };
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c.fd, &ev) < 0)
        die_errno("epoll_ctl socket");
    if (!o.poll) {
        for (unsigned i = 0; i < o.queues; i++) {
            ev = (struct epoll_event){ .events = EPOLLIN, .data.u32 = i };
            if (epoll_ctl(ep, EPOLL_CTL_ADD, queues[i].r.call_fd, &ev) < 0)
                die_errno("epoll_ctl call fd");
        }
    }

    uint64_t t0 = now_ns();
    uint64_t t_measure = t0 + (uint64_t)(o.warmup_s * 1e9);
    uint64_t t_end = t_measure + (uint64_t)(o.runtime_s * 1e9);
    uint64_t stall_ns = (uint64_t)(o.stall_timeout_s * 1e9);
    uint64_t last_progress = t0;
    double cpu0 = 0, cpu1 = 0, bcpu0 = 0, bcpu1 = 0;
    uint64_t m_start = 0, m_end = 0;
    enum { WARMUP, MEASURE, DRAIN } phase = WARMUP;

    for (unsigned i = 0; i < o.queues; i++) {
        while (queues[i].nfree)
            submit(&r, &queues[i], t0);
        if (dev.vu.event_idx && !o.poll)
            set_used_event(&queues[i].r, 0);
        vring_publish(&queues[i].r, dev.vu.event_idx);
    }

    for (;;) {
        uint64_t t = now_ns();
        if (phase == WARMUP && t >= t_measure) {
            phase = MEASURE;
            r.measuring = true;
            m_start = t;
            cpu0 = self_cpu_s();
            if (o.backend_pid > 0)
                bcpu0 = proc_cpu_s(o.backend_pid);
        }
        if (phase == MEASURE && t >= t_end) {
            phase = DRAIN;
            r.measuring = false;
            m_end = t;
            cpu1 = self_cpu_s();
            if (o.backend_pid > 0)
                bcpu1 = proc_cpu_s(o.backend_pid);
        }
        unsigned inflight = 0;
        for (unsigned i = 0; i < o.queues; i++)
            inflight += queues[i].inflight;
        if (phase == DRAIN && inflight == 0)
            break;
        if (inflight && t - last_progress > stall_ns)
            die(EXIT_BACKEND, "no completion for %.1f s with %u requests in flight", o.stall_timeout_s, inflight);

        unsigned done = 0;
        if (o.poll) {
            for (unsigned i = 0; i < o.queues; i++)
                done += reap(&r, &queues[i], phase == DRAIN);
            struct epoll_event evs[1];
            if (epoll_wait(ep, evs, 1, 0) > 0)
                die(EXIT_BACKEND, "closed the connection or sent an unexpected message during I/O");
        } else {
            uint64_t next = phase == WARMUP ? t_measure : phase == MEASURE ? t_end : t + 100000000ull;
            int timeout_ms = next > t ? (int)((next - t + 999999) / 1000000) : 0;
            if (timeout_ms > 100)
                timeout_ms = 100;
            for (unsigned i = 0; i < o.queues; i++) {
                if (queues[i].more) {
                    done += reap(&r, &queues[i], phase == DRAIN);
                    timeout_ms = 0;
                }
            }
            struct epoll_event evs[64];
            int n = epoll_wait(ep, evs, 64, timeout_ms);
            if (n < 0 && errno != EINTR)
                die_errno("epoll_wait");
            for (int k = 0; k < n; k++) {
                uint32_t qi = evs[k].data.u32;
                if (qi == UINT32_MAX)
                    die(EXIT_BACKEND, "closed the connection or sent an unexpected message during I/O");
                drain_eventfd(queues[qi].r.call_fd);
                queues[qi].r.wakeups++;
                done += reap(&r, &queues[qi], phase == DRAIN);
            }
        }
        if (done)
            last_progress = now_ns();
    }

    for (unsigned i = 0; i < o.queues; i++)
        vring_check_base(&c, &queues[i].r);
    close(c.fd);

    uint64_t kicks = 0, wakeups = 0, short_len = 0;
    for (unsigned i = 0; i < o.queues; i++) {
        kicks += queues[i].r.kicks;
        wakeups += queues[i].r.wakeups;
        short_len += queues[i].short_len;
    }
    /* Kicks and wakeups are counted over the whole run (warm-up and drain included),
       so they are divided by every completion of the run, not just the measured ones. */
    double secs = (double)(m_end - m_start) / 1e9;
    double ios = (double)r.ios_measured;
    double iops = secs > 0 ? ios / secs : 0;
    double cpu = cpu1 - cpu0, bcpu = bcpu1 - bcpu0;
    if (r.ios_measured == 0)
        die(EXIT_BACKEND, "no request completed during the measured %.1f s", secs);

    printf("{\"rw\":\"%s\",\"bs\":%u,\"iodepth\":%u,\"queues\":%u,\"queue_size\":%u,\"event_idx\":%s,\"poll\":%s,"
           "\"size_bytes\":%" PRIu64 ",\"capacity_bytes\":%" PRIu64 ",\"runtime_s\":%.6f,\"ios\":%" PRIu64 ","
           "\"iops\":%.1f,\"mb_s\":%.3f,"
           "\"lat_us\":{\"mean\":%.3f,\"min\":%.3f,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f},"
           "\"loadgen_cpu_s\":%.6f,\"loadgen_cpu_us_per_io\":%.4f,",
           o.write ? "randwrite" : "randread", o.bs, o.iodepth, o.queues, o.queue_size,
           dev.vu.event_idx ? "true" : "false", o.poll ? "true" : "false", size, cap_bytes, secs, r.ios_measured,
           iops, iops * o.bs / 1e6, (double)r.lat.sum_ns / ios / 1000.0, (double)r.lat.min_ns / 1000.0,
           hist_percentile_us(&r.lat, 0.50), hist_percentile_us(&r.lat, 0.90), hist_percentile_us(&r.lat, 0.99),
           hist_percentile_us(&r.lat, 0.999), (double)r.lat.max_ns / 1000.0, cpu, cpu * 1e6 / ios);
    if (o.backend_pid > 0)
        printf("\"backend_pid\":%ld,\"backend_cpu_s\":%.6f,\"backend_cpu_us_per_io\":%.4f,", o.backend_pid, bcpu,
               bcpu * 1e6 / ios);
    else
        printf("\"backend_pid\":null,\"backend_cpu_s\":null,\"backend_cpu_us_per_io\":null,");
    printf("\"kicks_per_io\":%.4f,\"wakeups_per_io\":%.4f,\"short_len_completions\":%" PRIu64 ","
           "\"features\":\"0x%" PRIx64 "\",\"acked_features\":\"0x%" PRIx64 "\",\"protocol_features\":\"0x%" PRIx64
           "\",\"acked_protocol_features\":\"0x%" PRIx64 "\"}\n",
           (double)kicks / (double)r.ios_total, (double)wakeups / (double)r.ios_total, short_len, dev.vu.features,
           dev.vu.acked, dev.vu.protocol, dev.vu.protocol_acked);
    return 0;
}
