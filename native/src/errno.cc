// NativeError construction and argument checks.
#include <cmath>
#include <cstring>
#include <string>

#include "common.h"

namespace vhostd {

AddonData* Data(Napi::Env env) { return env.GetInstanceData<AddonData>(); }

void ThrowErrno(Napi::Env env, const char* syscall, int err) {
  if (err < 0) err = -err;
  const char* name = strerrorname_np(err);
  const char* description = strerrordesc_np(err);
  std::string code;
  if (name != nullptr) {
    code = name;
  } else {
    code = "E";  // unknown errno: "E<number>"
    code += std::to_string(err);
  }
  std::string message = std::string(syscall) + ": " + (description != nullptr ? description : "Unknown error") +
                        " (" + code + ")";

  AddonData* data = Data(env);
  if (data != nullptr && !data->nativeError.IsEmpty()) {
    Napi::Object error = data->nativeError.New({Napi::String::New(env, message), Napi::String::New(env, code),
                                                Napi::Number::New(env, err), Napi::String::New(env, syscall)});
    if (env.IsExceptionPending()) return;  // the constructor itself threw: surface that
    napi_throw(env, error);
    return;
  }
  // initialize() not called yet: a plain Error with the same properties.
  Napi::Object error = Napi::Error::New(env, message).Value();
  error.Set("code", Napi::String::New(env, code));
  error.Set("errno", Napi::Number::New(env, err));
  error.Set("syscall", Napi::String::New(env, syscall));
  napi_throw(env, error);
}

void ThrowType(Napi::Env env, const std::string& message) {
  Napi::TypeError::New(env, message).ThrowAsJavaScriptException();
}

void ThrowRange(Napi::Env env, const std::string& message) {
  Napi::RangeError::New(env, message).ThrowAsJavaScriptException();
}

bool IsIntegerIn(double d, double lo, double hi) { return std::isfinite(d) && std::trunc(d) == d && d >= lo && d <= hi; }

bool IovecsValid(const double* bases, const double* lengths, uint64_t start, uint64_t count) {
  for (uint64_t k = start; k < start + count; k++) {
    // SAFETY: the caller checked start + count against the length of both arrays.
    if (!IsIntegerIn(bases[k], 0, kMaxSafeInteger) || !IsIntegerIn(lengths[k], 0, kMaxSafeInteger)) return false;
  }
  return true;
}

bool ArgInteger(const Napi::CallbackInfo& info, size_t i, const char* name, double lo, double hi, double* out) {
  Napi::Value value = info[i];
  if (!value.IsNumber()) {
    ThrowType(info.Env(), std::string(name) + " must be a number");
    return false;
  }
  double d = value.As<Napi::Number>().DoubleValue();
  if (!IsIntegerIn(d, lo, hi)) {
    ThrowRange(info.Env(), std::string(name) + " must be an integer in [" + std::to_string(static_cast<int64_t>(lo)) +
                               ", " + std::to_string(static_cast<uint64_t>(hi)) + "]");
    return false;
  }
  *out = d;
  return true;
}

bool ArgBool(const Napi::CallbackInfo& info, size_t i, const char* name, bool* out) {
  Napi::Value value = info[i];
  if (!value.IsBoolean()) {
    ThrowType(info.Env(), std::string(name) + " must be a boolean");
    return false;
  }
  *out = value.As<Napi::Boolean>().Value();
  return true;
}

bool ArgString(const Napi::CallbackInfo& info, size_t i, const char* name, std::string* out) {
  Napi::Value value = info[i];
  if (!value.IsString()) {
    ThrowType(info.Env(), std::string(name) + " must be a string");
    return false;
  }
  *out = value.As<Napi::String>().Utf8Value();
  return true;
}

bool ArgFunction(const Napi::CallbackInfo& info, size_t i, const char* name, Napi::Function* out) {
  Napi::Value value = info[i];
  if (!value.IsFunction()) {
    ThrowType(info.Env(), std::string(name) + " must be a function");
    return false;
  }
  *out = value.As<Napi::Function>();
  return true;
}

bool ArgObject(const Napi::CallbackInfo& info, size_t i, const char* name, Napi::Object* out) {
  Napi::Value value = info[i];
  if (!value.IsObject()) {
    ThrowType(info.Env(), std::string(name) + " must be an object");
    return false;
  }
  *out = value.As<Napi::Object>();
  return true;
}

static const char* TypedArrayName(napi_typedarray_type type) {
  switch (type) {
    case napi_uint8_array: return "a Uint8Array";
    case napi_int32_array: return "an Int32Array";
    case napi_uint32_array: return "a Uint32Array";
    case napi_float64_array: return "a Float64Array";
    default: return "a typed array";
  }
}

bool ArgTypedArray(Napi::Env env, Napi::Value value, const char* name, napi_typedarray_type type, void** data,
                   size_t* length) {
  napi_typedarray_type actual = napi_int8_array;
  if (!value.IsTypedArray() ||
      napi_get_typedarray_info(env, value, &actual, length, data, nullptr, nullptr) != napi_ok || actual != type) {
    ThrowType(env, std::string(name) + " must be " + TypedArrayName(type));
    return false;
  }
  if (*data == nullptr) *length = 0;  // detached
  return true;
}

}  // namespace vhostd
