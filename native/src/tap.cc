// TAP devices (linux/if_tun.h): open and configure queues, and move frames with readv/writev, or
// write them with io_uring (one io_uring_enter for a batch of frames instead of a writev each).
//
// Policy (which flags, which offloads, what a short frame means) belongs to the caller; this file
// only makes the calls. Frame I/O never uses a file offset: a TAP queue is a character device.
#include <fcntl.h>
#include <liburing.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

#include "common.h"

namespace vhostd {
namespace {

/** Fills `ifr` with `name` (empty: the kernel picks one); false after throwing if it does not fit. */
bool InterfaceRequest(Napi::Env env, const std::string& name, ifreq* ifr) {
  std::memset(ifr, 0, sizeof(*ifr));
  if (name.size() >= IFNAMSIZ || name.find('\0') != std::string::npos) {
    ThrowRange(env, "name must be shorter than " + std::to_string(IFNAMSIZ) + " bytes");
    return false;
  }
  std::memcpy(ifr->ifr_name, name.data(), name.size());
  return true;
}

/** Name of an ifreq, which the kernel NUL-terminates within IFNAMSIZ. */
Napi::String InterfaceName(Napi::Env env, const ifreq& ifr) {
  return Napi::String::New(env, ifr.ifr_name, strnlen(ifr.ifr_name, IFNAMSIZ));
}

/** tapOpen(name, flags): open /dev/net/tun (nonblocking, cloexec) and TUNSETIFF. */
Napi::Value TapOpen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_STRING(name, 0);
  ARG_U32(flags, 1);
  ifreq ifr;
  if (!InterfaceRequest(env, name, &ifr)) return {};
  if (flags > 0xffff) {  // ifr_flags is a short
    ThrowRange(env, "flags must fit in 16 bits");
    return {};
  }
  ifr.ifr_flags = static_cast<short>(flags);
  int fd = ::open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    ThrowErrno(env, "open", errno);
    return {};
  }
  if (::ioctl(fd, TUNSETIFF, &ifr) < 0) {
    int err = errno;
    ::close(fd);
    ThrowErrno(env, "ioctl(TUNSETIFF)", err);
    return {};
  }
  Napi::Object result = Napi::Object::New(env);
  result.Set("fd", Napi::Number::New(env, fd));
  result.Set("name", InterfaceName(env, ifr));
  return result;
}

/** tapSetQueue(fd, flags): TUNSETQUEUE with IFF_ATTACH_QUEUE or IFF_DETACH_QUEUE. */
Napi::Value TapSetQueue(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  ARG_U32(flags, 1);
  ifreq ifr;
  std::memset(&ifr, 0, sizeof(ifr));
  if (flags > 0xffff) {
    ThrowRange(env, "flags must fit in 16 bits");
    return {};
  }
  ifr.ifr_flags = static_cast<short>(flags);
  if (::ioctl(fd, TUNSETQUEUE, &ifr) < 0) {
    ThrowErrno(env, "ioctl(TUNSETQUEUE)", errno);
    return {};
  }
  return env.Undefined();
}

/** tapSetOffload(fd, offloads): TUNSETOFFLOAD; EINVAL means an offload the kernel does not know. */
Napi::Value TapSetOffload(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  ARG_U32(offloads, 1);
  if (::ioctl(fd, TUNSETOFFLOAD, static_cast<unsigned long>(offloads)) < 0) {
    ThrowErrno(env, "ioctl(TUNSETOFFLOAD)", errno);
    return {};
  }
  return env.Undefined();
}

/** tapSetVnetHdrSize(fd, size): TUNSETVNETHDRSZ. */
Napi::Value TapSetVnetHdrSize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  ARG_I32(size, 1);
  if (::ioctl(fd, TUNSETVNETHDRSZ, &size) < 0) {
    ThrowErrno(env, "ioctl(TUNSETVNETHDRSZ)", errno);
    return {};
  }
  return env.Undefined();
}

