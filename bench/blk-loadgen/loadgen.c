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

#include "wire.h"

#define EXIT_LOCAL 1
#define EXIT_BACKEND 2
#define EXIT_USAGE 64

#define PAGE 4096u
#define DESCS_PER_REQ 3
#define STATUS_SENTINEL 0xa5 /* not a valid virtio-blk status; overwritten by the back-end */

/* ------------------------------------------------------------------------ */
/* Diagnostics                                                                */

static int verbose;

static void __attribute__((noreturn, format(printf, 2, 3))) die(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(code == EXIT_BACKEND ? "blk-loadgen: backend misbehaved: " : "blk-loadgen: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

#define die_errno(what) die(EXIT_LOCAL, "%s: %s", (what), strerror(errno))

static void __attribute__((format(printf, 1, 2))) logv(const char *fmt, ...)
{
    if (!verbose)
        return;
    va_list ap;
    va_start(ap, fmt);
    fputs("blk-loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

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

static uint64_t parse_u64(const char *opt, const char *s, bool suffixes)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || s[0] == '-')
        die(EXIT_USAGE, "%s: not a number: '%s'", opt, s);
    uint64_t mult = 1;
    if (suffixes && *end) {
        switch (*end) {
        case 'k': case 'K': mult = 1ull << 10; break;
        case 'm': case 'M': mult = 1ull << 20; break;
        case 'g': case 'G': mult = 1ull << 30; break;
        case 't': case 'T': mult = 1ull << 40; break;
        default: die(EXIT_USAGE, "%s: bad suffix in '%s'", opt, s);
        }
        end++;
    }
    if (*end)
        die(EXIT_USAGE, "%s: trailing characters in '%s'", opt, s);
    if (v > UINT64_MAX / mult)
        die(EXIT_USAGE, "%s: too large: '%s'", opt, s);
    return v * mult;
}

static double parse_seconds(const char *opt, const char *s)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= 0) || v > 86400)
        die(EXIT_USAGE, "%s: not a duration in seconds: '%s'", opt, s);
    return v;
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
/* vhost-user control channel                                                 */

struct vu_conn {
    int fd;
    bool reply_ack; /* VHOST_USER_PROTOCOL_F_REPLY_ACK negotiated */
};

static const char *vu_name(uint32_t req)
{
    switch (req) {
    case VU_GET_FEATURES: return "GET_FEATURES";
    case VU_SET_FEATURES: return "SET_FEATURES";
    case VU_SET_OWNER: return "SET_OWNER";
    case VU_SET_MEM_TABLE: return "SET_MEM_TABLE";
    case VU_SET_VRING_NUM: return "SET_VRING_NUM";
    case VU_SET_VRING_ADDR: return "SET_VRING_ADDR";
    case VU_SET_VRING_BASE: return "SET_VRING_BASE";
    case VU_GET_VRING_BASE: return "GET_VRING_BASE";
    case VU_SET_VRING_KICK: return "SET_VRING_KICK";
    case VU_SET_VRING_CALL: return "SET_VRING_CALL";
    case VU_GET_PROTOCOL_FEATURES: return "GET_PROTOCOL_FEATURES";
    case VU_SET_PROTOCOL_FEATURES: return "SET_PROTOCOL_FEATURES";
    case VU_GET_QUEUE_NUM: return "GET_QUEUE_NUM";
    case VU_SET_VRING_ENABLE: return "SET_VRING_ENABLE";
    case VU_GET_CONFIG: return "GET_CONFIG";
    default: return "?";
    }
}

static void vu_connect(struct vu_conn *c, const char *path, double timeout_s)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof(sa.sun_path))
        die(EXIT_USAGE, "socket path too long: %s", path);
    strcpy(sa.sun_path, path);
    uint64_t deadline = now_ns() + (uint64_t)(timeout_s * 1e9);
    for (;;) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            die_errno("socket");
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
            c->fd = fd;
            c->reply_ack = false;
            logv("connected to %s", path);
            return;
        }
        int err = errno;
        close(fd);
        if ((err != ENOENT && err != ECONNREFUSED) || now_ns() >= deadline)
            die(EXIT_LOCAL, "connect %s: %s", path, strerror(err));
        usleep(20000);
    }
}

