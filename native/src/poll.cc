// watch(fd, events, callback): a libuv poll handle on the environment's event loop.
//
// Ownership: the PollState (uv handle, strong reference to the callback, async context) lives from
// watch() until the handle's close callback, whatever happens to the JS Watcher object. The Watcher
// only points at it; each side clears the other's pointer when it goes away first. stop() and
// environment teardown (an async cleanup hook) both just start uv_close; the close callback frees.
//
// Poll errors: libuv reports an error (status < 0, e.g. EPOLLERR on a socket) once and stops the
// handle. The callback then receives the watched events plus UV_DISCONNECT (4), so that a callback
// that checks POLL_READABLE reads the fd and sees the actual error (or EOF) from that syscall. The
// handle stays allocated until stop().
//
// An exception thrown by the callback is reported as an uncaught exception (napi_fatal_exception),
// like one thrown from any other event-loop callback.
#include <uv.h>

#include "common.h"

namespace vhostd {
namespace {

struct PollState;

class Watcher : public Napi::ObjectWrap<Watcher> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Watcher", {InstanceMethod("stop", &Watcher::Stop)});
  }

  explicit Watcher(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Watcher>(info) {}
  ~Watcher() override;

  Napi::Value Stop(const Napi::CallbackInfo& info);

  PollState* state = nullptr;
};

struct PollState {
  uv_poll_t handle;
  napi_env env = nullptr;
  napi_ref callback = nullptr;
  napi_async_context context = nullptr;
  napi_async_cleanup_hook_handle cleanupHook = nullptr;
  int events = 0;
  bool closing = false;
  Watcher* owner = nullptr;
};

void OnClosed(uv_handle_t* handle) {
  auto* state = static_cast<PollState*>(handle->data);
  if (state->owner != nullptr) state->owner->state = nullptr;
  if (state->callback != nullptr) napi_delete_reference(state->env, state->callback);
  if (state->context != nullptr) napi_async_destroy(state->env, state->context);
  if (state->cleanupHook != nullptr) napi_remove_async_cleanup_hook(state->cleanupHook);
  delete state;
}

/** Starts closing the handle (idempotent); the state is freed in OnClosed. */
void StartClose(PollState* state) {
  if (state->closing) return;
  state->closing = true;
  uv_poll_stop(&state->handle);
  uv_close(reinterpret_cast<uv_handle_t*>(&state->handle), OnClosed);
}

void OnCleanup(napi_async_cleanup_hook_handle, void* arg) { StartClose(static_cast<PollState*>(arg)); }

void OnPoll(uv_poll_t* handle, int status, int events) {
  auto* state = static_cast<PollState*>(handle->data);
  if (state->closing) return;
  if (status < 0) events = state->events | UV_DISCONNECT;
  napi_env env = state->env;

  napi_handle_scope scope = nullptr;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value callback = nullptr, receiver = nullptr, argument = nullptr, result = nullptr;
  if (napi_get_reference_value(env, state->callback, &callback) == napi_ok && callback != nullptr &&
      napi_get_global(env, &receiver) == napi_ok && napi_create_int32(env, events, &argument) == napi_ok) {
    napi_status status = napi_make_callback(env, state->context, receiver, callback, 1, &argument, &result);
    if (status == napi_pending_exception) {
      // Without this the exception would stay parked in the napi env and be lost.
      napi_value error = nullptr;
      if (napi_get_and_clear_last_exception(env, &error) == napi_ok && error != nullptr) {
        napi_fatal_exception(env, error);
      }
    }
  }
  napi_close_handle_scope(env, scope);
}

Watcher::~Watcher() {
  if (state != nullptr) state->owner = nullptr;
}

Napi::Value Watcher::Stop(const Napi::CallbackInfo& info) {
  if (state != nullptr) {
    PollState* s = state;
    state = nullptr;
    s->owner = nullptr;
    StartClose(s);
  }
  return info.Env().Undefined();
}

Napi::Value Watch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ARG_FD(fd, 0);
  ARG_U32(events, 1);
  ARG_FUNCTION(callback, 2);
  events &= UV_READABLE | UV_WRITABLE | UV_DISCONNECT | UV_PRIORITIZED;

  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr) {
    ThrowErrno(env, "uv_poll_init", EINVAL);
    return {};
  }
  Napi::Object object = Data(env)->watcherClass.New({});
  if (env.IsExceptionPending()) return {};

  auto* state = new PollState();
  state->env = env;
  state->events = static_cast<int>(events);
  int r = uv_poll_init(loop, &state->handle, fd);
  if (r < 0) {
    delete state;  // nothing registered with the loop yet
    ThrowErrno(env, "uv_poll_init", -r);
    return {};
  }
  state->handle.data = state;
  napi_value resourceName = Napi::String::New(env, "vhostd:watch");
  if (napi_create_reference(env, callback, 1, &state->callback) != napi_ok ||
      napi_async_init(env, object, resourceName, &state->context) != napi_ok ||
      napi_add_async_cleanup_hook(env, OnCleanup, state, &state->cleanupHook) != napi_ok) {
    StartClose(state);
    if (!env.IsExceptionPending()) ThrowErrno(env, "uv_poll_init", ENOMEM);
    return {};
  }
  r = uv_poll_start(&state->handle, state->events, OnPoll);
  if (r < 0) {
    StartClose(state);
    ThrowErrno(env, "uv_poll_start", -r);
    return {};
  }

  Watcher* watcher = Watcher::Unwrap(object);
  watcher->state = state;
  state->owner = watcher;
  return object;
}

}  // namespace

void InitPoll(Napi::Env env, Napi::Object exports) {
  Data(env)->watcherClass = Napi::Persistent(Watcher::Define(env));
  exports.Set("watch", Napi::Function::New(env, Watch, "watch"));
}

}  // namespace vhostd
