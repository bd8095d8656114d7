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

/** The number of typed arrays in an IoBatch (the fields of Batch before the lengths). */
constexpr int kBatchArrays = 9;

/**
 * Points `batch` at the nine typed arrays of the IoBatch `object`, each read and type-checked in
 * Batch order; `arrays`, when given, receives them (bindBatch keeps references). Returns false
 * after throwing (TypeError for a missing or mistyped array).
 */
bool ReadBatch(Napi::Env env, Napi::Object object, Batch* batch, Napi::Value* arrays = nullptr);

/**
 * ReadBatch for the arrays kept by bindBatch, in Batch order: data pointers and lengths are read
 * afresh on every call (a detached buffer reads as length 0).
 */
bool ReadBatch(Napi::Env env, const Napi::ObjectReference arrays[kBatchArrays], Batch* batch);

/**
 * Checks request `i` (i < b.requests) so that nothing runs from a batch with a bad request: opcode,
 * offset, iovec range inside the arrays (at most IOV_MAX), iovec values, and for READV/WRITEV the
 * RWF flags in `arg` (only RWF_NOWAIT). Returns false after throwing a RangeError naming the request.
 */
bool ValidateRequest(Napi::Env env, const Batch& b, size_t i);

}  // namespace vhostd