static void vu_send(struct vu_conn *c, uint32_t req, uint32_t flags, const void *payload,
                    uint32_t size, const int *fds, unsigned nfds)
{
    struct vu_header h = { .request = req, .flags = VU_FLAG_VERSION | flags, .size = size };
    struct iovec iov[2] = {
        { .iov_base = &h, .iov_len = sizeof(h) },
        { .iov_base = (void *)payload, .iov_len = size },
    };
    union {
        char buf[CMSG_SPACE(sizeof(int) * VU_MAX_FDS)];
        struct cmsghdr align;
    } ctl;
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = size ? 2 : 1 };
    if (nfds) {
        memset(&ctl, 0, sizeof(ctl));
        m.msg_control = ctl.buf;
        m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
    }
    logv("-> %s size=%u fds=%u%s", vu_name(req), size, nfds, flags & VU_FLAG_NEED_REPLY ? " need_reply" : "");
    ssize_t want = (ssize_t)(sizeof(h) + size);
    ssize_t n;
    do
        n = sendmsg(c->fd, &m, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EPIPE || errno == ECONNRESET)
            die(EXIT_BACKEND, "closed the connection (sending %s)", vu_name(req));
        die_errno("sendmsg");
    }
    if (n != want)
        die(EXIT_LOCAL, "short sendmsg for %s (%zd of %zd bytes)", vu_name(req), n, want);
}

static void read_full(struct vu_conn *c, void *buf, size_t len, uint32_t req)
{
    size_t got = 0;
    while (got < len) {
        struct iovec iov = { .iov_base = (char *)buf + got, .iov_len = len - got };
        union {
            char b[CMSG_SPACE(sizeof(int) * VU_MAX_FDS)];
            struct cmsghdr align;
        } ctl;
        struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b, .msg_controllen = sizeof(ctl.b) };
        ssize_t n = recvmsg(c->fd, &m, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die_errno("recvmsg");
        if (n == 0)
            die(EXIT_BACKEND, "closed the connection (waiting for the %s reply)", vu_name(req));
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm)) {
            if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
                size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < k; i++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
                    close(fd);
                }
                die(EXIT_BACKEND, "sent file descriptors with the %s reply", vu_name(req));
            }
        }
        if (m.msg_flags & MSG_CTRUNC)
            die(EXIT_BACKEND, "sent truncated ancillary data with the %s reply", vu_name(req));
        got += (size_t)n;
    }
}

/* Reads the reply to `req`; returns its payload size (at most `max`). */
static uint32_t vu_recv_reply(struct vu_conn *c, uint32_t req, void *payload, uint32_t max)
{
    struct vu_header h;
    read_full(c, &h, sizeof(h), req);
    if (h.request != req)
        die(EXIT_BACKEND, "replied with request %u (%s) to %s", h.request, vu_name(h.request), vu_name(req));
    if ((h.flags & VU_FLAG_VERSION_MASK) != VU_FLAG_VERSION || !(h.flags & VU_FLAG_REPLY))
        die(EXIT_BACKEND, "reply to %s has flags 0x%x (want version 1 and the reply bit)", vu_name(req), h.flags);
    if (h.size > max)
        die(EXIT_BACKEND, "reply to %s has %u payload bytes, at most %u expected", vu_name(req), h.size, max);
    if (h.size)
        read_full(c, payload, h.size, req);
    logv("<- %s size=%u", vu_name(req), h.size);
    return h.size;
}

static uint64_t vu_get_u64(struct vu_conn *c, uint32_t req)
{
    uint64_t v = 0;
    vu_send(c, req, 0, NULL, 0, NULL, 0);
    if (vu_recv_reply(c, req, &v, sizeof(v)) != sizeof(v))
        die(EXIT_BACKEND, "reply to %s is not a u64", vu_name(req));
    return v;
}

