// Module entry point: per-environment state and initialize(NativeError).
#include "common.h"

namespace vhostd {
namespace {

/** initialize(NativeErrorClass): keeps the class that every syscall failure is thrown as. */
Napi::Value Initialize(const Napi::CallbackInfo& info) {
  ARG_FUNCTION(errorClass, 0);
  Data(info.Env())->nativeError = Napi::Persistent(errorClass);
  return info.Env().Undefined();
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  env.SetInstanceData(data);  // deleted (and its mappings unmapped) when the environment goes away

  exports.Set("initialize", Napi::Function::New(env, Initialize, "initialize"));
  InitSocket(env, exports);
  InitMmap(env, exports);
  InitEventfd(env, exports);
  InitPoll(env, exports);
  InitSdNotify(env, exports);
  InitIoUring(env, exports);
  InitIoBatch(env, exports);
  InitFile(env, exports);
  InitTap(env, exports);
  InitReclaim(env, exports);
  InitRandom(env, exports);
  return exports;
}

}  // namespace
}  // namespace vhostd

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return vhostd::Init(env, exports); }

NODE_API_MODULE(vhostd_native, InitModule)
