// sd_notify: one datagram to the service manager's socket.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>

#include "common.h"

namespace vhostd {
namespace {

Napi::Value SdNotify(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_STRING(path, 0);
  ARG_STRING(message, 1);
  sockaddr_un addr;
  socklen_t addrLength = 0;
  if (int err = MakeUnixAddress(path, &addr, &addrLength); err != 0) {
    ThrowErrno(env, "sendto", err);
    return {};
  }
  int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    ThrowErrno(env, "socket", errno);
    return {};
  }
  ssize_t n;
  do {
    n = ::sendto(fd, message.data(), message.size(), MSG_NOSIGNAL, reinterpret_cast<sockaddr*>(&addr), addrLength);
  } while (n < 0 && errno == EINTR);
  int err = errno;
  ::close(fd);
  if (n < 0) {
    ThrowErrno(env, "sendto", err);
    return {};
  }
  return env.Undefined();
}

}  // namespace

void InitSdNotify(Napi::Env env, Napi::Object exports) {
  exports.Set("sdNotify", Napi::Function::New(env, SdNotify, "sdNotify"));
}

}  // namespace vhostd
