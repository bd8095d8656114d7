/*
 * net-loadgen: a vhost-user-net front-end load generator (plays QEMU and the guest's driver).
 *
 * It drives the first queue pair of a vhost-user-net back-end whose other side is a TAP:
 *  - tx: the transmit ring is kept full of frames (one descriptor each: the 12-byte virtio-net
 *    header and the frame); every completed chain is offered again at once. With --tso the frames
 *    are 64 KiB TCP/IPv4 TSO super-frames (HOST_TSO4, checksum offload).
 *  - rx: frames are injected into the TAP from the host side (an AF_PACKET socket on the TAP,
 *    --inject-iface), at most --window of them not yet seen by the guest, and the receive ring is
 *    kept full of --rx-buf byte buffers. Single-threaded on purpose: the machines this runs on may
 *    have two cores, and the back-end needs one.
 * The receive ring always has buffers (a TAP delivers stray frames in tx mode too). It prints one
 * JSON object: packets per second seen by the guest, the TAP's own counters over the same window
 * (--tap: /sys/class/net/TAP/statistics), and CPU time of itself and of --backend-pid.
 *
 * Everything read back from the back-end is validated (used ids, lengths, num_buffers, ring
 * indexes). Exit status: 0 ok, 1 local failure, 2 back-end misbehaved, 64 usage.
 *
 * References: QEMU docs/interop/vhost-user.rst; VIRTIO 1.2 §2.7 (split virtqueues) and §5.1
 * (network device). Written from the specifications.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/if_packet.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "frontend.h"

#define ETH_HLEN 14
#define ETH_P_BENCH 0x88b5 /* IEEE 802 local experimental: no host stack takes it */
#define TSO_PAYLOAD 65000u
#define TSO_MSS 1448u
#define TSO_HDRS (ETH_HLEN + 20 + 20)
#define INJECT_BATCH 64

struct options {
    const char *socket_path;
    bool rx; /* else tx */
    uint32_t frame_size;
    bool tso;
    unsigned queue_size;
    uint32_t rx_buf;
    unsigned window;
    double runtime_s;
    double warmup_s;
    uint64_t mem_bytes;
    long backend_pid;
    const char *tap;
    const char *inject_iface;
    bool event_idx;
    bool mrg_rxbuf;
    bool poll;
    double connect_timeout_s;
    double stall_timeout_s;
};

static void usage(FILE *f)
{
    fputs("usage: net-loadgen --socket-path PATH --mode tx|rx [options]\n"
          "\n"
          "A vhost-user-net front-end that moves frames through a TAP-backed back-end and reports JSON.\n"
          "\n"
          "  --socket-path PATH     back-end's vhost-user socket (connects, retrying)\n"
          "  --mode tx|rx           guest transmits, or the TAP's host side injects (default tx)\n"
          "  --frame-size BYTES     Ethernet frame size without the virtio-net header, 60..1514 (default 64)\n"
          "  --tso                  tx: 64 KiB TCP/IPv4 TSO frames (needs HOST_TSO4 and CSUM)\n"
          "  --queue-size N         descriptors per virtqueue, power of 2 (default 256)\n"
          "  --rx-buf BYTES         size of each receive buffer (default 1536, as Linux's mergeable buffers)\n"
          "  --window N             rx: frames injected but not yet received, at most (default 256)\n"
          "  --inject-iface NAME    rx: inject with an AF_PACKET socket on this interface (the TAP)\n"
          "  --tap NAME             report this interface's counters over the measured window\n"
          "  --runtime SECONDS      measured time (default 5)\n"
          "  --warmup SECONDS       unmeasured time before it (default 1)\n"
          "  --mem-mb N             guest memory memfd size (default 64)\n"
          "  --backend-pid PID      also report that process's CPU time (/proc/PID/stat)\n"
          "  --no-event-idx         do not negotiate VIRTIO_RING_F_EVENT_IDX\n"
          "  --no-mrg-rxbuf         do not negotiate VIRTIO_NET_F_MRG_RXBUF\n"
          "  --poll                 busy-poll used rings, suppress call notifications\n"
          "  --connect-timeout S    how long to retry connecting (default 10)\n"
          "  --stall-timeout S      fail if nothing moves for this long (default 10)\n"
          "  -v, --verbose          log the protocol exchange on stderr\n"
          "\n"
          "Exit status: 0 ok, 1 local failure, 2 back-end misbehaved, 64 usage.\n",
          f);
}

