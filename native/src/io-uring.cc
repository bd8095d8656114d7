// createIoUring(entries): an io_uring whose completions signal a registered eventfd.
//
// Requests come in IoBatch form (parallel typed arrays, see native/index.ts). READV/WRITEV iovecs are
// built in a vector owned by the SQE slot they are queued in: the kernel copies them once it consumes
// the SQE (IORING_FEAT_SUBMIT_STABLE), and liburing hands a slot out again only after the kernel has
// consumed it, so the storage of a request that stays in the SQ (io_uring_enter failing with EAGAIN
// or EBUSY) is never overwritten before it is submitted.
#include <liburing.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <climits>

#include "common.h"
#include "io-batch.h"

namespace vhostd {
namespace {

constexpr uint8_t kOpReadv = IORING_OP_READV;
constexpr uint8_t kOpWritev = IORING_OP_WRITEV;
constexpr uint8_t kOpFsync = IORING_OP_FSYNC;
constexpr uint8_t kOpFallocate = IORING_OP_FALLOCATE;
static_assert(kOpReadv == 1 && kOpWritev == 2 && kOpFsync == 3 && kOpFallocate == 17,
              "opcodes must match IORING_OP in native/io-batch.ts");
static_assert(IORING_FSYNC_DATASYNC == 1, "must match IORING_FSYNC_DATASYNC in native/io-batch.ts");

class Ring : public Napi::ObjectWrap<Ring> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "IoUring",
                       {InstanceMethod("submit", &Ring::Submit), InstanceMethod("bindBatch", &Ring::BindBatch),
                        InstanceMethod("submitBound", &Ring::SubmitBound), InstanceMethod("reap", &Ring::Reap),
                        InstanceMethod("close", &Ring::Close)});
  }

  explicit Ring(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Ring>(info) {}
  ~Ring() override { Teardown(); }

  /** Sets the ring up; returns false after throwing. */
  bool Open(Napi::Env env, unsigned entries) {
    io_uring_params params{};
    params.flags = IORING_SETUP_SUBMIT_ALL;  // a failing SQE must not hold back the rest of the batch
    int r = io_uring_queue_init_params(entries, &ring_, &params);
    if (r == -EINVAL) {
      params = io_uring_params{};
      r = io_uring_queue_init_params(entries, &ring_, &params);
    }
    if (r < 0) {
      ThrowErrno(env, "io_uring_setup", -r);
      return false;
    }
    if ((params.features & IORING_FEAT_SUBMIT_STABLE) == 0) {
      io_uring_queue_exit(&ring_);
      ThrowErrno(env, "io_uring_setup", EOPNOTSUPP);
      return false;
    }
    int fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0) {
      int err = errno;
      io_uring_queue_exit(&ring_);
      ThrowErrno(env, "eventfd", err);
      return false;
    }
    r = io_uring_register_eventfd(&ring_, fd);
    if (r < 0) {
      ::close(fd);
      io_uring_queue_exit(&ring_);
      ThrowErrno(env, "io_uring_register", -r);
      return false;
    }
    eventFd_ = fd;
    open_ = true;
    slotIovecs_.resize(*ring_.sq.kring_entries);
    // Single-buffer READV/WRITEV go out as READ/WRITE when the kernel has them (5.6+): the kernel then
    // has no iovec to import, nor to copy into async data when it punts the request to a worker.
    if (io_uring_probe* probe = io_uring_get_probe_ring(&ring_)) {
      plainRw_ = io_uring_opcode_supported(probe, IORING_OP_READ) && io_uring_opcode_supported(probe, IORING_OP_WRITE);
      io_uring_free_probe(probe);
    }
    return true;
  }

  int EventFd() const { return eventFd_; }
  int RingFd() const { return ring_.ring_fd; }

 private:
  void Teardown() {
    if (!open_) return;
    open_ = false;
    io_uring_unregister_eventfd(&ring_);
    io_uring_queue_exit(&ring_);
    ::close(eventFd_);
    slotIovecs_.clear();
    for (auto& ref : bound_) ref.Reset();
  }

  bool CheckOpen(Napi::Env env, const char* syscall) {
    if (open_) return true;
    ThrowErrno(env, syscall, EBADF);
    return false;
  }

  /**
   * io_uring_submit, retried on EINTR. EAGAIN/EBUSY leave the SQEs in the ring for the next submit
   * (their iovecs stay valid, see the file comment); other errors throw.
   */
  bool Flush(Napi::Env env) {
    for (;;) {
      int r = io_uring_submit(&ring_);
      if (r >= 0 || r == -EAGAIN || r == -EBUSY) return true;
      if (r == -EINTR) continue;
      ThrowErrno(env, "io_uring_enter", -r);
      return false;
    }
  }

  Napi::Value Submit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    ARG_OBJECT(object, 0);
    ARG_U32(count, 1);
    if (!CheckOpen(env, "io_uring_enter")) return {};
    Batch b;
    if (!ReadBatch(env, object, &b)) return {};
    return SubmitBatch(env, b, count);
  }

  /**
   * bindBatch(batch): remember the nine arrays of `batch` (type-checked here) so that submitBound
   * needs no property lookups. The ring holds references to the arrays, not to `batch`: assigning a
   * new array to a property of `batch` takes effect with the next bindBatch.
   */
  Napi::Value BindBatch(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    ARG_OBJECT(object, 0);
    if (!CheckOpen(env, "io_uring_enter")) return {};
    Napi::Value values[kBatchArrays];
    Batch b;
    if (!ReadBatch(env, object, &b, values)) return {};
    for (int k = 0; k < kBatchArrays; k++) bound_[k] = Napi::Persistent(values[k].As<Napi::Object>());
    return env.Undefined();
  }

  /** submitBound(count): submit(batch, count) for the batch given to bindBatch. */
  Napi::Value SubmitBound(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    ARG_U32(count, 0);
    if (!CheckOpen(env, "io_uring_enter")) return {};
    if (bound_[0].IsEmpty()) {
      ThrowType(env, "submitBound needs a batch from bindBatch");
      return {};
    }
    Batch b;
    if (!ReadBatch(env, bound_, &b)) return {};
    return SubmitBatch(env, b, count);
  }

  /** Validates requests 0..count-1 of `b`, queues them and submits with one io_uring_enter. */
  Napi::Value SubmitBatch(Napi::Env env, const Batch& b, uint32_t count) {
    if (count > b.requests) {
      ThrowRange(env, "count exceeds the batch arrays");
      return {};
    }
    for (size_t i = 0; i < count; i++) {
      if (!ValidateRequest(env, b, i)) return {};
    }
    uint32_t queued = 0;
    for (; queued < count; queued++) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (sqe == nullptr) {
        // SQ full: hand what is queued to the kernel, then try once more.
        if (!Flush(env)) return {};
        sqe = io_uring_get_sqe(&ring_);
        if (sqe == nullptr) break;
      }
      size_t i = queued;
      // SAFETY: every index below was validated by ValidateRequest against the typed array lengths.
      uint8_t op = b.opcode[i];
      int fd = b.fd[i];
      double offset = b.offset[i];
      uint32_t start = b.iovStart[i], n = b.iovCount[i];
      switch (op) {
        case kOpReadv:
        case kOpWritev: {
          uint64_t off = offset < 0 ? ~uint64_t{0} : static_cast<uint64_t>(offset);
          // SAFETY: iovBase holds addresses given by the caller (Mapping.address + offset); the kernel
          // checks them against the process's mappings and fails the request with EFAULT otherwise.
          if (n == 1 && plainRw_ && b.iovLen[start] <= static_cast<double>(INT_MAX)) {
            void* base = reinterpret_cast<void*>(static_cast<uintptr_t>(b.iovBase[start]));
            auto len = static_cast<unsigned>(b.iovLen[start]);
            if (op == kOpReadv) {
              io_uring_prep_read(sqe, fd, base, len, off);
            } else {
              io_uring_prep_write(sqe, fd, base, len, off);
            }
            break;
          }
          std::vector<iovec>& iovs = slotIovecs_[static_cast<size_t>(sqe - ring_.sq.sqes)];
          iovs.resize(n);
          for (uint32_t k = 0; k < n; k++) {
            iovs[k].iov_base = reinterpret_cast<void*>(static_cast<uintptr_t>(b.iovBase[start + k]));
            iovs[k].iov_len = static_cast<size_t>(b.iovLen[start + k]);
          }
          if (op == kOpReadv) {
            io_uring_prep_readv(sqe, fd, iovs.data(), n, off);
          } else {
            io_uring_prep_writev(sqe, fd, iovs.data(), n, off);
          }
          break;
        }
        case kOpFsync:
          io_uring_prep_fsync(sqe, fd, b.arg[i]);
          break;
        case kOpFallocate:
          io_uring_prep_fallocate(sqe, fd, static_cast<int>(b.arg[i]), static_cast<off_t>(offset),
                                  static_cast<off_t>(b.iovLen[start]));
          break;
      }
      // READV/WRITEV: the RWF flags of the request (ValidateRequest allowed only known ones).
      if (op == kOpReadv || op == kOpWritev) sqe->rw_flags = static_cast<__kernel_rwf_t>(b.arg[i]);
      io_uring_sqe_set_data64(sqe, b.userData[i]);
    }
    if (!Flush(env)) return {};
    return Napi::Number::New(env, queued);
  }

  Napi::Value Reap(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!CheckOpen(env, "io_uring_enter")) return {};
    void* userDataRaw = nullptr;
    void* resultRaw = nullptr;
    size_t userDataLength = 0, resultLength = 0;
    if (!ArgTypedArray(env, info[0], "userData", napi_uint32_array, &userDataRaw, &userDataLength) ||
        !ArgTypedArray(env, info[1], "result", napi_int32_array, &resultRaw, &resultLength)) {
      return {};
    }
    auto* userData = static_cast<uint32_t*>(userDataRaw);
    auto* result = static_cast<int32_t*>(resultRaw);
    size_t limit = std::min(userDataLength, resultLength);
    size_t count = 0;
    while (count < limit) {
      io_uring_cqe* cqe = nullptr;
      if (io_uring_peek_cqe(&ring_, &cqe) != 0 || cqe == nullptr) break;
      // SAFETY: count < limit, the length of both typed arrays.
      userData[count] = static_cast<uint32_t>(cqe->user_data);
      result[count] = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      count++;
    }
    return Napi::Number::New(env, static_cast<double>(count));
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    Teardown();
    return info.Env().Undefined();
  }

  io_uring ring_{};
  bool open_ = false;
  int eventFd_ = -1;
  /** IORING_OP_READ / WRITE are available. */
  bool plainRw_ = false;
  /** The arrays of the batch given to bindBatch, in Batch order. */
  Napi::ObjectReference bound_[kBatchArrays];
  /** iovecs of the READV/WRITEV request queued in each SQE slot. */
  std::vector<std::vector<iovec>> slotIovecs_;
};

Napi::Value CreateIoUring(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_U32(entries, 0);
  Napi::Object object = Data(env)->ioUringClass.New(std::vector<napi_value>{});
  if (env.IsExceptionPending()) return {};
  Ring* ring = Ring::Unwrap(object);
  if (!ring->Open(env, entries)) return {};
  object.DefineProperties({
      Napi::PropertyDescriptor::Value("eventFd", Napi::Number::New(env, ring->EventFd()), napi_enumerable),
      Napi::PropertyDescriptor::Value("ringFd", Napi::Number::New(env, ring->RingFd()), napi_enumerable),
  });
  if (env.IsExceptionPending()) return {};
  return object;
}

}  // namespace

void InitIoUring(Napi::Env env, Napi::Object exports) {
  Data(env)->ioUringClass = Napi::Persistent(Ring::Define(env));
  exports.Set("createIoUring", Napi::Function::New(env, CreateIoUring, "createIoUring"));
}

}  // namespace vhostd
