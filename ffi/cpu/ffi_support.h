// What the CPU XLA FFI handlers share: the [R, C] view of a buffer, codec Status -> ffi::Error,
// and a guard that turns any C++ exception into an error instead of a crash.
#pragma once

#include <cstdint>
#include <exception>
#include <string>

#include "unweight/status.h"
#include "xla/ffi/api/ffi.h"

namespace unweight::cpu {

namespace ffi = xla::ffi;

// Handlers decode with one thread per hardware thread; the codec keeps a small tensor on one.
constexpr int kAllThreads = 0;

// FORMAT.md section 1: C = shape[-1], R = prod(shape[:-1]); a 0-d tensor is [1, 1].
struct Matrix {
  int64_t rows;
  int64_t cols;
};
template <class Buffer>
Matrix matrix_of(const Buffer& buffer) {
  const auto dims = buffer.dimensions();
  if (dims.size() == 0) return {1, 1};
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  return {rows, dims[dims.size() - 1]};
}

inline ffi::Error to_ffi(const char* target, const Status& status) {
  if (status.ok()) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string(target) + ": " + status.message());
}

// Runs `body` (returning Status) and reports its outcome, or any exception, as an ffi::Error.
template <class Body>
ffi::Error guarded(const char* target, Body&& body) {
  try {
    return to_ffi(target, body());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string(target) + ": " + e.what());
  }
}

}  // namespace unweight::cpu
