// The kernel's entropy straight into a caller's buffer: getrandom(2), no copy and no allocation per
// call (the rng daemon fills guest memory with it).
#include <sys/random.h>

#include <cerrno>

#include "common.h"

namespace vhostd {
namespace {

/**
 * getrandom(view, offset, length): fills `view[offset .. offset + n)` and returns n. The kernel may
 * return fewer bytes than asked for large requests (it caps one call at 32 MiB - 1); the caller loops.
 * Flags 0: blocks only until the kernel's pool is first initialized, early at boot.
 */
Napi::Value GetRandom(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  void* raw = nullptr;
  size_t size = 0;
  if (!ArgTypedArray(env, info[0], "view", napi_uint8_array, &raw, &size)) return {};
  ARG_U64(offset, 1);
  ARG_U64(length, 2);
  if (offset > size || length > size - offset) {
    ThrowRange(env, "offset + length exceeds the view");
    return {};
  }
  // SAFETY: [offset, offset + length) lies inside the view (checked above); a detached view has
  // size 0 and only an empty request passes.
  uint8_t* start = static_cast<uint8_t*>(raw) + offset;
  ssize_t n;
  do {
    n = ::getrandom(start, length, 0);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    ThrowErrno(env, "getrandom", errno);
    return {};
  }
  return Napi::Number::New(env, static_cast<double>(n));
}

}  // namespace

void InitRandom(Napi::Env env, Napi::Object exports) {
  exports.Set("getrandom", Napi::Function::New(env, GetRandom, "getrandom"));
}

}  // namespace vhostd
