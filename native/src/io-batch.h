// The IoBatch contract (native/io-batch.ts) on the C++ side: the nine typed arrays of a batch, their
// checks, and the request validation shared by the io_uring ring (io-uring.cc) and the inline
// transfers of transferBatch (io-batch.cc).
#pragma once

#include <napi.h>

#include <cstddef>
#include <cstdint>

namespace vhostd {

/** The typed arrays of one IoBatch. */
struct Batch {
  uint8_t* opcode;
  int32_t* fd;
  double* offset;
  uint32_t* arg;
  uint32_t* iovStart;
  uint32_t* iovCount;
  uint32_t* userData;
  double* iovBase;
  double* iovLen;
  size_t requests;  // shortest of the per-request arrays
  size_t iovecs;    // shortest of iovBase / iovLen
};

/** The IoBatch properties in Batch order, with their typed array types. */
constexpr int kBatchArrays = 9;
extern const char* const kBatchKeys[kBatchArrays];
extern const napi_typedarray_type kBatchTypes[kBatchArrays];

/** Points `batch` at the nine arrays (data and lengths from ArgTypedArray, in Batch order). */
void FillBatch(void* const p[kBatchArrays], const size_t n[kBatchArrays], Batch* batch);

/** The nine typed arrays of the IoBatch `object` (type-checked), or false after throwing. */
bool GetBatchArrays(Napi::Env env, Napi::Object object, Napi::Value values[kBatchArrays], void* p[kBatchArrays],
                    size_t n[kBatchArrays]);

/**
 * Checks request `i` (i < b.requests) so that nothing runs from a batch with a bad request: opcode,
 * offset, iovec range inside the arrays (at most IOV_MAX), iovec values, and for READV/WRITEV the
 * RWF flags in `arg` (only RWF_NOWAIT). Returns false after throwing a RangeError naming the request.
 */
bool ValidateRequest(Napi::Env env, const Batch& b, size_t i);

}  // namespace vhostd