/* Sends a request that has no reply of its own; with REPLY_ACK, waits for the ack. */
static void vu_set(struct vu_conn *c, uint32_t req, const void *payload, uint32_t size, const int *fds, unsigned nfds)
{
    vu_send(c, req, c->reply_ack ? VU_FLAG_NEED_REPLY : 0, payload, size, fds, nfds);
    if (c->reply_ack) {
        uint64_t status = 0;
        if (vu_recv_reply(c, req, &status, sizeof(status)) != sizeof(status))
            die(EXIT_BACKEND, "REPLY_ACK for %s is not a u64", vu_name(req));
        if (status != 0)
            die(EXIT_BACKEND, "refused %s (REPLY_ACK status %" PRIu64 ")", vu_name(req), status);
    }
}

static void vu_set_u64(struct vu_conn *c, uint32_t req, uint64_t v)
{
    vu_set(c, req, &v, sizeof(v), NULL, 0);
}

/* ------------------------------------------------------------------------ */
/* Guest memory and virtqueues                                                */

struct guest_mem {
    int fd;
    uint8_t *base;
    uint64_t size;
    uint64_t next; /* bump allocator, guest-physical = offset */
};

static uint64_t gm_alloc(struct guest_mem *m, uint64_t len, uint64_t align)
{
    uint64_t off = align_up(m->next, align);
    if (off + len > m->size)
        die(EXIT_USAGE, "guest memory too small (%" PRIu64 " MiB); raise --mem-mb", m->size >> 20);
    m->next = off + len;
    return off;
}

struct slot {
    struct virtio_blk_req_hdr *hdr;
    uint8_t *status;
    uint64_t hdr_gpa, status_gpa, data_gpa;
    uint64_t t_submit;
    bool inflight;
};

struct queue {
    unsigned index;
    uint16_t num;
    struct vring_desc *desc;
    volatile uint16_t *avail;   /* flags, idx, ring[num], used_event */
    volatile uint8_t *used;     /* flags u16, idx u16, ring[num] (8 bytes each), avail_event u16 */
    uint64_t desc_gpa, avail_gpa, used_gpa;
    int kick_fd, call_fd;
    uint16_t avail_idx;     /* next free avail ring position (shadow) */
    uint16_t published_idx; /* avail->idx as last written */
    uint16_t last_used;     /* next used ring entry to read */
    struct slot *slots;
    unsigned depth, inflight;
    unsigned *free_slots, nfree;
    uint64_t rng;
    uint64_t kicks, wakeups, short_len;
    bool more; /* reap() stopped with completions left to read */
};

static inline uint16_t used_idx_acquire(struct queue *q)
{
    return __atomic_load_n((uint16_t *)(q->used + 2), __ATOMIC_ACQUIRE);
}

static inline struct vring_used_elem used_elem(struct queue *q, uint16_t pos)
{
    struct vring_used_elem e;
    memcpy(&e, (const void *)(q->used + 4 + 8u * (pos % q->num)), sizeof(e));
    return e;
}

static inline uint16_t used_flags(struct queue *q)
{
    return *(volatile uint16_t *)(q->used);
}

static inline uint16_t avail_event(struct queue *q)
{
    return *(volatile uint16_t *)(q->used + 4 + 8u * q->num);
}

static inline void set_used_event(struct queue *q, uint16_t v)
{
    q->avail[2 + q->num] = v;
}

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
/* CPU time                                                                   */

static double self_cpu_s(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) < 0)
        die_errno("getrusage");
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* utime + stime of a whole process (all threads) from /proc/PID/stat, seconds. */
static double proc_cpu_s(long pid)
{
    char path[64], buf[4096];
    snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "re");
    if (!f)
        die(EXIT_BACKEND, "cannot read %s (back-end exited?): %s", path, strerror(errno));
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* comm may contain spaces and parentheses */
    if (!p)
        die(EXIT_LOCAL, "unexpected format of %s", path);
    p++;
    /* After ")": field 3 (state) ... field 14 utime, field 15 stime. */
    unsigned long long utime = 0, stime = 0;
    char *save = NULL;
    int field = 2;
    for (char *tok = strtok_r(p, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
        field++;
        if (field == 14)
            utime = strtoull(tok, NULL, 10);
        else if (field == 15) {
            stime = strtoull(tok, NULL, 10);
            break;
        }
    }
    if (field != 15)
        die(EXIT_LOCAL, "unexpected format of %s", path);
    long hz = sysconf(_SC_CLK_TCK);
    return (double)(utime + stime) / (double)(hz > 0 ? hz : 100);
}

