// Unix stream sockets and SCM_RIGHTS descriptor passing.
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>

#include "common.h"

namespace vhostd {

int MakeUnixAddress(const std::string& path, sockaddr_un* addr, socklen_t* length) {
  std::memset(addr, 0, sizeof(*addr));
  addr->sun_family = AF_UNIX;
  if (path.empty()) return EINVAL;
  if (path[0] == '@') {
    // Abstract namespace: a leading NUL, then the name; the length says where it ends.
    size_t n = path.size() - 1;
    if (1 + n > sizeof(addr->sun_path)) return ENAMETOOLONG;
    std::memcpy(addr->sun_path + 1, path.data() + 1, n);
    *length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n);
    return 0;
  }
  if (path.find('\0') != std::string::npos) return EINVAL;
  if (path.size() + 1 > sizeof(addr->sun_path)) return ENAMETOOLONG;
  std::memcpy(addr->sun_path, path.data(), path.size());
  *length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
  return 0;
}

namespace {

/** Most descriptors one SCM_RIGHTS message may carry (the kernel's SCM_MAX_FD). */
constexpr uint32_t kMaxFds = 253;

/** Closes `fd` without disturbing errno. */
void CloseQuietly(int fd) {
  int saved = errno;
  ::close(fd);
  errno = saved;
}

/** Returns `fd` and throws with errno, after closing `fd`. */
Napi::Value FailAndClose(Napi::Env env, const char* syscall, int fd) {
  int err = errno;
  ::close(fd);
  ThrowErrno(env, syscall, err);
  return {};
}

int SetNonBlockingFlag(int fd, bool on) {
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0) return -1;
  int wanted = on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
  if (wanted != flags && fcntl(fd, F_SETFL, wanted) < 0) return -1;
  return 0;
}

/** Checks that `[offset, offset + length)` lies inside the Uint8Array; returns its data. */
bool BufferRange(const Napi::CallbackInfo& info, size_t i, uint64_t offset, uint64_t length, uint8_t** data) {
  void* raw = nullptr;
  size_t size = 0;
  if (!ArgTypedArray(info.Env(), info[i], "buf", napi_uint8_array, &raw, &size)) return false;
  if (offset > size || length > size - offset) {
    ThrowRange(info.Env(), "buf: offset + length exceeds the array");
    return false;
  }
  *data = static_cast<uint8_t*>(raw);
  return true;
}

Napi::Value ListenUnix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_STRING(path, 0);
  ARG_I32(backlog, 1);
  sockaddr_un addr;
  socklen_t addrLength = 0;
  if (int err = MakeUnixAddress(path, &addr, &addrLength); err != 0) {
    ThrowErrno(env, "bind", err);
    return {};
  }
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    ThrowErrno(env, "socket", errno);
    return {};
  }
  // A socket file left by a previous run would make bind fail; anything else at the path is kept.
  struct stat st;
  if (path[0] != '@' && ::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(path.c_str());
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), addrLength) < 0) return FailAndClose(env, "bind", fd);
  if (::listen(fd, backlog) < 0) return FailAndClose(env, "listen", fd);
  return Napi::Number::New(env, fd);
}

Napi::Value Accept(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(listenFd, 0);
  for (;;) {
    int fd = ::accept4(listenFd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) return Napi::Number::New(env, fd);
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return Napi::Number::New(env, -1);
    ThrowErrno(env, "accept4", errno);
    return {};
  }
}

Napi::Value ConnectUnix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_STRING(path, 0);
  sockaddr_un addr;
  socklen_t addrLength = 0;
  if (int err = MakeUnixAddress(path, &addr, &addrLength); err != 0) {
    ThrowErrno(env, "connect", err);
    return {};
  }
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    ThrowErrno(env, "socket", errno);
    return {};
  }
  int r;
  do {
    r = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), addrLength);
  } while (r < 0 && errno == EINTR);
  if (r < 0 && errno != EISCONN) return FailAndClose(env, "connect", fd);
  if (SetNonBlockingFlag(fd, true) < 0) return FailAndClose(env, "fcntl", fd);
  return Napi::Number::New(env, fd);
}

Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) < 0) {
    ThrowErrno(env, "socketpair", errno);
    return {};
  }
  Napi::Array result = Napi::Array::New(env, 2);
  result.Set(0u, Napi::Number::New(env, fds[0]));
  result.Set(1u, Napi::Number::New(env, fds[1]));
  return result;
}

Napi::Value RecvMsg(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  ARG_U64(offset, 2);
  ARG_U64(length, 3);
  ARG_U32(maxFds, 4);
  uint8_t* data = nullptr;
  if (!BufferRange(info, 1, offset, length, &data)) return {};
  if (maxFds > kMaxFds) maxFds = kMaxFds;

  // uint64_t storage keeps the control buffer aligned for cmsghdr.
  uint64_t control[(CMSG_SPACE(kMaxFds * sizeof(int)) + sizeof(uint64_t) - 1) / sizeof(uint64_t)];
  iovec iov;
  // SAFETY: [offset, offset + length) was checked against the Uint8Array above; recvmsg writes only there.
  iov.iov_base = data + offset;
  iov.iov_len = length;
  msghdr msg;
  std::memset(&msg, 0, sizeof(msg));
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (maxFds > 0) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(maxFds * sizeof(int));
  }

  ssize_t bytes;
  do {
    bytes = ::recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  } while (bytes < 0 && errno == EINTR);
  if (bytes < 0) {
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      ThrowErrno(env, "recvmsg", errno);
      return {};
    }
  }

  std::vector<int> fds;
  if (bytes >= 0 && msg.msg_controllen > 0) {
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      const unsigned char* p = CMSG_DATA(c);
      for (size_t k = 0; k < n; k++) {
        int received;
        std::memcpy(&received, p + k * sizeof(int), sizeof(int));
        fds.push_back(received);
      }
    }
  }
  if (bytes >= 0 && (msg.msg_flags & MSG_CTRUNC) != 0) {
    // More descriptors were sent than there was room for: the kernel closed the excess; close the
    // rest so that nothing leaks, and report the message as too big.
    for (int received : fds) CloseQuietly(received);
    ThrowErrno(env, "recvmsg", EMSGSIZE);
    return {};
  }

  Napi::Object result = Napi::Object::New(env);
  Napi::Array fdArray = Napi::Array::New(env, fds.size());
  for (size_t k = 0; k < fds.size(); k++) fdArray.Set(static_cast<uint32_t>(k), Napi::Number::New(env, fds[k]));
  result.Set("bytes", Napi::Number::New(env, bytes < 0 ? -1.0 : static_cast<double>(bytes)));
  result.Set("fds", fdArray);
  return result;
}

