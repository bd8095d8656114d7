// TAP devices (linux/if_tun.h): open and configure queues, and move frames with readv/writev.
//
// Policy (which flags, which offloads, what a short frame means) belongs to the caller; this file
// only makes the calls. Frame I/O never uses a file offset: a TAP queue is a character device.
#include <fcntl.h>
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
};

/** Reads (fd, iovBase, iovLen, iovStart, iovCount, result, count) and validates every frame first. */
bool ArgFrameBatch(const Napi::CallbackInfo& info, int* fd, FrameBatch* b) {
  Napi::Env env = info.Env();
  if (!ArgInt<int>(info, 0, "fd", 0, 2147483647.0, fd)) return false;
  void* p[5] = {};
  size_t n[5] = {};
  if (!ArgTypedArray(env, info[1], "iovBase", napi_float64_array, &p[0], &n[0]) ||
      !ArgTypedArray(env, info[2], "iovLen", napi_float64_array, &p[1], &n[1]) ||
      !ArgTypedArray(env, info[3], "iovStart", napi_uint32_array, &p[2], &n[2]) ||
      !ArgTypedArray(env, info[4], "iovCount", napi_uint32_array, &p[3], &n[3]) ||
      !ArgTypedArray(env, info[5], "result", napi_int32_array, &p[4], &n[4])) {
    return false;
  }
  if (!ArgInt<size_t>(info, 6, "count", 0, 4294967295.0, &b->frames)) return false;
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
  int fd = -1;
  FrameBatch b;
  if (!ArgFrameBatch(info, &fd, &b)) return {};
  iovec iovs[IOV_MAX];
  size_t done = 0;
  for (; done < b.frames; done++) {
    // SAFETY: every index below was validated by ArgFrameBatch.
    uint32_t start = b.iovStart[done], count = b.iovCount[done];
    for (uint32_t k = 0; k < count; k++) {
      iovs[k].iov_base = reinterpret_cast<void*>(static_cast<uintptr_t>(b.iovBase[start + k]));
      iovs[k].iov_len = static_cast<size_t>(b.iovLen[start + k]);
    }
    ssize_t r;
    do {
      // SAFETY: the iovecs hold caller-given addresses (mapped guest memory); the kernel checks them
      // against the process's mappings and fails with EFAULT otherwise.
      r = write ? ::writev(fd, iovs, static_cast<int>(count)) : ::readv(fd, iovs, static_cast<int>(count));
    } while (r < 0 && errno == EINTR);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    // A TAP frame is at most 64 KiB plus headers; clamp anything larger (a regular file) to INT32_MAX.
    b.result[done] = r < 0 ? -errno : static_cast<int32_t>(r > INT32_MAX ? INT32_MAX : r);
  }
  return Napi::Number::New(info.Env(), static_cast<double>(done));
}

Napi::Value ReadFrames(const Napi::CallbackInfo& info) { return TransferFrames(info, false); }
Napi::Value WriteFrames(const Napi::CallbackInfo& info) { return TransferFrames(info, true); }

}  // namespace

void InitTap(Napi::Env env, Napi::Object exports) {
  exports.Set("tapOpen", Napi::Function::New(env, TapOpen, "tapOpen"));
  exports.Set("tapSetQueue", Napi::Function::New(env, TapSetQueue, "tapSetQueue"));
  exports.Set("tapSetOffload", Napi::Function::New(env, TapSetOffload, "tapSetOffload"));
  exports.Set("tapSetVnetHdrSize", Napi::Function::New(env, TapSetVnetHdrSize, "tapSetVnetHdrSize"));
  exports.Set("tapGetIff", Napi::Function::New(env, TapGetIff, "tapGetIff"));
  exports.Set("readFrames", Napi::Function::New(env, ReadFrames, "readFrames"));
  exports.Set("writeFrames", Napi::Function::New(env, WriteFrames, "writeFrames"));
}

}  // namespace vhostd
