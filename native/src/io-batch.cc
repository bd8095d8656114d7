// The IoBatch arrays and checks (io-batch.h), and the inline datapath calls:
// - transferBatch(batch, count, result): preadv2/pwritev2 of READV/WRITEV requests 0..count-1 of an
//   IoBatch on the calling thread, straight between the file and the iovecs' memory (guest pages: no
//   copy), one N-API call per batch. `arg` carries each request's RWF flags (RWF_NOWAIT: fail with
//   EAGAIN instead of waiting for the disk). `result[i]` gets bytes or -errno; nothing is retried but
//   EINTR, short transfers included: what to do with them is the caller's policy.
// - fstatfs(fd): the file system's f_type, to tell memory file systems from disks.
#include "io-batch.h"

#include <linux/fs.h>
#include <sys/statfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <string>

#include "common.h"

namespace vhostd {

namespace {

/** The IoBatch properties in Batch order, with their typed array types. */
const char* const kBatchKeys[kBatchArrays] = {"opcode",   "fd",       "offset",  "arg",   "iovStart",
                                              "iovCount", "userData", "iovBase", "iovLen"};
const napi_typedarray_type kBatchTypes[kBatchArrays] = {
    napi_uint8_array,  napi_int32_array,  napi_float64_array, napi_uint32_array,  napi_uint32_array,
    napi_uint32_array, napi_uint32_array, napi_float64_array, napi_float64_array};

// Opcode values of native/io-batch.ts IORING_OP (io-uring.cc static_asserts them against liburing).
constexpr uint8_t kOpReadv = 1;
constexpr uint8_t kOpWritev = 2;
constexpr uint8_t kOpFsync = 3;
constexpr uint8_t kOpFallocate = 17;

/** RWF flags a READV/WRITEV may carry in `arg` (native/io-batch.ts RWF_NOWAIT). */
constexpr uint32_t kRwFlags = RWF_NOWAIT;
static_assert(RWF_NOWAIT == 8, "must match RWF_NOWAIT in native/io-batch.ts");

/**
 * The one reading of a batch: `array(k)` gives its k-th array in Batch order (a property lookup
 * may throw), each is type-checked before the next is asked for, then `batch` points at them.
 */
template <typename ArrayAt>
bool ReadBatchArrays(Napi::Env env, ArrayAt array, Batch* batch) {
  void* p[kBatchArrays];
  size_t n[kBatchArrays];
  for (int k = 0; k < kBatchArrays; k++) {
    Napi::Value value = array(k);
    if (env.IsExceptionPending()) return false;
    if (!ArgTypedArray(env, value, kBatchKeys[k], kBatchTypes[k], &p[k], &n[k])) return false;
  }
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
  return true;
}

}  // namespace

bool ReadBatch(Napi::Env env, Napi::Object object, Batch* batch, Napi::Value* arrays) {
  return ReadBatchArrays(
      env,
      [&](int k) {
        Napi::Value value = object.Get(kBatchKeys[k]);
        if (arrays != nullptr) arrays[k] = value;
        return value;
      },
      batch);
}

bool ReadBatch(Napi::Env env, const Napi::ObjectReference arrays[kBatchArrays], Batch* batch) {
  return ReadBatchArrays(env, [&](int k) -> Napi::Value { return arrays[k].Value(); }, batch);
}

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
      if ((b.arg[i] & ~kRwFlags) != 0) {
        ThrowRange(env, where() + "unsupported read/write flags " + std::to_string(b.arg[i]));
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

namespace {

Napi::Value TransferBatch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_OBJECT(object, 0);
  ARG_U32(count, 1);
  void* resultRaw = nullptr;
  size_t resultLength = 0;
  if (!ArgTypedArray(env, info[2], "result", napi_int32_array, &resultRaw, &resultLength)) return {};
  Batch b;
  if (!ReadBatch(env, object, &b)) return {};
  if (count > b.requests || count > resultLength) {
    ThrowRange(env, "count exceeds the batch or result arrays");
    return {};
  }
  // Everything is checked before the first transfer: a bad batch moves no byte.
  for (size_t i = 0; i < count; i++) {
    if (!ValidateRequest(env, b, i)) return {};
    if (b.opcode[i] != kOpReadv && b.opcode[i] != kOpWritev) {
      ThrowRange(env, "request " + std::to_string(i) + ": transferBatch runs only READV and WRITEV");
      return {};
    }
  }
  auto* result = static_cast<int32_t*>(resultRaw);
  iovec iovs[IOV_MAX];
  for (size_t i = 0; i < count; i++) {
    // SAFETY: ValidateRequest checked iovStart + iovCount <= b.iovecs and iovCount <= IOV_MAX.
    uint32_t start = b.iovStart[i], iovCount = b.iovCount[i];
    for (uint32_t k = 0; k < iovCount; k++) {
      // SAFETY: the addresses are the caller's (Mapping.address + offset); the kernel checks them
      // against the process's mappings and fails the request with EFAULT otherwise.
      iovs[k].iov_base = reinterpret_cast<void*>(static_cast<uintptr_t>(b.iovBase[start + k]));
      iovs[k].iov_len = static_cast<size_t>(b.iovLen[start + k]);
    }
    off_t offset = static_cast<off_t>(b.offset[i]);  // -1: the current position (preadv2's own rule)
    int flags = static_cast<int>(b.arg[i]);
    ssize_t r;
    do {
      r = b.opcode[i] == kOpReadv ? ::preadv2(b.fd[i], iovs, static_cast<int>(iovCount), offset, flags)
                                  : ::pwritev2(b.fd[i], iovs, static_cast<int>(iovCount), offset, flags);
    } while (r < 0 && errno == EINTR);
    // The kernel moves at most MAX_RW_COUNT (INT_MAX rounded down to a page) bytes per call.
    result[i] = r < 0 ? -errno : static_cast<int32_t>(std::min<ssize_t>(r, INT_MAX));
  }
  return env.Undefined();
}

Napi::Value Fstatfs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  struct statfs st;
  int r;
  do {
    r = ::fstatfs(fd, &st);
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    ThrowErrno(env, "fstatfs", errno);
    return {};
  }
  // f_type is a magic number (linux/magic.h) below 2^32.
  return Napi::Number::New(env, static_cast<double>(static_cast<uint32_t>(st.f_type)));
}

}  // namespace

void InitIoBatch(Napi::Env env, Napi::Object exports) {
  exports.Set("transferBatch", Napi::Function::New(env, TransferBatch, "transferBatch"));
  exports.Set("fstatfs", Napi::Function::New(env, Fstatfs, "fstatfs"));
}

}  // namespace vhostd
