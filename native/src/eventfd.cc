// eventfd counters (kick/call notifications), memfd creation and seals.
#include <fcntl.h>
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

// memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING), ftruncate(size), then sealed against any size
// change and further sealing: a peer that maps it can rely on every byte staying there (no SIGBUS).
Napi::Value MemfdCreateSealed(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_STRING(name, 0);
  ARG_U64(size, 1);
  int fd = ::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) {
    ThrowErrno(env, "memfd_create", errno);
    return {};
  }
  const char* failed = nullptr;
  if (::ftruncate(fd, static_cast<off_t>(size)) < 0) {
    failed = "ftruncate";
  } else if (::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
    failed = "fcntl";
  }
  if (failed != nullptr) {
    int err = errno;
    ::close(fd);
    ThrowErrno(env, failed, err);
    return {};
  }
  return Napi::Number::New(env, fd);
}

// fcntl(F_GET_SEALS): the seals of a memfd (EINVAL for fds that cannot be sealed).
Napi::Value FileSeals(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  int seals = ::fcntl(fd, F_GET_SEALS);
  if (seals < 0) {
    ThrowErrno(env, "fcntl", errno);
    return {};
  }
  return Napi::Number::New(env, seals);
}

}  // namespace

void InitEventfd(Napi::Env env, Napi::Object exports) {
  exports.Set("eventfd", Napi::Function::New(env, Eventfd, "eventfd"));
  exports.Set("eventfdRead", Napi::Function::New(env, EventfdRead, "eventfdRead"));
  exports.Set("eventfdWrite", Napi::Function::New(env, EventfdWrite, "eventfdWrite"));
  exports.Set("memfdCreate", Napi::Function::New(env, MemfdCreate, "memfdCreate"));
  exports.Set("memfdCreateSealed", Napi::Function::New(env, MemfdCreateSealed, "memfdCreateSealed"));
  exports.Set("fileSeals", Napi::Function::New(env, FileSeals, "fileSeals"));
}

}  // namespace vhostd
