// Shared declarations of the native helper: per-environment state, errno errors, argument checks.
//
// Error handling never uses C++ exceptions (NAPI_DISABLE_CPP_EXCEPTIONS): a function that throws a JS
// error sets it pending and returns an empty value immediately.
#pragma once

#include <napi.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace vhostd {

/** One mmap'ed region; owned by the per-environment table, never by JS objects. */
struct MappingEntry {
  void* base = nullptr;
  size_t length = 0;
  /** Weak references (refcount 0) to the external ArrayBuffers of the views. */
  std::vector<napi_ref> buffers;
};

/** Per-environment state (napi instance data); torn down with the environment. */
struct AddonData {
  Napi::FunctionReference nativeError;
  Napi::FunctionReference watcherClass;
  Napi::FunctionReference ioUringClass;
  Napi::FunctionReference tapWriterClass;
  std::unordered_map<uint32_t, MappingEntry> mappings;
  uint32_t nextMappingId = 1;

  AddonData() = default;
  AddonData(const AddonData&) = delete;
  AddonData& operator=(const AddonData&) = delete;
  ~AddonData();
};

AddonData* Data(Napi::Env env);

/** Throws `new NativeError("<syscall>: <description> (<ENAME>)", "<ENAME>", errno, syscall)`. */
void ThrowErrno(Napi::Env env, const char* syscall, int err);
void ThrowType(Napi::Env env, const std::string& message);
void ThrowRange(Napi::Env env, const std::string& message);

/** 2^53: doubles are exact integers below this. */
constexpr double kMaxSafeInteger = 9007199254740992.0;

// Argument checks. Each returns false after throwing (TypeError for a wrong JS type, RangeError for
// a number that is not an integer in [lo, hi]).
bool ArgInteger(const Napi::CallbackInfo& info, size_t i, const char* name, double lo, double hi, double* out);
bool ArgBool(const Napi::CallbackInfo& info, size_t i, const char* name, bool* out);
bool ArgString(const Napi::CallbackInfo& info, size_t i, const char* name, std::string* out);
bool ArgFunction(const Napi::CallbackInfo& info, size_t i, const char* name, Napi::Function* out);
bool ArgObject(const Napi::CallbackInfo& info, size_t i, const char* name, Napi::Object* out);
/** A typed array of exactly `type`; `data` is adjusted for the view's byte offset. */
bool ArgTypedArray(Napi::Env env, Napi::Value value, const char* name, napi_typedarray_type type, void** data,
                   size_t* length);

/** Integer-valued double to integer type, after range checking. */
template <typename T>
bool ArgInt(const Napi::CallbackInfo& info, size_t i, const char* name, double lo, double hi, T* out) {
  double d = 0;
  if (!ArgInteger(info, i, name, lo, hi, &d)) return false;
  *out = static_cast<T>(d);
  return true;
}

/** Whether `d` is an integer in [lo, hi] (false for NaN and infinities). */
bool IsIntegerIn(double d, double lo, double hi);

/**
 * Whether iovecs `start .. start + count - 1` of the iovBase/iovLen arrays are integers in [0, 2^53)
 * (an address and a length). The caller has checked that the range lies inside both arrays.
 */
bool IovecsValid(const double* bases, const double* lengths, uint64_t start, uint64_t count);

// One-line argument declarations: `ARG_FD(fd, 0);` declares `int fd` or returns after throwing.
#define ARG_FD(var, i) \
  int var = -1;        \
  if (!::vhostd::ArgInt<int>(info, i, #var, 0, 2147483647.0, &var)) return {}
#define ARG_I32(var, i) \
  int32_t var = 0;      \
  if (!::vhostd::ArgInt<int32_t>(info, i, #var, -2147483648.0, 2147483647.0, &var)) return {}
#define ARG_U32(var, i) \
  uint32_t var = 0;     \
  if (!::vhostd::ArgInt<uint32_t>(info, i, #var, 0, 4294967295.0, &var)) return {}
#define ARG_U64(var, i) \
  uint64_t var = 0;     \
  if (!::vhostd::ArgInt<uint64_t>(info, i, #var, 0, ::vhostd::kMaxSafeInteger, &var)) return {}
#define ARG_BOOL(var, i) \
  bool var = false;      \
  if (!::vhostd::ArgBool(info, i, #var, &var)) return {}
#define ARG_STRING(var, i) \
  std::string var;         \
  if (!::vhostd::ArgString(info, i, #var, &var)) return {}
#define ARG_FUNCTION(var, i) \
  Napi::Function var;        \
  if (!::vhostd::ArgFunction(info, i, #var, &var)) return {}
#define ARG_OBJECT(var, i) \
  Napi::Object var;        \
  if (!::vhostd::ArgObject(info, i, #var, &var)) return {}

/** Fills a unix socket address; a leading '@' selects the abstract namespace. Returns 0 or an errno. */
int MakeUnixAddress(const std::string& path, sockaddr_un* addr, socklen_t* length);

// Registration of each file's functions on the exports object.
void InitSocket(Napi::Env env, Napi::Object exports);
void InitMmap(Napi::Env env, Napi::Object exports);
void InitRandom(Napi::Env env, Napi::Object exports);
void InitEventfd(Napi::Env env, Napi::Object exports);
void InitPoll(Napi::Env env, Napi::Object exports);
void InitSdNotify(Napi::Env env, Napi::Object exports);
void InitIoUring(Napi::Env env, Napi::Object exports);
void InitFile(Napi::Env env, Napi::Object exports);
void InitTap(Napi::Env env, Napi::Object exports);
void InitReclaim(Napi::Env env, Napi::Object exports);
void InitIoBatch(Napi::Env env, Napi::Object exports);

}  // namespace vhostd
