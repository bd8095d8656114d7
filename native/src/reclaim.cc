// Giving guest memory back to the host: madvise on a range of a mapping (the balloon's deflate path).
#include <sys/mman.h>

#include <cerrno>

#include "common.h"

namespace vhostd {
namespace {

/**
 * madvise(mappingId, offset, length, advice) with MADV_DONTNEED or MADV_REMOVE only: the other advice
 * values change how the mapping behaves, which no caller needs. The range is checked against the
 * mapping here as an assert; the caller's own bounds check is the policy.
 */
Napi::Value Madvise(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_U32(id, 0);
  ARG_U64(offset, 1);
  ARG_U64(length, 2);
  ARG_I32(advice, 3);
  if (advice != MADV_DONTNEED && advice != MADV_REMOVE) {
    ThrowRange(env, "advice must be MADV_DONTNEED or MADV_REMOVE");
    return {};
  }
  AddonData* data = Data(env);
  auto it = data->mappings.find(id);
  if (it == data->mappings.end()) {
    ThrowRange(env, "no mapping with id " + std::to_string(id));
    return {};
  }
  const MappingEntry& entry = it->second;
  if (offset > entry.length || length > entry.length - offset) {
    ThrowRange(env, "offset + length exceeds the mapping");
    return {};
  }
  // SAFETY: [offset, offset + length) lies inside the mapping (checked above); the views stay valid,
  // the pages read back as zeroes (or the file's contents) afterwards.
  void* start = static_cast<uint8_t*>(entry.base) + offset;
  if (::madvise(start, length, advice) < 0) {
    ThrowErrno(env, "madvise", errno);
    return {};
  }
  return env.Undefined();
}

}  // namespace

void InitReclaim(Napi::Env env, Napi::Object exports) {
  exports.Set("madvise", Napi::Function::New(env, Madvise, "madvise"));
}

}  // namespace vhostd
