// eventfd counters (kick/call notifications) and memfd creation.
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>

#include "common.h"

namespace vhostd {
namespace {

Napi::Value Eventfd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_U32(initval, 0);
  int fd = ::eventfd(initval, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) {
    ThrowErrno(env, "eventfd", errno);
    return {};
  }
  return Napi::Number::New(env, fd);
}

Napi::Value EventfdRead(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  uint64_t value = 0;
  ssize_t n;
  do {
    n = ::read(fd, &value, sizeof(value));
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return Napi::Number::New(env, 0);
    ThrowErrno(env, "read", errno);
    return {};
  }
  if (n != sizeof(value)) {
    ThrowErrno(env, "read", EINVAL);  // not an eventfd
    return {};
  }
  return Napi::Number::New(env, static_cast<double>(value));
}

Napi::Value EventfdWrite(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  ARG_U64(value, 1);
  ssize_t n;
  do {
    n = ::write(fd, &value, sizeof(value));
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    ThrowErrno(env, "write", errno);
    return {};
  }
  return env.Undefined();
}

Napi::Value MemfdCreate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_STRING(name, 0);
  ARG_U64(size, 1);
  int fd = ::memfd_create(name.c_str(), MFD_CLOEXEC);
  if (fd < 0) {
    ThrowErrno(env, "memfd_create", errno);
    return {};
  }
  if (::ftruncate(fd, static_cast<off_t>(size)) < 0) {
    int err = errno;
    ::close(fd);
    ThrowErrno(env, "ftruncate", err);
    return {};
  }
  return Napi::Number::New(env, fd);
}

}  // namespace

void InitEventfd(Napi::Env env, Napi::Object exports) {
  exports.Set("eventfd", Napi::Function::New(env, Eventfd, "eventfd"));
  exports.Set("eventfdRead", Napi::Function::New(env, EventfdRead, "eventfdRead"));
  exports.Set("eventfdWrite", Napi::Function::New(env, EventfdWrite, "eventfdWrite"));
  exports.Set("memfdCreate", Napi::Function::New(env, MemfdCreate, "memfdCreate"));
}

}  // namespace vhostd
