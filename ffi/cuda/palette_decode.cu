// Palette form -> bf16 (FORMAT.md section 3) as an XLA FFI handler: a streaming kernel rebuilds
// every element from its 4-bit index and sign+mantissa byte, then a small kernel writes the
// escape groups' verbatim exponents over their elements.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "byte_pack.cuh"
#include "ffi_support.cuh"
#include "unweight/format.h"
#include "xla/ffi/api/ffi.h"

namespace unweight::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpTile = 512;  // elements per warp and iteration: lane l takes 8l.. and 256 + 8l..

__device__ __forceinline__ uint32_t palette_entry(uint32_t index, uint4 palette) {
  return palette_lookup4(index, palette) & 0xFFu;
}

// Even row length: the nibbles of consecutive elements are consecutive in `idx`, so a lane
// reads 4 bytes of indices and 8 of sign+mantissa, and writes 16 bytes of bf16, twice a tile.
__global__ void __launch_bounds__(kThreads)
    palette_even_cols_kernel(const uint8_t* palette_bytes, const uint8_t* idx, const uint8_t* sm, uint16_t* out,
                             int64_t n) {
  const uint4 palette = __ldg(reinterpret_cast<const uint4*>(palette_bytes));
  const int lane = threadIdx.x % kLanes;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / kLanes);
  const int64_t tiles = n / kWarpTile;
  for (int64_t t = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / kLanes; t < tiles; t += warps) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t i = t * kWarpTile + half * (kWarpTile / 2) + 8 * lane;
      const uint32_t nibbles = __ldcs(reinterpret_cast<const unsigned int*>(idx + i / 2));
      const uint2 signmants = __ldcs(reinterpret_cast<const uint2*>(sm + i));
      const uint2 low = join_bf16x4(palette_lookup4(nibbles, palette), signmants.x);
      const uint2 high = join_bf16x4(palette_lookup4(nibbles >> 16, palette), signmants.y);
      *reinterpret_cast<uint4*>(out + i) = make_uint4(low.x, low.y, high.x, high.y);
    }
  }
  const int64_t threads = int64_t(gridDim.x) * kThreads;
  for (int64_t i = tiles * kWarpTile + int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += threads) {
    out[i] = join_bf16(palette_entry((idx[i / 2] >> (i % 2 * 4)) & 0xFu, palette), sm[i]);
  }
}

// Any row length (odd ones pad each row of `idx` with a nibble): one element per thread.
__global__ void __launch_bounds__(kThreads)
    palette_any_cols_kernel(const uint8_t* palette_bytes, const uint8_t* idx, const uint8_t* sm, uint16_t* out,
                            int64_t n, int64_t cols) {
  const uint4 palette = __ldg(reinterpret_cast<const uint4*>(palette_bytes));
  const int64_t threads = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += threads) {
    const int64_t r = i / cols;
    out[i] = join_bf16(palette_entry(nibble_at(idx + r * packed_cols(cols), i - r * cols), palette), sm[i]);
  }
}

// Escape groups: their verbatim exponents replace the palette's. One warp per group.
__global__ void __launch_bounds__(kThreads)
    escape_groups_kernel(const uint32_t* esc_groups, const uint8_t* esc_exp, int64_t n_esc, const uint8_t* sm,
                         uint16_t* out, int64_t rows, int64_t cols) {
  const int64_t groups = groups_per_row(cols);
  const int lane = threadIdx.x % kLanes;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / kLanes);
  for (int64_t k = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / kLanes; k < n_esc; k += warps) {
    const int64_t gid = esc_groups[k];
    if (gid >= rows * groups) continue;  // not a group of this tensor
    const int64_t r = gid / groups, g = gid % groups;
    const int64_t first = r * cols + g * kGroup;
    for (int64_t j = lane; j < group_len(cols, g); j += kLanes) {
      out[first + j] = join_bf16(esc_exp[k * kGroup + j], sm[first + j]);
    }
  }
}

constexpr char kOp[] = "unweight_palette_to_bf16";