Napi::Value SendMsg(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  ARG_U64(offset, 2);
  ARG_U64(length, 3);
  uint8_t* data = nullptr;
  if (!BufferRange(info, 1, offset, length, &data)) return {};
  if (!info[4].IsArray()) {
    ThrowType(env, "fds must be an array");
    return {};
  }
  Napi::Array fdArray = info[4].As<Napi::Array>();
  uint32_t count = fdArray.Length();
  if (count > kMaxFds) {
    ThrowRange(env, "fds: too many descriptors");
    return {};
  }
  int fds[kMaxFds];
  for (uint32_t k = 0; k < count; k++) {
    Napi::Value v = fdArray.Get(k);
    if (env.IsExceptionPending()) return {};
    if (!v.IsNumber() || !IsIntegerIn(v.As<Napi::Number>().DoubleValue(), 0, 2147483647.0)) {
      ThrowType(env, "fds must hold descriptors (non-negative integers)");
      return {};
    }
    fds[k] = v.As<Napi::Number>().Int32Value();
  }

  uint64_t control[(CMSG_SPACE(kMaxFds * sizeof(int)) + sizeof(uint64_t) - 1) / sizeof(uint64_t)];
  iovec iov;
  // SAFETY: [offset, offset + length) was checked against the Uint8Array above; sendmsg only reads it.
  iov.iov_base = data + offset;
  iov.iov_len = length;
  msghdr msg;
  std::memset(&msg, 0, sizeof(msg));
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (count > 0) {
    std::memset(control, 0, sizeof(control));
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(count * sizeof(int));
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(count * sizeof(int));
    std::memcpy(CMSG_DATA(c), fds, count * sizeof(int));
  }

  ssize_t bytes;
  do {
    bytes = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (bytes < 0 && errno == EINTR);
  if (bytes < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return Napi::Number::New(env, -1);
    ThrowErrno(env, "sendmsg", errno);
    return {};
  }
  return Napi::Number::New(env, static_cast<double>(bytes));
}

Napi::Value IsListeningUnixSocket(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  int accepting = 0, domain = 0, type = 0;
  socklen_t len = sizeof(int);
  if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &accepting, &len) < 0) {
    if (errno == ENOTSOCK) return Napi::Boolean::New(env, false);
    ThrowErrno(env, "getsockopt", errno);
    return {};
  }
  len = sizeof(int);
  if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0) {
    ThrowErrno(env, "getsockopt", errno);
    return {};
  }
  len = sizeof(int);
  if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0) {
    ThrowErrno(env, "getsockopt", errno);
    return {};
  }
  return Napi::Boolean::New(env, accepting != 0 && domain == AF_UNIX && type == SOCK_STREAM);
}

Napi::Value SetNonBlocking(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  ARG_BOOL(on, 1);
  if (SetNonBlockingFlag(fd, on) < 0) {
    ThrowErrno(env, "fcntl", errno);
    return {};
  }
  return env.Undefined();
}

Napi::Value Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  // On Linux the descriptor is released even when close reports EINTR; never retry.
  if (::close(fd) < 0 && errno != EINTR) {
    ThrowErrno(env, "close", errno);
    return {};
  }
  return env.Undefined();
}

/** fcntl(F_DUPFD_CLOEXEC): a second descriptor for the same open file (handed to a worker thread). */
Napi::Value Dup(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) {
    ThrowErrno(env, "fcntl", errno);
    return {};
  }
  return Napi::Number::New(env, copy);
}

}  // namespace

void InitSocket(Napi::Env env, Napi::Object exports) {
  exports.Set("listenUnix", Napi::Function::New(env, ListenUnix, "listenUnix"));
  exports.Set("accept", Napi::Function::New(env, Accept, "accept"));
  exports.Set("connectUnix", Napi::Function::New(env, ConnectUnix, "connectUnix"));
  exports.Set("socketPair", Napi::Function::New(env, SocketPair, "socketPair"));
  exports.Set("recvMsg", Napi::Function::New(env, RecvMsg, "recvMsg"));
  exports.Set("sendMsg", Napi::Function::New(env, SendMsg, "sendMsg"));
  exports.Set("isListeningUnixSocket", Napi::Function::New(env, IsListeningUnixSocket, "isListeningUnixSocket"));
  exports.Set("setNonBlocking", Napi::Function::New(env, SetNonBlocking, "setNonBlocking"));
  exports.Set("close", Napi::Function::New(env, Close, "close"));
  exports.Set("dup", Napi::Function::New(env, Dup, "dup"));
}

}  // namespace vhostd
