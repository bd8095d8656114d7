/*
 * The shared vhost-user front-end (frontend.h). Written from the specifications: QEMU
 * docs/interop/vhost-user.rst, VIRTIO 1.2 §2.7 (split virtqueues).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "frontend.h"

const char *progname = "loadgen";
int verbose;

void __attribute__((noreturn, format(printf, 2, 3))) die(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", progname);
    fputs(code == EXIT_BACKEND ? "backend misbehaved: " : "error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

void __attribute__((format(printf, 1, 2))) logv(const char *fmt, ...)
{
    if (!verbose)
        return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", progname);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

uint64_t parse_u64(const char *opt, const char *s, bool suffixes)
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

double parse_seconds(const char *opt, const char *s)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= 0) || v > 86400)
        die(EXIT_USAGE, "%s: not a duration in seconds: '%s'", opt, s);
    return v;
}

const char *vu_name(uint32_t req)
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

void vu_connect(struct vu_conn *c, const char *path, double timeout_s)
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

void vu_send(struct vu_conn *c, uint32_t req, uint32_t flags, const void *payload,
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

uint32_t vu_recv_reply(struct vu_conn *c, uint32_t req, void *payload, uint32_t max)
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

uint64_t vu_get_u64(struct vu_conn *c, uint32_t req)
{
    uint64_t v = 0;
    vu_send(c, req, 0, NULL, 0, NULL, 0);
    if (vu_recv_reply(c, req, &v, sizeof(v)) != sizeof(v))
        die(EXIT_BACKEND, "reply to %s is not a u64", vu_name(req));
    return v;
}

void vu_set(struct vu_conn *c, uint32_t req, const void *payload, uint32_t size, const int *fds, unsigned nfds)
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

void vu_set_u64(struct vu_conn *c, uint32_t req, uint64_t v)
{
    vu_set(c, req, &v, sizeof(v), NULL, 0);
}

double self_cpu_s(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) < 0)
        die_errno("getrusage");
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

double proc_cpu_s(long pid)
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


void vu_negotiate(struct vu_conn *c, struct vu_device *d, uint64_t protocol_want, unsigned queues)
{
    memset(d, 0, sizeof(*d));

    vu_send(c, VU_SET_OWNER, 0, NULL, 0, NULL, 0);

    d->features = vu_get_u64(c, VU_GET_FEATURES);
    logv("device features 0x%" PRIx64, d->features);
    if (!(d->features & (1ull << VIRTIO_F_VERSION_1)))
        die(EXIT_BACKEND, "does not offer VIRTIO_F_VERSION_1 (features 0x%" PRIx64 ")", d->features);

    if (d->features & (1ull << VHOST_USER_F_PROTOCOL_FEATURES)) {
        d->protocol = vu_get_u64(c, VU_GET_PROTOCOL_FEATURES);
        d->protocol_acked = d->protocol & protocol_want;
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
        if (queues > d->max_queues)
            die(EXIT_USAGE, "%u queues wanted but the back-end supports %" PRIu64, queues, d->max_queues);
    }
}

void vu_ack_features(struct vu_conn *c, struct vu_device *d, uint64_t want)
{
    d->acked = d->features & want;
    d->event_idx = d->acked & (1ull << VIRTIO_RING_F_EVENT_IDX);
    logv("acking features 0x%" PRIx64, d->acked);
    vu_set_u64(c, VU_SET_FEATURES, d->acked);
}

void gm_setup(struct guest_mem *m, uint64_t size)
{
    m->fd = memfd_create("loadgen-guest-ram", MFD_CLOEXEC);
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

uint64_t gm_alloc(struct guest_mem *m, uint64_t len, uint64_t align)
{
    uint64_t off = align_up(m->next, align);
    if (off + len > m->size)
        die(EXIT_USAGE, "guest memory too small (%" PRIu64 " MiB); raise --mem-mb", m->size >> 20);
    m->next = off + len;
    return off;
}

void gm_share(struct vu_conn *c, struct guest_mem *m)
{
    struct vu_mem_table mt = { .nregions = 1 };
    mt.regions[0] = (struct vu_mem_region){ .guest_phys_addr = 0, .memory_size = m->size,
                                            .userspace_addr = (uint64_t)(uintptr_t)m->base, .mmap_offset = 0 };
    /* Like QEMU, send only the regions in use (8 + 32 * nregions bytes), not all eight slots. */
    vu_set(c, VU_SET_MEM_TABLE, &mt, (uint32_t)(8 + sizeof(struct vu_mem_region) * mt.nregions), &m->fd, 1);
}

