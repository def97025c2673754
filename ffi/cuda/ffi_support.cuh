// Host-side helpers shared by the CUDA FFI handlers: argument checks that name the op and the
// argument, grid sizing, and turning launch failures into ffi::Error.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace unweight::cuda {

namespace ffi = xla::ffi;

inline ffi::Error invalid_argument(const char* op, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string(op) + ": " + what);
}

// The 16-byte vector loads and stores need 16-byte aligned buffers (XLA aligns every buffer).
inline bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// C of the [R, C] view of a tensor with these dimensions (FORMAT.md section 1).
inline int64_t matrix_cols(ffi::Span<const int64_t> dims) { return dims.size() == 0 ? 1 : dims.back(); }

// Blocks for `work_blocks` units of work: no more than can be resident at once, since the
// kernels loop over their work (and keep per-block setup, such as a decoder table, resident).
template <typename Kernel>
int resident_grid(Kernel kernel, int threads, size_t dynamic_smem, int64_t work_blocks) {
  int device = 0, sms = 1, per_sm = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, dynamic_smem);
  const int64_t resident = int64_t(sms) * std::max(per_sm, 1);
  return static_cast<int>(std::max<int64_t>(1, std::min(work_blocks, resident)));
}

// Reports a failed launch (bad configuration, no kernel image for this GPU, a sticky error).
inline ffi::Error launch_status(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string(op) + ": CUDA launch failed: " + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace unweight::cuda