/* ------------------------------------------------------------------------ */
/* Set-up                                                                     */

struct device {
    uint64_t features;       /* offered */
    uint64_t acked;          /* what we set */
    uint64_t protocol;       /* offered protocol features (0 if none) */
    uint64_t protocol_acked;
    uint64_t max_queues;     /* GET_QUEUE_NUM, 0 if unknown */
    uint64_t capacity;       /* sectors, 0 if unknown */
    uint32_t blk_size;       /* 0 if not offered */
    uint16_t cfg_num_queues; /* 0 if not offered */
    bool event_idx;
};

static void negotiate(struct vu_conn *c, const struct options *o, struct device *d)
{
    memset(d, 0, sizeof(*d));

    vu_send(c, VU_SET_OWNER, 0, NULL, 0, NULL, 0);

    d->features = vu_get_u64(c, VU_GET_FEATURES);
    logv("device features 0x%" PRIx64, d->features);
    if (!(d->features & (1ull << VIRTIO_F_VERSION_1)))
        die(EXIT_BACKEND, "does not offer VIRTIO_F_VERSION_1 (features 0x%" PRIx64 ")", d->features);

    if (d->features & (1ull << VHOST_USER_F_PROTOCOL_FEATURES)) {
        d->protocol = vu_get_u64(c, VU_GET_PROTOCOL_FEATURES);
        d->protocol_acked = d->protocol & ((1ull << VU_PROTOCOL_F_MQ) | (1ull << VU_PROTOCOL_F_REPLY_ACK) |
                                           (1ull << VU_PROTOCOL_F_CONFIG));
        logv("protocol features 0x%" PRIx64 ", acking 0x%" PRIx64, d->protocol, d->protocol_acked);
        vu_set_u64(c, VU_SET_PROTOCOL_FEATURES, d->protocol_acked);
        /* From here on, every request without a reply of its own gets an ack. */
        c->reply_ack = d->protocol_acked & (1ull << VU_PROTOCOL_F_REPLY_ACK);
    }

    if (d->protocol_acked & (1ull << VU_PROTOCOL_F_MQ)) {
        d->max_queues = vu_get_u64(c, VU_GET_QUEUE_NUM);
        logv("back-end supports %" PRIu64 " queues", d->max_queues);
        if (d->max_queues == 0)
            die(EXIT_BACKEND, "GET_QUEUE_NUM returned 0");
        if (o->queues > d->max_queues)
            die(EXIT_USAGE, "--queues %u but the back-end supports %" PRIu64, o->queues, d->max_queues);
    }

    if (d->protocol_acked & (1ull << VU_PROTOCOL_F_CONFIG)) {
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
        if (d->features & (1ull << VIRTIO_BLK_F_BLK_SIZE))
            memcpy(&d->blk_size, rep.cfg + VIRTIO_BLK_CFG_BLK_SIZE, 4);
        if (d->features & (1ull << VIRTIO_BLK_F_MQ))
            memcpy(&d->cfg_num_queues, rep.cfg + VIRTIO_BLK_CFG_NUM_QUEUES, 2);
        logv("capacity %" PRIu64 " sectors, blk_size %u, num_queues %u", d->capacity, d->blk_size,
             d->cfg_num_queues);
    }

    if (o->queues > 1) {
        if (!(d->features & (1ull << VIRTIO_BLK_F_MQ)))
            die(EXIT_USAGE, "--queues %u but the back-end does not offer VIRTIO_BLK_F_MQ", o->queues);
        if (d->cfg_num_queues && o->queues > d->cfg_num_queues)
            die(EXIT_USAGE, "--queues %u but the device config says num_queues=%u", o->queues, d->cfg_num_queues);
    }
    if (o->write && (d->features & (1ull << VIRTIO_BLK_F_RO)))
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
    d->acked = d->features & want;
    d->event_idx = d->acked & (1ull << VIRTIO_RING_F_EVENT_IDX);
    logv("acking features 0x%" PRIx64, d->acked);
    vu_set_u64(c, VU_SET_FEATURES, d->acked);
}