/** tapGetIff(fd): TUNGETIFF, the interface name and its IFF_* flags. */
Napi::Value TapGetIff(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  ifreq ifr;
  std::memset(&ifr, 0, sizeof(ifr));
  if (::ioctl(fd, TUNGETIFF, &ifr) < 0) {
    ThrowErrno(env, "ioctl(TUNGETIFF)", errno);
    return {};
  }
  Napi::Object result = Napi::Object::New(env);
  result.Set("name", InterfaceName(env, ifr));
  result.Set("flags", Napi::Number::New(env, static_cast<uint16_t>(ifr.ifr_flags)));
  return result;
}

/** The arrays of a frame batch, checked so that every index the transfer uses is inside them. */
struct FrameBatch {
  const double* iovBase = nullptr;
  const double* iovLen = nullptr;
  const uint32_t* iovStart = nullptr;
  const uint32_t* iovCount = nullptr;
  int32_t* result = nullptr;
  size_t frames = 0;
  /** Length of iovBase and iovLen. */
  size_t iovecs = 0;
};

/** Frame `i`'s iovecs, from the batch's arrays (validated by ArgFrameBatch) into `out`. */
void FrameIovecs(const FrameBatch& b, size_t i, iovec* out) {
  // SAFETY: ArgFrameBatch checked iovStart[i] + iovCount[i] <= the iovec arrays' length.
  uint32_t start = b.iovStart[i], count = b.iovCount[i];
  for (uint32_t k = 0; k < count; k++) {
    out[k].iov_base = reinterpret_cast<void*>(static_cast<uintptr_t>(b.iovBase[start + k]));
    out[k].iov_len = static_cast<size_t>(b.iovLen[start + k]);
  }
}

/** A transfer's byte count or -errno as a result entry; a TAP frame is at most 64 KiB plus headers. */
int32_t FrameResult(ssize_t r) { return static_cast<int32_t>(r > INT32_MAX ? INT32_MAX : r); }

/**
 * Reads (iovBase, iovLen, iovStart, iovCount, result, count) from argument `first` on and validates
 * every frame first.
 */
bool ArgFrameBatch(const Napi::CallbackInfo& info, size_t first, FrameBatch* b) {
  Napi::Env env = info.Env();
  void* p[5] = {};
  size_t n[5] = {};
  if (!ArgTypedArray(env, info[first], "iovBase", napi_float64_array, &p[0], &n[0]) ||
      !ArgTypedArray(env, info[first + 1], "iovLen", napi_float64_array, &p[1], &n[1]) ||
      !ArgTypedArray(env, info[first + 2], "iovStart", napi_uint32_array, &p[2], &n[2]) ||
      !ArgTypedArray(env, info[first + 3], "iovCount", napi_uint32_array, &p[3], &n[3]) ||
      !ArgTypedArray(env, info[first + 4], "result", napi_int32_array, &p[4], &n[4])) {
    return false;
  }
  if (!ArgInt<size_t>(info, first + 5, "count", 0, 4294967295.0, &b->frames)) return false;
  if (n[0] != n[1]) {
    ThrowRange(env, "iovBase and iovLen must have the same length");
    return false;
  }
  if (b->frames > n[2] || b->frames > n[3] || b->frames > n[4]) {
    ThrowRange(env, "count exceeds iovStart, iovCount or result");
    return false;
  }
  b->iovBase = static_cast<const double*>(p[0]);
  b->iovLen = static_cast<const double*>(p[1]);
  b->iovStart = static_cast<const uint32_t*>(p[2]);
  b->iovCount = static_cast<const uint32_t*>(p[3]);
  b->result = static_cast<int32_t*>(p[4]);
  b->iovecs = n[0];
  for (size_t i = 0; i < b->frames; i++) {
    // SAFETY: i < frames <= the lengths of iovStart and iovCount (checked above).
    uint64_t start = b->iovStart[i], count = b->iovCount[i];
    if (count > IOV_MAX || start + count > n[0]) {
      ThrowRange(env, "frame " + std::to_string(i) + ": iovecs out of range");
      return false;
    }
    if (!IovecsValid(b->iovBase, b->iovLen, start, count)) {
      ThrowRange(env, "frame " + std::to_string(i) + ": iovBase/iovLen must be non-negative integers below 2^53");
      return false;
    }
  }
  return true;
}

