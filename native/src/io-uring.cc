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

namespace vhostd {
namespace {

constexpr uint8_t kOpReadv = IORING_OP_READV;
constexpr uint8_t kOpWritev = IORING_OP_WRITEV;
constexpr uint8_t kOpFsync = IORING_OP_FSYNC;
constexpr uint8_t kOpFallocate = IORING_OP_FALLOCATE;
static_assert(kOpReadv == 1 && kOpWritev == 2 && kOpFsync == 3 && kOpFallocate == 17,
              "opcodes must match IORING_OP in native/io-batch.ts");
static_assert(IORING_FSYNC_DATASYNC == 1, "must match IORING_FSYNC_DATASYNC in native/io-batch.ts");

/** The typed arrays of one IoBatch. */
struct Batch {
  uint8_t* opcode;
  int32_t* fd;
  double* offset;
  uint32_t* arg;
  uint32_t* iovStart;
  uint32_t* iovCount;
  uint32_t* userData;
  double* iovBase;
  double* iovLen;
  size_t requests;  // shortest of the per-request arrays
  size_t iovecs;    // shortest of iovBase / iovLen
};

/** The IoBatch properties in Batch order, with their typed array types. */
constexpr int kBatchArrays = 9;
constexpr const char* kBatchKeys[kBatchArrays] = {"opcode",   "fd",       "offset",  "arg",   "iovStart",
                                                  "iovCount", "userData", "iovBase", "iovLen"};
constexpr napi_typedarray_type kBatchTypes[kBatchArrays] = {
    napi_uint8_array,  napi_int32_array,  napi_float64_array, napi_uint32_array,  napi_uint32_array,
    napi_uint32_array, napi_uint32_array, napi_float64_array, napi_float64_array};

/** Points `batch` at the nine arrays (data and lengths from ArgTypedArray, in Batch order). */
void FillBatch(void* const p[kBatchArrays], const size_t n[kBatchArrays], Batch* batch) {
  batch->opcode = static_cast<uint8_t*>(p[0]);
  batch->fd = static_cast<int32_t*>(p[1]);
  batch->offset = static_cast<double*>(p[2]);
  batch->arg = static_cast<uint32_t*>(p[3]);
  batch->iovStart = static_cast<uint32_t*>(p[4]);
  batch->iovCount = static_cast<uint32_t*>(p[5]);
  batch->userData = static_cast<uint32_t*>(p[6]);
  batch->iovBase = static_cast<double*>(p[7]);
  batch->iovLen = static_cast<double*>(p[8]);
  batch->requests = n[0];
  for (int k = 1; k < 7; k++) batch->requests = std::min(batch->requests, n[k]);
  batch->iovecs = std::min(n[7], n[8]);
}

/** The nine typed arrays of the IoBatch `object` (type-checked), or false after throwing. */
bool GetBatchArrays(Napi::Env env, Napi::Object object, Napi::Value values[kBatchArrays], void* p[kBatchArrays],
                    size_t n[kBatchArrays]) {
  for (int k = 0; k < kBatchArrays; k++) {
    values[k] = object.Get(kBatchKeys[k]);
    if (env.IsExceptionPending()) return false;
    if (!ArgTypedArray(env, values[k], kBatchKeys[k], kBatchTypes[k], &p[k], &n[k])) return false;
  }
  return true;
}

/** Checks request `i` so that nothing is queued from a batch with a bad request. */
bool ValidateRequest(Napi::Env env, const Batch& b, size_t i) {
  // The prefix of an error message (built only when one is thrown: no allocation per request).
  auto where = [i] { return "request " + std::to_string(i) + ": "; };
  // SAFETY: i < b.requests, the length of every per-request array (checked by the caller).
  uint8_t op = b.opcode[i];
  double offset = b.offset[i];
  uint64_t start = b.iovStart[i], count = b.iovCount[i];
  switch (op) {
    case kOpReadv:
    case kOpWritev:
      if (!IsIntegerIn(offset, -1, 9223372036854774784.0)) {
        ThrowRange(env, where() + "offset must be an integer >= -1");
        return false;
      }
      if (count > IOV_MAX || start + count > b.iovecs) {
        ThrowRange(env, where() + "iovecs out of range");
        return false;
      }
      if (!IovecsValid(b.iovBase, b.iovLen, start, count)) {
        ThrowRange(env, where() + "iovBase/iovLen must be non-negative integers below 2^53");
        return false;
      }
      return true;
    case kOpFsync:
      return true;
    case kOpFallocate:
      // SAFETY: start < b.iovecs is checked before iovLen[start] is read.
      if (!IsIntegerIn(offset, 0, kMaxSafeInteger) || start >= b.iovecs ||
          !IsIntegerIn(b.iovLen[start], 0, kMaxSafeInteger)) {
        ThrowRange(env, where() + "fallocate needs offset >= 0 and a length in iovLen[iovStart]");
        return false;
      }
      return true;
    default:
      ThrowRange(env, where() + "unsupported opcode " + std::to_string(op));
      return false;
  }
}

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
    Napi::Value values[kBatchArrays];
    void* p[kBatchArrays];
    size_t n[kBatchArrays];
    if (!GetBatchArrays(env, object, values, p, n)) return {};
    Batch b;
    FillBatch(p, n, &b);
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
    void* p[kBatchArrays];
    size_t n[kBatchArrays];
    if (!GetBatchArrays(env, object, values, p, n)) return {};
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
    // Data pointers and lengths are read afresh on every call (a detached buffer reads as length 0).
    void* p[kBatchArrays];
    size_t n[kBatchArrays];
    for (int k = 0; k < kBatchArrays; k++) {
      if (!ArgTypedArray(env, bound_[k].Value(), kBatchKeys[k], kBatchTypes[k], &p[k], &n[k])) return {};
    }
    Batch b;
    FillBatch(p, n, &b);
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