static void setup_memory(struct guest_mem *m, uint64_t size)
{
    m->fd = memfd_create("blk-loadgen-guest-ram", MFD_CLOEXEC);
    if (m->fd < 0)
        die_errno("memfd_create");
    if (ftruncate(m->fd, (off_t)size) < 0)
        die_errno("ftruncate guest memory");
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, m->fd, 0);
    if (p == MAP_FAILED)
        die_errno("mmap guest memory");
    m->base = p;
    m->size = size;
    m->next = 0;
}

static void setup_queue(struct guest_mem *m, struct queue *q, unsigned index, const struct options *o)
{
    memset(q, 0, sizeof(*q));
    q->index = index;
    q->num = (uint16_t)o->queue_size;
    q->desc_gpa = gm_alloc(m, 16ull * q->num, PAGE);
    q->avail_gpa = gm_alloc(m, 6 + 2ull * q->num, 2);
    q->used_gpa = gm_alloc(m, 6 + 8ull * q->num, PAGE);
    q->desc = (struct vring_desc *)(m->base + q->desc_gpa);
    q->avail = (volatile uint16_t *)(m->base + q->avail_gpa);
    q->used = m->base + q->used_gpa;
    memset(m->base + q->desc_gpa, 0, 16ull * q->num);
    memset(m->base + q->avail_gpa, 0, 6 + 2ull * q->num);
    memset(m->base + q->used_gpa, 0, 6 + 8ull * q->num);

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

    q->kick_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    q->call_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->kick_fd < 0 || q->call_fd < 0)
        die_errno("eventfd");
}

static void start_queue(struct vu_conn *c, struct guest_mem *m, struct queue *q, bool event_idx, bool poll)
{
    struct vu_vring_state st = { .index = q->index, .num = q->num };
    vu_set(c, VU_SET_VRING_NUM, &st, sizeof(st), NULL, 0);
    st.num = 0;
    vu_set(c, VU_SET_VRING_BASE, &st, sizeof(st), NULL, 0);
    /* Ring addresses are front-end virtual addresses, as QEMU sends them. */
    struct vu_vring_addr a = {
        .index = q->index,
        .flags = 0,
        .desc_user_addr = (uint64_t)(uintptr_t)(m->base + q->desc_gpa),
        .used_user_addr = (uint64_t)(uintptr_t)(m->base + q->used_gpa),
        .avail_user_addr = (uint64_t)(uintptr_t)(m->base + q->avail_gpa),
        .log_guest_addr = q->used_gpa,
    };
    vu_set(c, VU_SET_VRING_ADDR, &a, sizeof(a), NULL, 0);

    if (poll) {
        /* Ask for no notifications: the flag without EVENT_IDX, a far-away used_event with it. */
        if (event_idx)
            set_used_event(q, 0x7fff);
        else
            q->avail[0] = VRING_AVAIL_F_NO_INTERRUPT;
    }
    uint64_t v = q->index;
    vu_set(c, VU_SET_VRING_CALL, &v, sizeof(v), &q->call_fd, 1);
    vu_set(c, VU_SET_VRING_KICK, &v, sizeof(v), &q->kick_fd, 1);
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
    struct vring_desc *d = &q->desc[head];
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
        die(EXIT_BACKEND, "queue %u: %s(10) completed with response %u, SCSI status 0x%02x, sense key %u%s", q->index,
            wr ? "WRITE" : "READ", resp->response, resp->status, resp->sense_len > 2 ? resp->sense[2] & 0xf : 0,
            resp->response == STATUS_SENTINEL ? " (response never written)" : "");
}