void vring_setup(struct guest_mem *m, struct vring *q, unsigned index, uint16_t num)
{
    memset(q, 0, sizeof(*q));
    q->index = index;
    q->num = num;
    q->desc_gpa = gm_alloc(m, 16ull * q->num, PAGE);
    q->avail_gpa = gm_alloc(m, 6 + 2ull * q->num, 2);
    q->used_gpa = gm_alloc(m, 6 + 8ull * q->num, PAGE);
    q->desc = (struct vring_desc *)(m->base + q->desc_gpa);
    q->avail = (volatile uint16_t *)(m->base + q->avail_gpa);
    q->used = m->base + q->used_gpa;
    memset(m->base + q->desc_gpa, 0, 16ull * q->num);
    memset(m->base + q->avail_gpa, 0, 6 + 2ull * q->num);
    memset(m->base + q->used_gpa, 0, 6 + 8ull * q->num);
    q->kick_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    q->call_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->kick_fd < 0 || q->call_fd < 0)
        die_errno("eventfd");
}

void vring_start(struct vu_conn *c, struct guest_mem *m, struct vring *q, bool event_idx, bool poll)
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

void vring_enable(struct vu_conn *c, const struct vu_device *d, struct vring *q)
{
    if (!(d->acked & (1ull << VHOST_USER_F_PROTOCOL_FEATURES)))
        return;
    struct vu_vring_state st = { .index = q->index, .num = 1 };
    vu_set(c, VU_SET_VRING_ENABLE, &st, sizeof(st), NULL, 0);
}

void vring_publish(struct vring *q, bool event_idx)
{
    if (q->avail_idx == q->published_idx)
        return;
    uint16_t old = q->published_idx;
    __atomic_store_n((uint16_t *)&q->avail[1], q->avail_idx, __ATOMIC_RELEASE);
    q->published_idx = q->avail_idx;
    /* The idx store must be visible before we read the device's suppression state. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t avail_event = *(volatile uint16_t *)(q->used + 4 + 8u * q->num);
    uint16_t used_flags = *(volatile uint16_t *)(q->used);
    bool kick = event_idx ? vring_need_event(avail_event, q->avail_idx, old) : !(used_flags & VRING_USED_F_NO_NOTIFY);
    if (kick) {
        uint64_t one = 1;
        if (write(q->kick_fd, &one, sizeof(one)) != sizeof(one))
            die_errno("write kick eventfd");
        q->kicks++;
    }
}

void vring_check_base(struct vu_conn *c, struct vring *q)
{
    struct vu_vring_state st = { .index = q->index, .num = 0 };
    vu_send(c, VU_GET_VRING_BASE, 0, &st, sizeof(st), NULL, 0);
    struct vu_vring_state rep;
    if (vu_recv_reply(c, VU_GET_VRING_BASE, &rep, sizeof(rep)) != sizeof(rep))
        die(EXIT_BACKEND, "GET_VRING_BASE reply is not a vring state");
    if (rep.index != q->index)
        die(EXIT_BACKEND, "GET_VRING_BASE for queue %u answered for queue %u", q->index, rep.index);
    if (rep.num != q->avail_idx)
        die(EXIT_BACKEND, "queue %u stopped at avail index %u, but all %u made available were completed", q->index,
            rep.num, q->avail_idx);
}

void drain_eventfd(int fd)
{
    uint64_t cnt;
    if (read(fd, &cnt, sizeof(cnt)) < 0 && errno != EAGAIN)
        die_errno("read call eventfd");
}