static void parse_options(int argc, char **argv, struct options *o)
{
    enum { O_SOCKET = 256, O_MODE, O_FRAME, O_TSO, O_QSIZE, O_RXBUF, O_WINDOW, O_INJECT, O_TAP, O_RUNTIME,
           O_WARMUP, O_MEM, O_PID, O_NO_EVIDX, O_NO_MRG, O_POLL, O_CONN_TO, O_STALL_TO, O_HELP };
    static const struct option longopts[] = {
        { "socket-path", required_argument, 0, O_SOCKET },
        { "mode", required_argument, 0, O_MODE },
        { "frame-size", required_argument, 0, O_FRAME },
        { "tso", no_argument, 0, O_TSO },
        { "queue-size", required_argument, 0, O_QSIZE },
        { "rx-buf", required_argument, 0, O_RXBUF },
        { "window", required_argument, 0, O_WINDOW },
        { "inject-iface", required_argument, 0, O_INJECT },
        { "tap", required_argument, 0, O_TAP },
        { "runtime", required_argument, 0, O_RUNTIME },
        { "warmup", required_argument, 0, O_WARMUP },
        { "mem-mb", required_argument, 0, O_MEM },
        { "backend-pid", required_argument, 0, O_PID },
        { "no-event-idx", no_argument, 0, O_NO_EVIDX },
        { "no-mrg-rxbuf", no_argument, 0, O_NO_MRG },
        { "poll", no_argument, 0, O_POLL },
        { "connect-timeout", required_argument, 0, O_CONN_TO },
        { "stall-timeout", required_argument, 0, O_STALL_TO },
        { "verbose", no_argument, 0, 'v' },
        { "help", no_argument, 0, O_HELP },
        { 0, 0, 0, 0 },
    };
    *o = (struct options){
        .frame_size = 64, .queue_size = 256, .rx_buf = 1536, .window = 256, .runtime_s = 5, .warmup_s = 1,
        .mem_bytes = 64ull << 20, .backend_pid = -1, .event_idx = true, .mrg_rxbuf = true,
        .connect_timeout_s = 10, .stall_timeout_s = 10,
    };
    int c;
    while ((c = getopt_long(argc, argv, "vh", longopts, NULL)) != -1) {
        switch (c) {
        case O_SOCKET: o->socket_path = optarg; break;
        case O_MODE:
            if (!strcmp(optarg, "tx"))
                o->rx = false;
            else if (!strcmp(optarg, "rx"))
                o->rx = true;
            else
                die(EXIT_USAGE, "--mode: expected tx or rx, got '%s'", optarg);
            break;
        case O_FRAME: o->frame_size = (uint32_t)parse_u64("--frame-size", optarg, false); break;
        case O_TSO: o->tso = true; break;
        case O_QSIZE: o->queue_size = (unsigned)parse_u64("--queue-size", optarg, false); break;
        case O_RXBUF: o->rx_buf = (uint32_t)parse_u64("--rx-buf", optarg, true); break;
        case O_WINDOW: o->window = (unsigned)parse_u64("--window", optarg, false); break;
        case O_INJECT: o->inject_iface = optarg; break;
        case O_TAP: o->tap = optarg; break;
        case O_RUNTIME: o->runtime_s = parse_seconds("--runtime", optarg); break;
        case O_WARMUP: o->warmup_s = parse_seconds("--warmup", optarg); break;
        case O_MEM: o->mem_bytes = parse_u64("--mem-mb", optarg, false) << 20; break;
        case O_PID: o->backend_pid = (long)parse_u64("--backend-pid", optarg, false); break;
        case O_NO_EVIDX: o->event_idx = false; break;
        case O_NO_MRG: o->mrg_rxbuf = false; break;
        case O_POLL: o->poll = true; break;
        case O_CONN_TO: o->connect_timeout_s = parse_seconds("--connect-timeout", optarg); break;
        case O_STALL_TO: o->stall_timeout_s = parse_seconds("--stall-timeout", optarg); break;
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
    if (o->frame_size < 60 || o->frame_size > 1514)
        die(EXIT_USAGE, "--frame-size: 60..1514");
    if (o->queue_size < 2 || o->queue_size > 32768 || (o->queue_size & (o->queue_size - 1)))
        die(EXIT_USAGE, "--queue-size: a power of 2 in 2..32768 (VIRTIO 1.2 §2.7)");
    if (o->rx_buf < sizeof(struct virtio_net_hdr) + 1514 || o->rx_buf > 65536)
        die(EXIT_USAGE, "--rx-buf: %zu..65536 (a header and a 1514-byte frame)", sizeof(struct virtio_net_hdr) + 1514);
    if (o->rx && !o->inject_iface)
        die(EXIT_USAGE, "--mode rx needs --inject-iface");
    if (o->rx && o->tso)
        die(EXIT_USAGE, "--tso is a tx mode");
    if (o->window < 1 || o->window > 1u << 20)
        die(EXIT_USAGE, "--window: 1..1048576");
    if (o->runtime_s <= 0)
        die(EXIT_USAGE, "--runtime must be > 0");
    if (o->mem_bytes == 0 || o->mem_bytes > (16ull << 30))
        die(EXIT_USAGE, "--mem-mb: 1..16384");
}

/* A ring whose chains are one descriptor each: chain i is descriptor i over buffer i. */
struct netq {
    struct vring r;
    uint8_t *bufs;
    uint64_t bufs_gpa;
    uint32_t stride;
    bool *inflight;
    unsigned outstanding;
    unsigned frame_left; /* rx with MRG_RXBUF: buffers still due for the current frame */
    uint64_t packets;    /* frames completed (tx) or received whole (rx), whole run */
    uint64_t bytes;
    bool more;
};

static void netq_setup(struct guest_mem *m, struct netq *q, unsigned index, const struct options *o, uint32_t buf_len,
                       bool writable)
{
    memset(q, 0, sizeof(*q));
    vring_setup(m, &q->r, index, (uint16_t)o->queue_size);
    q->stride = (uint32_t)align_up(buf_len, 64);
    q->bufs_gpa = gm_alloc(m, (uint64_t)q->stride * q->r.num, PAGE);
    q->bufs = m->base + q->bufs_gpa;
    q->inflight = calloc(q->r.num, sizeof(*q->inflight));
    if (!q->inflight)
        die_errno("calloc");
    for (unsigned i = 0; i < q->r.num; i++)
        q->r.desc[i] = (struct vring_desc){ .addr = q->bufs_gpa + (uint64_t)q->stride * i, .len = buf_len,
                                            .flags = writable ? VRING_DESC_F_WRITE : 0, .next = 0 };
}

static void offer(struct netq *q, uint16_t id)
{
    q->inflight[id] = true;
    q->outstanding++;
    vring_offer(&q->r, id);
}

/* Fills tx buffer `i`: header, then an Ethernet frame (or a TSO TCP/IPv4 super-frame). */
static void fill_tx(struct netq *q, unsigned i, const struct options *o)
{
    uint8_t *b = q->bufs + (uint64_t)q->stride * i;
    struct virtio_net_hdr *h = (struct virtio_net_hdr *)b;
    uint8_t *f = b + sizeof(*h);
    uint32_t len = q->r.desc[i].len - (uint32_t)sizeof(*h);
    memset(h, 0, sizeof(*h));
    memset(f, 0, len);
    static const uint8_t dst[6] = { 0x02, 0, 0, 0, 0, 0x02 }, src[6] = { 0x02, 0, 0, 0, 0, 0x01 };
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    if (!o->tso) {
        f[12] = ETH_P_BENCH >> 8;
        f[13] = ETH_P_BENCH & 0xff;
        for (uint32_t k = ETH_HLEN; k < len; k++)
            f[k] = (uint8_t)(k ^ i);
        return;
    }
    f[12] = 0x08; /* IPv4 */
    uint8_t *ip = f + ETH_HLEN, *tcp = ip + 20;
    uint16_t ip_len = (uint16_t)(len - ETH_HLEN);
    ip[0] = 0x45;
    ip[2] = (uint8_t)(ip_len >> 8);
    ip[3] = (uint8_t)ip_len;
    ip[8] = 64;
    ip[9] = 6; /* TCP */
    memcpy(ip + 12, (uint8_t[]){ 10, 0, 0, 1 }, 4);
    memcpy(ip + 16, (uint8_t[]){ 10, 0, 0, 2 }, 4);
    uint32_t sum = 0;
    for (unsigned k = 0; k < 20; k += 2)
        sum += (uint32_t)(ip[k] << 8 | ip[k + 1]);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    ip[10] = (uint8_t)(~sum >> 8);
    ip[11] = (uint8_t)~sum;
    tcp[0] = 0x9c; tcp[1] = 0x40; /* 40000 */
    tcp[2] = 0x13; tcp[3] = 0x89; /* 5001 */
    tcp[12] = 5 << 4;
    tcp[13] = 0x10; /* ACK */
    tcp[14] = 0xff; tcp[15] = 0xff;
    h->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    h->gso_type = VIRTIO_NET_HDR_GSO_TCPV4;
    h->hdr_len = TSO_HDRS;
    h->gso_size = TSO_MSS;
    h->csum_start = ETH_HLEN + 20;
    h->csum_offset = 16;
}

/* Consumes a used ring: tx chains are offered again, rx buffers too (after checking what came). */
static unsigned reap(struct netq *q, bool rx, bool mrg, bool refill, bool event_idx, bool poll)
{
    unsigned done = 0;
    q->more = false;
    for (unsigned pass = 0;; pass++) {
        if (pass == 8) {
            q->more = true; /* bounded so the caller gets to look at the clock */
            break;
        }
        uint16_t used = used_idx_acquire(&q->r);
        uint16_t pending = (uint16_t)(used - q->r.last_used);
        if (pending > q->outstanding)
            die(EXIT_BACKEND, "queue %u: used idx %u is %u ahead of our last seen %u, but only %u chains are out",
                q->r.index, used, pending, q->r.last_used, q->outstanding);
        if (pending == 0) {
            if (!event_idx || poll)
                break;
            /* Re-arm the notification, then look once more to close the race (§2.7.10). */
            set_used_event(&q->r, q->r.last_used);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (used_idx_acquire(&q->r) == q->r.last_used)
                break;
            continue;
        }
        for (; pending; pending--) {
            struct vring_used_elem e = used_elem(&q->r, q->r.last_used++);
            if (e.id >= q->r.num || !q->inflight[e.id])
                die(EXIT_BACKEND, "queue %u: used id %u is not a chain we have out", q->r.index, e.id);
            q->inflight[e.id] = false;
            q->outstanding--;
            if (rx) {
                const struct virtio_net_hdr *h = (const void *)(q->bufs + (uint64_t)q->stride * e.id);
                if (e.len > q->r.desc[e.id].len)
                    die(EXIT_BACKEND, "queue %u: used len %u exceeds the %u-byte buffer", q->r.index, e.len,
                        q->r.desc[e.id].len);
                if (q->frame_left == 0) {
                    /* The first buffer of a frame: header and at least an Ethernet header. */
                    if (e.len < sizeof(*h) + ETH_HLEN)
                        die(EXIT_BACKEND, "queue %u: received %u bytes, less than header and Ethernet header",
                            q->r.index, e.len);
                    uint16_t nb = mrg ? h->num_buffers : 1;
                    if (nb < 1 || nb > q->r.num)
                        die(EXIT_BACKEND, "queue %u: num_buffers %u", q->r.index, nb);
                    q->frame_left = nb;
                    q->bytes += e.len - sizeof(*h);
                } else {
                    q->bytes += e.len;
                }
                if (--q->frame_left == 0)
                    q->packets++;
            } else {
                q->packets++;
                q->bytes += q->r.desc[e.id].len - sizeof(struct virtio_net_hdr);
            }
            done++;
            if (refill)
                offer(q, (uint16_t)e.id);
        }
    }
    vring_publish(&q->r, event_idx);
    if (poll && event_idx)
        set_used_event(&q->r, (uint16_t)(q->r.last_used + 0x7fff));
    return done;
}

/* ---- rx injection: AF_PACKET on the TAP, frames go to the TAP's readers (the back-end) ---- */
struct injector {
    int fd;
    uint8_t frames[INJECT_BATCH][1514];
    struct iovec iov[INJECT_BATCH];
    struct mmsghdr msgs[INJECT_BATCH];
    uint64_t sent;
};

static void injector_open(struct injector *in, const char *iface, uint32_t frame_size)
{
    unsigned ifindex = if_nametoindex(iface);
    if (!ifindex)
        die(EXIT_USAGE, "--inject-iface %s: %s", iface, strerror(errno));
    /* Protocol 0: this socket only sends (it would see its own frames otherwise). */
    in->fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (in->fd < 0)
        die_errno("socket(AF_PACKET) (needs CAP_NET_RAW)");
    struct sockaddr_ll sa = { .sll_family = AF_PACKET, .sll_ifindex = (int)ifindex };
    if (bind(in->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        die_errno("bind AF_PACKET");
    for (unsigned i = 0; i < INJECT_BATCH; i++) {
        uint8_t *f = in->frames[i];
        memset(f, 0, frame_size);
        memcpy(f, (uint8_t[]){ 0x02, 0, 0, 0, 0, 0x03 }, 6);
        memcpy(f + 6, (uint8_t[]){ 0x02, 0, 0, 0, 0, 0x04 }, 6);
        f[12] = ETH_P_BENCH >> 8;
        f[13] = ETH_P_BENCH & 0xff;
        in->iov[i] = (struct iovec){ .iov_base = f, .iov_len = frame_size };
        in->msgs[i].msg_hdr = (struct msghdr){ .msg_iov = &in->iov[i], .msg_iovlen = 1 };
    }
}

/* Injects up to `n` frames; returns how many the kernel took. */
static unsigned inject(struct injector *in, unsigned n)
{
    if (n > INJECT_BATCH)
        n = INJECT_BATCH;
    if (n == 0)
        return 0;
    int k = sendmmsg(in->fd, in->msgs, n, 0);
    if (k < 0) {
        if (errno == EAGAIN || errno == ENOBUFS || errno == EINTR)
            return 0;
        die_errno("sendmmsg");
    }
    in->sent += (unsigned)k;
    return (unsigned)k;
}

/* ---- interface counters ---- */
struct if_counters {
    uint64_t rx_packets, rx_dropped, tx_packets, tx_dropped;
};

static uint64_t read_stat(const char *iface, const char *name)
{
    char path[256], buf[64];
    snprintf(path, sizeof(path), "/sys/class/net/%s/statistics/%s", iface, name);
    FILE *f = fopen(path, "re");
    if (!f)
        die(EXIT_LOCAL, "%s: %s", path, strerror(errno));
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    return strtoull(buf, NULL, 10);
}

static struct if_counters read_counters(const char *iface)
{
    struct if_counters c = { 0 };
    if (!iface)
        return c;
    c.rx_packets = read_stat(iface, "rx_packets");
    c.rx_dropped = read_stat(iface, "rx_dropped");
    c.tx_packets = read_stat(iface, "tx_packets");
    c.tx_dropped = read_stat(iface, "tx_dropped");
    return c;
}

int main(int argc, char **argv)
{
    progname = "net-loadgen";
    struct options o;
    parse_options(argc, argv, &o);

    struct vu_conn c;
    vu_connect(&c, o.socket_path, o.connect_timeout_s);
    struct vu_device dev;
    vu_negotiate(&c, &dev, (1ull << VU_PROTOCOL_F_MQ) | (1ull << VU_PROTOCOL_F_REPLY_ACK), 2);
    uint64_t want = (1ull << VIRTIO_F_VERSION_1) | (1ull << VHOST_USER_F_PROTOCOL_FEATURES);
    if (o.event_idx)
        want |= 1ull << VIRTIO_RING_F_EVENT_IDX;
    if (o.mrg_rxbuf)
        want |= 1ull << VIRTIO_NET_F_MRG_RXBUF;
    if (o.tso) {
        uint64_t tso = (1ull << VIRTIO_NET_F_CSUM) | (1ull << VIRTIO_NET_F_HOST_TSO4);
        if ((dev.features & tso) != tso)
            die(EXIT_USAGE, "--tso but the back-end does not offer CSUM and HOST_TSO4");
        want |= tso;
    }
    vu_ack_features(&c, &dev, want);
    bool mrg = dev.acked & (1ull << VIRTIO_NET_F_MRG_RXBUF);

    uint32_t tx_len = (uint32_t)sizeof(struct virtio_net_hdr) + (o.tso ? TSO_HDRS + TSO_PAYLOAD : o.frame_size);
    uint64_t need = (uint64_t)o.queue_size * (align_up(o.rx_buf, 64) + (o.rx ? 64 : align_up(tx_len, 64))) + (4u << 20);
    if (o.mem_bytes < need)
        o.mem_bytes = align_up(need, 1u << 20);
    struct guest_mem mem;
    gm_setup(&mem, o.mem_bytes);
    struct netq rxq, txq;
    netq_setup(&mem, &rxq, VIRTIO_NET_RX_QUEUE, &o, o.rx_buf, true);
    netq_setup(&mem, &txq, VIRTIO_NET_TX_QUEUE, &o, o.rx ? 64 : tx_len, false);
    gm_share(&c, &mem);
    vring_start(&c, &mem, &rxq.r, dev.event_idx, o.poll);
    vring_start(&c, &mem, &txq.r, dev.event_idx, o.poll);
    vring_enable(&c, &dev, &rxq.r);
    vring_enable(&c, &dev, &txq.r);

    struct injector *in = NULL;
    if (o.rx) {
        in = calloc(1, sizeof(*in));
        if (!in)
            die_errno("calloc");
        injector_open(in, o.inject_iface, o.frame_size);
    }

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die_errno("epoll_create1");
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.u32 = UINT32_MAX };
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c.fd, &ev) < 0)
        die_errno("epoll_ctl socket");
    struct netq *qs[2] = { &rxq, &txq };
    if (!o.poll) {
        for (unsigned i = 0; i < 2; i++) {
            ev = (struct epoll_event){ .events = EPOLLIN, .data.u32 = i };
            if (epoll_ctl(ep, EPOLL_CTL_ADD, qs[i]->r.call_fd, &ev) < 0)
                die_errno("epoll_ctl call fd");
        }
    }

    for (unsigned i = 0; i < rxq.r.num; i++)
        offer(&rxq, (uint16_t)i);
    if (!o.rx) {
        for (unsigned i = 0; i < txq.r.num; i++) {
            fill_tx(&txq, i, &o);
            offer(&txq, (uint16_t)i);
        }
    }
    for (unsigned i = 0; i < 2; i++) {
        if (dev.event_idx && !o.poll)
            set_used_event(&qs[i]->r, 0);
        vring_publish(&qs[i]->r, dev.event_idx);
    }

    uint64_t t0 = now_ns();
    uint64_t t_measure = t0 + (uint64_t)(o.warmup_s * 1e9);
    uint64_t t_end = t_measure + (uint64_t)(o.runtime_s * 1e9);
    uint64_t stall_ns = (uint64_t)(o.stall_timeout_s * 1e9);
    uint64_t last_progress = t0;
    double cpu0 = 0, cpu1 = 0, bcpu0 = 0, bcpu1 = 0;
    uint64_t m_start = 0, m_end = 0, p0 = 0, p1 = 0, b0 = 0, b1 = 0, inj0 = 0, inj1 = 0;
    struct if_counters k0 = { 0 }, k1 = { 0 };
    struct netq *mq = o.rx ? &rxq : &txq; /* the measured queue */
    enum { WARMUP, MEASURE, DRAIN } phase = WARMUP;
    /* rx: frames injected but not received yet; a stall (dropped frames) resets it. */
    uint64_t lost_guess = 0;

    for (;;) {
        uint64_t t = now_ns();
        if (phase == WARMUP && t >= t_measure) {
            phase = MEASURE;
            m_start = t;
            p0 = mq->packets;
            b0 = mq->bytes;
            inj0 = in ? in->sent : 0;
            k0 = read_counters(o.tap);
            cpu0 = self_cpu_s();
            if (o.backend_pid > 0)
                bcpu0 = proc_cpu_s(o.backend_pid);
        }
        if (phase == MEASURE && t >= t_end) {
            phase = DRAIN;
            m_end = t;
            p1 = mq->packets;
            b1 = mq->bytes;
            inj1 = in ? in->sent : 0;
            k1 = read_counters(o.tap);
            cpu1 = self_cpu_s();
            if (o.backend_pid > 0)
                bcpu1 = proc_cpu_s(o.backend_pid);
        }
        if (phase == DRAIN && (o.rx || txq.outstanding == 0))
            break;
        if (t - last_progress > stall_ns)
            die(EXIT_BACKEND, "nothing moved for %.1f s (%u tx chains out)", o.stall_timeout_s, txq.outstanding);

        unsigned done = 0;
        if (in) {
            uint64_t received = rxq.packets + lost_guess;
            uint64_t ahead = in->sent > received ? in->sent - received : 0;
            if (ahead < o.window && phase != DRAIN)
                done += inject(in, (unsigned)(o.window - ahead));
            else if (t - last_progress > 20000000ull)
                lost_guess += ahead; /* 20 ms and nothing came: the TAP dropped them */
        }
        int timeout_ms = 0;
        if (o.poll) {
            for (unsigned i = 0; i < 2; i++)
                done += reap(qs[i], i == 0, mrg, phase != DRAIN || i == 0, dev.event_idx, true);
            struct epoll_event evs[1];
            if (epoll_wait(ep, evs, 1, 0) > 0)
                die(EXIT_BACKEND, "closed the connection or sent an unexpected message during I/O");
        } else {
            uint64_t next = phase == WARMUP ? t_measure : phase == MEASURE ? t_end : t + 100000000ull;
            timeout_ms = next > t ? (int)((next - t + 999999) / 1000000) : 0;
            if (timeout_ms > 10)
                timeout_ms = 10;
            for (unsigned i = 0; i < 2; i++) {
                if (qs[i]->more) {
                    done += reap(qs[i], i == 0, mrg, phase != DRAIN || i == 0, dev.event_idx, false);
                    timeout_ms = 0;
                }
            }
            if (in && done)
                timeout_ms = 0;
            struct epoll_event evs[4];
            int n = epoll_wait(ep, evs, 4, timeout_ms);
            if (n < 0 && errno != EINTR)
                die_errno("epoll_wait");
            for (int k = 0; k < n; k++) {
                uint32_t qi = evs[k].data.u32;
                if (qi == UINT32_MAX)
                    die(EXIT_BACKEND, "closed the connection or sent an unexpected message during I/O");
                drain_eventfd(qs[qi]->r.call_fd);
                qs[qi]->r.wakeups++;
                done += reap(qs[qi], qi == 0, mrg, phase != DRAIN || qi == 0, dev.event_idx, false);
            }
        }
        if (done)
            last_progress = now_ns();
    }

    vring_check_base(&c, &txq.r);
    close(c.fd);

    double secs = (double)(m_end - m_start) / 1e9;
    double packets = (double)(p1 - p0);
    if (packets == 0)
        die(EXIT_BACKEND, "no frame %s during the measured %.1f s", o.rx ? "received" : "sent", secs);
    double pps = packets / secs;
    double cpu = cpu1 - cpu0, bcpu = bcpu1 - bcpu0;
    uint32_t frame_bytes = o.tso ? TSO_HDRS + TSO_PAYLOAD : o.frame_size;
    printf("{\"mode\":\"%s\",\"frame_size\":%u,\"tso\":%s,\"queue_size\":%u,\"rx_buf\":%u,\"event_idx\":%s,"
           "\"mrg_rxbuf\":%s,\"poll\":%s,\"runtime_s\":%.6f,\"packets\":%.0f,\"pps\":%.1f,\"gbit_s\":%.4f,",
           o.rx ? "rx" : "tx", frame_bytes, o.tso ? "true" : "false", o.queue_size, o.rx_buf,
           dev.event_idx ? "true" : "false", mrg ? "true" : "false", o.poll ? "true" : "false", secs, packets, pps,
           (double)(b1 - b0) * 8 / secs / 1e9);
    if (in)
        printf("\"injected\":%" PRIu64 ",", inj1 - inj0);
    if (o.tap)
        printf("\"tap\":{\"name\":\"%s\",\"rx_packets\":%" PRIu64 ",\"rx_dropped\":%" PRIu64 ",\"tx_packets\":%" PRIu64
               ",\"tx_dropped\":%" PRIu64 "},",
               o.tap, k1.rx_packets - k0.rx_packets, k1.rx_dropped - k0.rx_dropped, k1.tx_packets - k0.tx_packets,
               k1.tx_dropped - k0.tx_dropped);
    printf("\"loadgen_cpu_s\":%.6f,\"loadgen_cpu_ns_per_packet\":%.1f,", cpu, cpu * 1e9 / packets);
    if (o.backend_pid > 0)
        printf("\"backend_pid\":%ld,\"backend_cpu_s\":%.6f,\"backend_cpu_ns_per_packet\":%.1f,", o.backend_pid, bcpu,
               bcpu * 1e9 / packets);
    else
        printf("\"backend_pid\":null,\"backend_cpu_s\":null,\"backend_cpu_ns_per_packet\":null,");
    printf("\"tx_kicks\":%" PRIu64 ",\"rx_wakeups\":%" PRIu64 ",\"tx_wakeups\":%" PRIu64 ",\"features\":\"0x%" PRIx64
           "\",\"acked_features\":\"0x%" PRIx64 "\"}\n",
           txq.r.kicks, rxq.r.wakeups, txq.r.wakeups, dev.features, dev.acked);
    return 0;
}