/**
 * One readv/writev per frame at the fd's current position (no offset). result[i] gets the bytes moved
 * or -errno; the batch stops at the first EAGAIN. Returns how many frames have a result.
 */
Napi::Value TransferFrames(const Napi::CallbackInfo& info, bool write) {
  ARG_FD(fd, 0);
  FrameBatch b;
  if (!ArgFrameBatch(info, 1, &b)) return {};
  iovec iovs[IOV_MAX];
  size_t done = 0;
  for (; done < b.frames; done++) {
    FrameIovecs(b, done, iovs);
    int count = static_cast<int>(b.iovCount[done]);
    ssize_t r;
    do {
      // SAFETY: the iovecs hold caller-given addresses (mapped guest memory); the kernel checks them
      // against the process's mappings and fails with EFAULT otherwise.
      r = write ? ::writev(fd, iovs, count) : ::readv(fd, iovs, count);
    } while (r < 0 && errno == EINTR);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    b.result[done] = r < 0 ? -errno : FrameResult(r);
  }
  return Napi::Number::New(info.Env(), static_cast<double>(done));
}

Napi::Value ReadFrames(const Napi::CallbackInfo& info) { return TransferFrames(info, false); }
Napi::Value WriteFrames(const Napi::CallbackInfo& info) { return TransferFrames(info, true); }

/**
 * An io_uring that writes frame batches to one TAP fd (registered with the ring, so the kernel skips
 * the fd lookup per frame). Every frame is an IORING_OP_WRITEV with RWF_NOWAIT: the tun driver
 * (FMODE_NOWAIT) completes it inline during io_uring_enter, and a full TAP fails it with EAGAIN
 * instead of arming a poll; the call waits for every completion, so nothing is in flight between
 * calls and guest memory is never read after it returns.
 */