static void submit(struct run *r, struct queue *q, uint64_t t)
{
    unsigned si = q->free_slots[--q->nfree];
    struct slot *s = &q->slots[si];
    uint16_t head = (uint16_t)(si * DESCS_PER_REQ);
    struct vring_desc *d = &q->desc[head];
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
    q->avail[2 + (q->avail_idx % q->num)] = head;
    q->avail_idx++;
    s->inflight = true;
    s->t_submit = t;
    q->inflight++;
}

/* Publishes new avail entries and kicks if the device wants a kick (VIRTIO 1.2 §2.7.13.3/4). */
static void publish(struct queue *q, bool event_idx)
{
    if (q->avail_idx == q->published_idx)
        return;
    uint16_t old = q->published_idx;
    __atomic_store_n((uint16_t *)&q->avail[1], q->avail_idx, __ATOMIC_RELEASE);
    q->published_idx = q->avail_idx;
    /* The idx store must be visible before we read the device's suppression state. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    bool kick = event_idx ? vring_need_event(avail_event(q), q->avail_idx, old)
                          : !(used_flags(q) & VRING_USED_F_NO_NOTIFY);
    if (kick) {
        uint64_t one = 1;
        if (write(q->kick_fd, &one, sizeof(one)) != sizeof(one))
            die_errno("write kick eventfd");
        q->kicks++;
    }
}

/* Consumes the used ring; returns completions. Resubmits unless `drain`. */
static unsigned reap(struct run *r, struct queue *q, bool drain)
{
    const struct options *o = r->o;
    bool event_idx = r->dev->event_idx;
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
        uint16_t used = used_idx_acquire(q);
        uint16_t pending = (uint16_t)(used - q->last_used);
        if (pending > q->inflight)
            die(EXIT_BACKEND, "queue %u: used idx %u is %u ahead of our last seen %u, but only %u requests are in flight",
                q->index, used, pending, q->last_used, q->inflight);
        if (pending == 0) {
            if (!event_idx || o->poll)
                break;
            /* Re-arm the notification, then look once more to close the race (§2.7.10). */
            set_used_event(q, q->last_used);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (used_idx_acquire(q) == q->last_used)
                break;
            continue;
        }
        uint64_t t = now_ns();
        for (; pending; pending--) {
            struct vring_used_elem e = used_elem(q, q->last_used);
            if (e.id >= q->num || e.id % DESCS_PER_REQ || e.id / DESCS_PER_REQ >= q->depth)
                die(EXIT_BACKEND, "queue %u: used id %u is not the head of any chain we made", q->index, e.id);
            struct slot *s = &q->slots[e.id / DESCS_PER_REQ];
            if (!s->inflight)
                die(EXIT_BACKEND, "queue %u: used id %u returned twice", q->index, e.id);
            if (e.len > want_len)
                die(EXIT_BACKEND, "queue %u: used len %u exceeds the %u writable bytes of chain %u", q->index,
                    e.len, want_len, e.id);
            if (e.len != want_len && q->short_len++ == 0)
                fprintf(stderr, "blk-loadgen: warning: queue %u: used len %u, expected %u (bytes written)\n",
                        q->index, e.len, want_len);
            uint8_t st = o->scsi ? VIRTIO_BLK_S_OK : *(volatile uint8_t *)s->status;
            if (o->scsi)
                check_scsi(q, s, o->write);
            if (st != VIRTIO_BLK_S_OK)
                die(EXIT_BACKEND, "queue %u: request %s sector %" PRIu64 " completed with status %u%s", q->index,
                    o->write ? "OUT" : "IN", s->hdr->sector, st,
                    st == STATUS_SENTINEL ? " (status byte never written)"
                    : st == VIRTIO_BLK_S_IOERR ? " (IOERR)"
                    : st == VIRTIO_BLK_S_UNSUPP ? " (UNSUPP)" : " (not a virtio-blk status)");
            s->inflight = false;
            q->inflight--;
            q->free_slots[q->nfree++] = e.id / DESCS_PER_REQ;
            q->last_used++;
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
    publish(q, event_idx);
    if (o->poll && event_idx)
        set_used_event(q, (uint16_t)(q->last_used + 0x7fff));
    return done;
}

static void get_vring_bases(struct vu_conn *c, struct run *r)
{
    for (unsigned i = 0; i < r->o->queues; i++) {
        struct queue *q = &r->queues[i];
        struct vu_vring_state st = { .index = q->index, .num = 0 };
        vu_send(c, VU_GET_VRING_BASE, 0, &st, sizeof(st), NULL, 0);
        struct vu_vring_state rep;
        if (vu_recv_reply(c, VU_GET_VRING_BASE, &rep, sizeof(rep)) != sizeof(rep))
            die(EXIT_BACKEND, "GET_VRING_BASE reply is not a vring state");
        if (rep.index != q->index)
            die(EXIT_BACKEND, "GET_VRING_BASE for queue %u answered for queue %u", q->index, rep.index);
        if (rep.num != q->avail_idx)
            die(EXIT_BACKEND, "queue %u stopped at avail index %u, but all %u made available were completed",
                q->index, rep.num, q->avail_idx);
    }
}

int main(int argc, char **argv)
{
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
    setup_memory(&mem, o.mem_bytes);
    struct queue *queues = calloc(o.queues, sizeof(*queues));
    if (!queues)
        die_errno("calloc");
    for (unsigned i = 0; i < o.queues; i++)
        setup_queue(&mem, &queues[i], i + (o.scsi ? VIRTIO_SCSI_FIRST_REQUEST_QUEUE : 0), &o);

    /* One region covering all of it: guest-physical = offset, user address = our mapping. */
    struct vu_mem_table mt = { .nregions = 1 };
    mt.regions[0] = (struct vu_mem_region){ .guest_phys_addr = 0, .memory_size = mem.size,
                                            .userspace_addr = (uint64_t)(uintptr_t)mem.base, .mmap_offset = 0 };
    /* Like QEMU, send only the regions in use (8 + 32 * nregions bytes), not all eight slots. */
    vu_set(&c, VU_SET_MEM_TABLE, &mt, (uint32_t)(8 + sizeof(struct vu_mem_region) * mt.nregions), &mem.fd, 1);

    for (unsigned i = 0; i < o.queues; i++)
        start_queue(&c, &mem, &queues[i], dev.event_idx, o.poll);
    if (dev.acked & (1ull << VHOST_USER_F_PROTOCOL_FEATURES)) {
        for (unsigned i = 0; i < o.queues; i++) {
            struct vu_vring_state st = { .index = queues[i].index, .num = 1 };
            vu_set(&c, VU_SET_VRING_ENABLE, &st, sizeof(st), NULL, 0);
        }
    }

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
            if (epoll_ctl(ep, EPOLL_CTL_ADD, queues[i].call_fd, &ev) < 0)
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
        if (dev.event_idx && !o.poll)
            set_used_event(&queues[i], 0);
        publish(&queues[i], dev.event_idx);
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
                uint64_t cnt;
                if (read(queues[qi].call_fd, &cnt, sizeof(cnt)) < 0 && errno != EAGAIN)
                    die_errno("read call eventfd");
                queues[qi].wakeups++;
                done += reap(&r, &queues[qi], phase == DRAIN);
            }
        }
        if (done)
            last_progress = now_ns();
    }

    get_vring_bases(&c, &r);
    close(c.fd);

    uint64_t kicks = 0, wakeups = 0, short_len = 0;
    for (unsigned i = 0; i < o.queues; i++) {
        kicks += queues[i].kicks;
        wakeups += queues[i].wakeups;
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
           dev.event_idx ? "true" : "false", o.poll ? "true" : "false", size, cap_bytes, secs, r.ios_measured,
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
           (double)kicks / (double)r.ios_total, (double)wakeups / (double)r.ios_total, short_len, dev.features,
           dev.acked, dev.protocol, dev.protocol_acked);
    return 0;
}
