// Files and block devices: fallocate, sizes, and the thread-pool preadv/pwritev fallback.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <memory>

#include "common.h"

namespace vhostd {
namespace {

Napi::Value Fallocate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  ARG_I32(mode, 1);
  ARG_U64(offset, 2);
  ARG_U64(length, 3);
  int r;
  do {
    r = ::fallocate(fd, mode, static_cast<off_t>(offset), static_cast<off_t>(length));
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    ThrowErrno(env, "fallocate", errno);
    return {};
  }
  return env.Undefined();
}

Napi::Value DeviceSize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  struct stat st;
  if (::fstat(fd, &st) < 0) {
    ThrowErrno(env, "fstat", errno);
    return {};
  }
  if (S_ISBLK(st.st_mode)) {
    uint64_t size = 0;
    if (::ioctl(fd, BLKGETSIZE64, &size) < 0) {
      ThrowErrno(env, "ioctl", errno);
      return {};
    }
    return Napi::Number::New(env, static_cast<double>(size));
  }
  return Napi::Number::New(env, static_cast<double>(st.st_size));
}

Napi::Value LogicalBlockSize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  struct stat st;
  if (::fstat(fd, &st) < 0) {
    ThrowErrno(env, "fstat", errno);
    return {};
  }
  if (!S_ISBLK(st.st_mode)) return Napi::Number::New(env, 0);
  int size = 0;
  if (::ioctl(fd, BLKSSZGET, &size) < 0) {
    ThrowErrno(env, "ioctl", errno);
    return {};
  }
  return Napi::Number::New(env, size);
}

/** One ioAsync call, from the JS thread to the thread pool and back. */
struct IoRequest {
  napi_async_work work = nullptr;
  napi_ref callback = nullptr;
  bool write = false;
  int fd = -1;
  off_t offset = 0;
  std::vector<iovec> iovecs;  // copied at call time
  ssize_t result = 0;
};

void ExecuteIo(napi_env, void* data) {
  auto* request = static_cast<IoRequest*>(data);
  ssize_t n;
  int count = static_cast<int>(request->iovecs.size());
  const iovec* iov = request->iovecs.data();
  do {
    // SAFETY: the iovecs hold caller-given addresses (mapped guest or memfd memory); the kernel checks
    // them against the process's mappings and fails with EFAULT otherwise.
    if (request->offset < 0) {  // the current position (sockets, TAP, pipes)
      n = request->write ? ::writev(request->fd, iov, count) : ::readv(request->fd, iov, count);
    } else {
      n = request->write ? ::pwritev(request->fd, iov, count, request->offset)
                         : ::preadv(request->fd, iov, count, request->offset);
    }
  } while (n < 0 && errno == EINTR);
  request->result = n < 0 ? -errno : n;
}

void CompleteIo(napi_env env, napi_status status, void* data) {
  std::unique_ptr<IoRequest> request(static_cast<IoRequest*>(data));
  double result = status == napi_cancelled ? -ECANCELED : static_cast<double>(request->result);
  napi_value callback = nullptr, receiver = nullptr, argument = nullptr;
  bool ready = napi_get_reference_value(env, request->callback, &callback) == napi_ok && callback != nullptr &&
               napi_get_undefined(env, &receiver) == napi_ok && napi_create_double(env, result, &argument) == napi_ok;
  napi_delete_reference(env, request->callback);
  napi_delete_async_work(env, request->work);
  request.reset();
  // Node reports an exception thrown here as uncaught (async work completions run in a callback scope).
  if (ready) napi_call_function(env, receiver, callback, 1, &argument, nullptr);
}

Napi::Value IoAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_BOOL(write, 0);
  ARG_FD(fd, 1);
  double offset = 0;  // -1: the current position (readv/writev)
  if (!ArgInteger(info, 2, "offset", -1, kMaxSafeInteger, &offset)) return {};
  void* baseRaw = nullptr;
  void* lenRaw = nullptr;
  size_t baseCount = 0, lenCount = 0;
  if (!ArgTypedArray(env, info[3], "iovBase", napi_float64_array, &baseRaw, &baseCount) ||
      !ArgTypedArray(env, info[4], "iovLen", napi_float64_array, &lenRaw, &lenCount)) {
    return {};
  }
  ARG_FUNCTION(callback, 5);
  if (baseCount != lenCount) {
    ThrowRange(env, "iovBase and iovLen must have the same length");
    return {};
  }
  const auto* bases = static_cast<const double*>(baseRaw);
  const auto* lengths = static_cast<const double*>(lenRaw);
  if (!IovecsValid(bases, lengths, 0, baseCount)) {
    ThrowRange(env, "iovBase/iovLen must be non-negative integers below 2^53");
    return {};
  }
  auto request = std::make_unique<IoRequest>();
  request->write = write;
  request->fd = fd;
  request->offset = static_cast<off_t>(offset);
  request->iovecs.resize(baseCount);
  for (size_t k = 0; k < baseCount; k++) {
    // SAFETY: k < baseCount == lenCount, the length of both Float64Arrays.
    request->iovecs[k].iov_base = reinterpret_cast<void*>(static_cast<uintptr_t>(bases[k]));
    request->iovecs[k].iov_len = static_cast<size_t>(lengths[k]);
  }

  napi_value resourceName = Napi::String::New(env, write ? "vhostd:pwritev" : "vhostd:preadv");
  if (napi_create_reference(env, callback, 1, &request->callback) != napi_ok) return {};
  if (napi_create_async_work(env, nullptr, resourceName, ExecuteIo, CompleteIo, request.get(), &request->work) !=
      napi_ok) {
    napi_delete_reference(env, request->callback);
    return {};
  }
  if (napi_queue_async_work(env, request->work) != napi_ok) {
    napi_delete_async_work(env, request->work);
    napi_delete_reference(env, request->callback);
    return {};
  }
  request.release();  // owned by the async work until CompleteIo
  return env.Undefined();
}

}  // namespace

void InitFile(Napi::Env env, Napi::Object exports) {
  exports.Set("fallocate", Napi::Function::New(env, Fallocate, "fallocate"));
  exports.Set("deviceSize", Napi::Function::New(env, DeviceSize, "deviceSize"));
  exports.Set("logicalBlockSize", Napi::Function::New(env, LogicalBlockSize, "logicalBlockSize"));
  exports.Set("ioAsync", Napi::Function::New(env, IoAsync, "ioAsync"));
}

}  // namespace vhostd