ffi::Error PaletteToBf16(cudaStream_t stream, ffi::Buffer<ffi::U8> palette, ffi::Buffer<ffi::U8> idx,
                         ffi::Buffer<ffi::U8> sm, ffi::Buffer<ffi::U32> esc_groups, ffi::Buffer<ffi::U8> esc_exp,
                         ffi::ResultBuffer<ffi::BF16> out) {
  const int64_t n = static_cast<int64_t>(sm.element_count());
  if (static_cast<int64_t>(out->element_count()) != n) {
    return invalid_argument(kOp, "sm has " + std::to_string(n) + " elements, the output " +
                                     std::to_string(out->element_count()));
  }
  if (palette.element_count() != kPaletteSize) {
    return invalid_argument(kOp, "palette has " + std::to_string(palette.element_count()) + " entries, expected 16");
  }
  const int64_t n_esc = static_cast<int64_t>(esc_groups.element_count());
  if (static_cast<int64_t>(esc_exp.element_count()) != n_esc * kGroup) {
    return invalid_argument(kOp, "esc_exp has " + std::to_string(esc_exp.element_count()) + " bytes; " +
                                     std::to_string(n_esc) + " escape groups need " + std::to_string(n_esc * kGroup));
  }
  if (n == 0) return ffi::Error::Success();
  const int64_t cols = matrix_cols(sm.dimensions());
  const int64_t rows = n / cols;
  if (static_cast<int64_t>(idx.element_count()) != rows * packed_cols(cols)) {
    return invalid_argument(kOp, "idx has " + std::to_string(idx.element_count()) + " bytes, expected [" +
                                     std::to_string(rows) + ", " + std::to_string(packed_cols(cols)) + "]");
  }
  if (!is_aligned16(palette.untyped_data()) || !is_aligned16(idx.untyped_data()) ||
      !is_aligned16(sm.untyped_data()) || !is_aligned16(out->untyped_data())) {
    return invalid_argument(kOp, "palette, idx, sm and the output must be 16-byte aligned");
  }
  if (cols % 2 == 0) {
    const int grid = resident_grid(palette_even_cols_kernel, kThreads, 0,
                                   (n + kWarpTile * (kThreads / kLanes) - 1) / (kWarpTile * (kThreads / kLanes)));
    palette_even_cols_kernel<<<grid, kThreads, 0, stream>>>(palette.typed_data(), idx.typed_data(), sm.typed_data(),
                                                            out->typed_data(), n);
  } else {
    const int grid = resident_grid(palette_any_cols_kernel, kThreads, 0, (n + kThreads - 1) / kThreads);
    palette_any_cols_kernel<<<grid, kThreads, 0, stream>>>(palette.typed_data(), idx.typed_data(), sm.typed_data(),
                                                           out->typed_data(), n, cols);
  }
  if (n_esc > 0) {
    const int grid = resident_grid(escape_groups_kernel, kThreads, 0,
                                   (n_esc + kThreads / kLanes - 1) / (kThreads / kLanes));
    escape_groups_kernel<<<grid, kThreads, 0, stream>>>(esc_groups.typed_data(), esc_exp.typed_data(), n_esc,
                                                        sm.typed_data(), out->typed_data(), rows, cols);
  }
  return launch_status(kOp);
}

}  // namespace
}  // namespace unweight::cuda

namespace ffi = xla::ffi;

// Only launches kernels on XLA's stream (no host sync, no allocation): graph-safe.
XLA_FFI_DEFINE_HANDLER_SYMBOL(UwPaletteToBf16Cuda, unweight::cuda::PaletteToBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()   // palette: the 16 exponents
                                  .Arg<ffi::Buffer<ffi::U8>>()   // idx [R, ceil(C / 2)]: 4-bit indices
                                  .Arg<ffi::Buffer<ffi::U8>>()   // sm [R, C]: sign+mantissa bytes
                                  .Arg<ffi::Buffer<ffi::U32>>()  // esc_groups: flat ids of escape groups
                                  .Arg<ffi::Buffer<ffi::U8>>()   // esc_exp [n_esc, 64]: their exponents
                                  .Ret<ffi::Buffer<ffi::BF16>>(),  // bf16 [R, C]
                              {ffi::Traits::kCmdBufferCompatible});