class TapWriter : public Napi::ObjectWrap<TapWriter> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "TapWriter",
                       {InstanceMethod("writeFrames", &TapWriter::WriteFrames), InstanceMethod("close", &TapWriter::Close)});
  }

  explicit TapWriter(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TapWriter>(info) {}
  ~TapWriter() override { Teardown(); }

  /** Sets the ring up for `fd`; returns false after throwing. */
  bool Open(Napi::Env env, int fd, unsigned entries) {
    io_uring_params params{};
    // A failing frame must not hold back the rest; one thread submits (a hint the kernel may refuse).
    params.flags = IORING_SETUP_SUBMIT_ALL | IORING_SETUP_SINGLE_ISSUER;
    int r = io_uring_queue_init_params(entries, &ring_, &params);
    if (r == -EINVAL) {
      params = io_uring_params{};
      params.flags = IORING_SETUP_SUBMIT_ALL;
      r = io_uring_queue_init_params(entries, &ring_, &params);
    }
    if (r < 0) {
      ThrowErrno(env, "io_uring_setup", -r);
      return false;
    }
    r = io_uring_register_files(&ring_, &fd, 1);
    if (r < 0) {
      io_uring_queue_exit(&ring_);
      ThrowErrno(env, "io_uring_register", -r);
      return false;
    }
    entries_ = *ring_.sq.kring_entries;
    open_ = true;
    return true;
  }

 private:
  void Teardown() {
    if (!open_) return;
    open_ = false;
    // Drop the ring's reference to the TAP queue now: io_uring_queue_exit alone leaves it to the
    // kernel's deferred ring teardown, and until then a closed queue stays attached to the TAP and the
    // kernel steers received frames to it, where nobody reads them.
    io_uring_unregister_files(&ring_);
    io_uring_queue_exit(&ring_);
  }

  /**
   * writeFrames(iovBase, iovLen, iovStart, iovCount, result, count): one WRITEV per frame, as many per
   * io_uring_enter as the ring holds. result[i] gets the frame's bytes or -errno (EAGAIN: the TAP was
   * full, the frame was not sent; frames after it may have been). Returns count. A failing
   * io_uring_enter closes the writer and throws (which frames were sent is then unknown).
   */
  Napi::Value WriteFrames(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!open_) {
      ThrowErrno(env, "io_uring_enter", EBADF);
      return {};
    }
    FrameBatch b;
    if (!ArgFrameBatch(info, 0, &b)) return {};
    if (iovs_.size() < b.iovecs) iovs_.resize(b.iovecs);  // grows once to the caller's array length
    for (size_t first = 0; first < b.frames;) {
      size_t n = std::min<size_t>(b.frames - first, entries_);
      for (size_t i = first; i < first + n; i++) {
        // The ring was empty before this loop and holds `entries_` SQEs, so there is always one.
        io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
        iovec* iovs = iovs_.data() + b.iovStart[i];
        FrameIovecs(b, i, iovs);
        // SAFETY: the iovecs hold caller-given addresses (mapped guest memory); the kernel checks them
        // against the process's mappings and fails the frame with EFAULT otherwise.
        io_uring_prep_writev(sqe, 0, iovs, b.iovCount[i], 0);
        sqe->flags |= IOSQE_FIXED_FILE;
        sqe->rw_flags = RWF_NOWAIT;
        io_uring_sqe_set_data64(sqe, i);
      }
      int r;
      do {
        r = io_uring_submit_and_wait(&ring_, static_cast<unsigned>(n));
      } while (r == -EINTR);
      for (size_t seen = 0; r >= 0 && seen < n;) {
        io_uring_cqe* cqe = nullptr;
        r = io_uring_wait_cqe(&ring_, &cqe);
        if (r == -EINTR) {
          r = 0;
          continue;
        }
        if (r < 0) break;
        // Only this loop's SQEs are in the ring: user_data is a frame index below b.frames.
        if (cqe->user_data < b.frames) b.result[cqe->user_data] = cqe->res < 0 ? cqe->res : FrameResult(cqe->res);
        io_uring_cqe_seen(&ring_, cqe);
        seen++;
      }
      if (r < 0) {
        // SQEs or completions of this batch may be left in the ring, pointing at the caller's memory:
        // the ring is closed so that nothing of it can run later.
        Teardown();
        ThrowErrno(env, "io_uring_enter", -r);
        return {};
      }
      first += n;
    }
    return Napi::Number::New(env, static_cast<double>(b.frames));
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    Teardown();
    return info.Env().Undefined();
  }

  io_uring ring_{};
  bool open_ = false;
  unsigned entries_ = 0;
  /** The iovecs of the batch being written, at the same indexes as the caller's arrays. */
  std::vector<iovec> iovs_;
};

/** createTapWriter(fd, entries): a {@link TapWriter} for the TAP queue `fd`. */
Napi::Value CreateTapWriter(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  ARG_U32(entries, 1);
  Napi::Object object = Data(env)->tapWriterClass.New(std::vector<napi_value>{});
  if (env.IsExceptionPending()) return {};
  if (!TapWriter::Unwrap(object)->Open(env, fd, entries)) return {};
  return object;
}

}  // namespace

void InitTap(Napi::Env env, Napi::Object exports) {
  exports.Set("tapOpen", Napi::Function::New(env, TapOpen, "tapOpen"));
  exports.Set("tapSetQueue", Napi::Function::New(env, TapSetQueue, "tapSetQueue"));
  exports.Set("tapSetOffload", Napi::Function::New(env, TapSetOffload, "tapSetOffload"));
  exports.Set("tapSetVnetHdrSize", Napi::Function::New(env, TapSetVnetHdrSize, "tapSetVnetHdrSize"));
  exports.Set("tapGetIff", Napi::Function::New(env, TapGetIff, "tapGetIff"));
  exports.Set("readFrames", Napi::Function::New(env, ReadFrames, "readFrames"));
  exports.Set("writeFrames", Napi::Function::New(env, WriteFrames, "writeFrames"));
  Data(env)->tapWriterClass = Napi::Persistent(TapWriter::Define(env));
  exports.Set("createTapWriter", Napi::Function::New(env, CreateTapWriter, "createTapWriter"));
}

}  // namespace vhostd
