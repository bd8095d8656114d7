// mmap'ed regions exposed to JS as external ArrayBuffers, detached before munmap.
//
// The mapping belongs to the per-environment table, not to the ArrayBuffers: their finalizer does
// nothing, and munmap(id) detaches every ArrayBuffer still alive (weak references) before the
// memory goes away, so a view can become empty but never dangle.
#include <sys/mman.h>

#include <algorithm>
#include <cerrno>

#include "common.h"

namespace vhostd {
namespace {

/** Must match native/layout.ts. */
constexpr uint64_t kViewStride = uint64_t{1} << 30;
constexpr uint64_t kViewSlack = uint64_t{2} << 20;

void NoopFinalize(napi_env, void*, void*) {}

/** Detaches the still-alive ArrayBuffers of `entry` and releases the weak references. */
void DetachAll(napi_env env, MappingEntry& entry) {
  for (napi_ref ref : entry.buffers) {
    napi_value buffer = nullptr;
    if (napi_get_reference_value(env, ref, &buffer) == napi_ok && buffer != nullptr) {
      napi_detach_arraybuffer(env, buffer);
    }
    napi_delete_reference(env, ref);
  }
  entry.buffers.clear();
}

Napi::Value Mmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  ARG_U64(length, 1);
  ARG_U64(offset, 2);
  ARG_BOOL(writable, 3);
  if (length == 0) {
    ThrowErrno(env, "mmap", EINVAL);
    return {};
  }
  int prot = PROT_READ | (writable ? PROT_WRITE : 0);
  void* base = ::mmap(nullptr, length, prot, MAP_SHARED, fd, static_cast<off_t>(offset));
  if (base == MAP_FAILED) {
    ThrowErrno(env, "mmap", errno);
    return {};
  }

  AddonData* data = Data(env);
  MappingEntry entry;
  entry.base = base;
  entry.length = length;

  uint64_t viewCount = (length + kViewStride - 1) / kViewStride;
  Napi::Array views = Napi::Array::New(env, viewCount);
  bool ok = true;
  for (uint64_t i = 0; i < viewCount && ok; i++) {
    uint64_t start = i * kViewStride;
    uint64_t size = std::min(kViewStride + kViewSlack, length - start);
    napi_value buffer = nullptr, view = nullptr;
    napi_ref ref = nullptr;
    // SAFETY: [start, start + size) lies inside the mapping just created; the ArrayBuffer is detached
    // by munmap (or environment teardown) before the memory is unmapped.
    void* viewBase = static_cast<uint8_t*>(base) + start;
    ok = napi_create_external_arraybuffer(env, viewBase, size, NoopFinalize, nullptr, &buffer) == napi_ok &&
         napi_create_reference(env, buffer, 0, &ref) == napi_ok;
    if (ref != nullptr) entry.buffers.push_back(ref);
    ok = ok && napi_create_typedarray(env, napi_uint8_array, size, buffer, 0, &view) == napi_ok;
    if (ok) views.Set(static_cast<uint32_t>(i), Napi::Value(env, view));
    ok = ok && !env.IsExceptionPending();
  }
  if (!ok) {
    // Leave whatever exception is pending (or raise one), then undo everything.
    bool pending = env.IsExceptionPending();
    napi_value error = nullptr;
    if (pending) napi_get_and_clear_last_exception(env, &error);
    DetachAll(env, entry);
    ::munmap(base, length);
    if (pending) {
      napi_throw(env, error);
    } else {
      ThrowErrno(env, "mmap", ENOMEM);
    }
    return {};
  }

  uint32_t id = data->nextMappingId++;
  if (data->nextMappingId == 0) data->nextMappingId = 1;
  data->mappings.emplace(id, std::move(entry));

  Napi::Object result = Napi::Object::New(env);
  result.Set("id", Napi::Number::New(env, id));
  result.Set("address", Napi::Number::New(env, static_cast<double>(reinterpret_cast<uintptr_t>(base))));
  result.Set("length", Napi::Number::New(env, static_cast<double>(length)));
  result.Set("views", views);
  return result;
}

Napi::Value Munmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_U32(id, 0);
  AddonData* data = Data(env);
  auto it = data->mappings.find(id);
  if (it == data->mappings.end()) return env.Undefined();  // already unmapped
  MappingEntry entry = std::move(it->second);
  data->mappings.erase(it);
  DetachAll(env, entry);
  if (::munmap(entry.base, entry.length) < 0) {
    ThrowErrno(env, "munmap", errno);
    return {};
  }
  return env.Undefined();
}

}  // namespace

AddonData::~AddonData() {
  // The environment is going away and no JavaScript runs any more: unmap what is left.
  // The weak references are left to the environment (no napi calls during its teardown).
  for (auto& [id, entry] : mappings) ::munmap(entry.base, entry.length);
  mappings.clear();
}

void InitMmap(Napi::Env env, Napi::Object exports) {
  exports.Set("mmap", Napi::Function::New(env, Mmap, "mmap"));
  exports.Set("munmap", Napi::Function::New(env, Munmap, "munmap"));
}

}  // namespace vhostd
