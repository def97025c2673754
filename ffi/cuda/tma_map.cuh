// Host side of the TMA copies (cp.async.bulk.tensor): tensor maps encoded per call with
// cuTensorMapEncodeTiled, reached through cudaGetDriverEntryPointByVersion so that nothing links
// libcuda. Shared by the Hopper GEMM and the streaming GEMV.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "ffi_support.cuh"

namespace unweight::cuda {

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

inline EncodeTiled tensor_map_encoder() {
  static const EncodeTiled encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
    return (err == cudaSuccess && found == cudaDriverEntryPointSuccess) ? reinterpret_cast<EncodeTiled>(fn) : nullptr;
  }();
  return encode;
}

// A 2-D row-major tensor [outer, inner] read in boxes of [box_outer, box_inner]; boxes that hang
// over an edge are filled with zeros (and still count their whole size on the mbarrier).
inline ffi::Error encode_map(const char* op, const char* what, CUtensorMap* map, CUtensorMapDataType type,
                             int elem_bytes, const void* base, int64_t inner, int64_t outer, int box_inner, int box_outer,
                             CUtensorMapSwizzle swizzle) {
  const EncodeTiled encode = tensor_map_encoder();
  if (encode == nullptr) {
    return ffi::Error::Internal(std::string(op) + ": the CUDA driver has no cuTensorMapEncodeTiled (TMA)");
  }
  const cuuint64_t dims[2] = {cuuint64_t(inner), cuuint64_t(outer)};
  const cuuint64_t strides[1] = {cuuint64_t(inner) * elem_bytes};
  const cuuint32_t box[2] = {cuuint32_t(box_inner), cuuint32_t(box_outer)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode(map, type, 2, const_cast<void*>(base), dims, strides, box, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    return ffi::Error::Internal(std::string(op) + ": cuTensorMapEncodeTiled failed for " + what + " (CUresult " +
                                std::to_string(int(r)) + ")");
  }
  return ffi::Error::Success();
}

}  // namespace unweight::cuda
