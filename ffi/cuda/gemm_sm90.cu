// XLA FFI handlers of the reconstructive tensor-core GEMM for Hopper (gemm_sm90_kernel.cuh):
// y[B, R] = x[B, C] @ W[R, C]^T from the palette form, from exponent + sign/mantissa bytes, or
// from plain bf16 (the twin that proves the other two lossless: same kernel, same order of
// operations, so the outputs must agree bit for bit).
//
// Per call the host encodes the TMA tensor maps (tma_map.cuh), checks every argument, and launches
// a persistent grid of one CTA per SM. With split-K (`splits` > 1, chosen by the Python wrapper)
// the kernel writes fp32 partials to the second result and a second kernel sums them in split
// order, so the result does not depend on scheduling.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "ffi_support.cuh"
#include "gemm_sm90_kernel.cuh"
#include "tma_map.cuh"
#include "unweight/format.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace unweight::cuda::sm90 {

__global__ void sum_splits_kernel(const float4* __restrict__ partial, uint2* __restrict__ y, int64_t n4, int splits) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
    float4 sum = partial[i];
    for (int s = 1; s < splits; ++s) {
      const float4 v = partial[s * n4 + i];
      sum.x += v.x;
      sum.y += v.y;
      sum.z += v.z;
      sum.w += v.w;
    }
    const __nv_bfloat162 lo = __floats2bfloat162_rn(sum.x, sum.y);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(sum.z, sum.w);
    y[i] = make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
  }
}

namespace {

// Compiled variants, by the `variant` attribute; unweight_jax/ops/gemm.py VARIANTS names them.
struct VariantShape {
  int tile_n;
  int stages;
};
constexpr VariantShape kVariants[] = {{256, 4}, {128, 6}, {256, 3}, {64, 8}};
constexpr int kNumVariants = sizeof(kVariants) / sizeof(kVariants[0]);

struct TensorMaps {
  CUtensorMap x, w, sm;
};

std::string shape_str(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

template <class B>
ffi::Error expect_shape(const char* op, const char* name, const B& buffer, std::initializer_list<int64_t> dims) {
  const auto got = buffer.dimensions();
  if (got.size() == dims.size() && std::equal(dims.begin(), dims.end(), got.begin())) return ffi::Error::Success();
  std::string want = "[";
  int i = 0;
  for (int64_t d : dims) want += (i++ ? ", " : "") + std::to_string(d);
  return invalid_argument(op, std::string(name) + " has shape " + shape_str(got) + ", expected " + want + "]");
}

// What every input form shares: the activations, the outputs and the launch.
struct Problem {
  const char* op;
  cudaStream_t stream;
  const void* x;
  int64_t batch, rows, cols;
  void* y;
  void* partial;
  int variant;
  int splits;
};

ffi::Error check_problem(const Problem& pb, ffi::Span<const int64_t> partial_dims) {
  if (pb.rows < kTileM || pb.rows % kTileM != 0) {
    return invalid_argument(pb.op, "the weight has " + std::to_string(pb.rows) + " rows; this kernel needs a multiple of " +
                                       std::to_string(kTileM));
  }
  if (pb.cols < kTileK || pb.cols % kTileK != 0) {
    return invalid_argument(pb.op, "the weight has " + std::to_string(pb.cols) + " columns; this kernel needs a multiple of " +
                                       std::to_string(kTileK));
  }
  if (pb.batch < 1 || pb.batch > INT32_MAX / 2) {
    return invalid_argument(pb.op, "x has " + std::to_string(pb.batch) + " rows");
  }
  if (pb.variant < 0 || pb.variant >= kNumVariants) {
    return invalid_argument(pb.op, "variant " + std::to_string(pb.variant) + " is not one of 0.." +
                                       std::to_string(kNumVariants - 1));
  }
  const int64_t kblocks = pb.cols / kTileK;
  const int64_t per_split = pb.splits >= 1 ? (kblocks + pb.splits - 1) / pb.splits : 0;
  if (pb.splits < 1 || (pb.splits - 1) * per_split >= kblocks) {
    return invalid_argument(pb.op, "splits = " + std::to_string(pb.splits) + " leaves a split without work (" +
                                       std::to_string(kblocks) + " k-blocks of 64)");
  }
  const bool partial_ok = pb.splits == 1 ? (partial_dims.size() == 1 && partial_dims[0] == 0)
                                         : (partial_dims.size() == 3 && partial_dims[0] == pb.splits &&
                                            partial_dims[1] == pb.batch && partial_dims[2] == pb.rows);
  if (!partial_ok) {
    return invalid_argument(pb.op, "the partials result has shape " + shape_str(partial_dims) + "; expected [" +
                                       (pb.splits == 1 ? std::string("0") : std::to_string(pb.splits) + ", batch, rows") +
                                       "] for splits = " + std::to_string(pb.splits));
  }
  int device = 0, major = 0, minor = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (major != 9 || minor != 0) {
    return invalid_argument(pb.op, "needs a Hopper GPU (sm_90a); this device is sm_" + std::to_string(major) +
                                       std::to_string(minor));
  }
  return ffi::Error::Success();
}

template <class Cfg>
ffi::Error launch(const Problem& pb, const TensorMaps& maps, GemmParams p) {
  p.n_tiles = static_cast<int>((pb.batch + Cfg::tile_n - 1) / Cfg::tile_n);
  p.num_tiles = static_cast<int>(pb.rows / kTileM) * p.n_tiles * p.splits;
  auto* kernel = &gemm_sm90_kernel<Cfg>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::smem_bytes);
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string(pb.op) + ": cannot reserve " + std::to_string(Cfg::smem_bytes) +
                                " bytes of shared memory: " + cudaGetErrorString(err));
  }
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  kernel<<<std::min(p.num_tiles, sms), kThreads, Cfg::smem_bytes, pb.stream>>>(maps.x, maps.w, maps.sm, p);
  return launch_status(pb.op);
}

template <WeightInput kInput>
ffi::Error launch_variant(const Problem& pb, const TensorMaps& maps, const GemmParams& p) {
  switch (pb.variant) {
    case 0:
      return launch<GemmConfig<kInput, kVariants[0].tile_n, kVariants[0].stages>>(pb, maps, p);
    case 1:
      return launch<GemmConfig<kInput, kVariants[1].tile_n, kVariants[1].stages>>(pb, maps, p);
    case 2:
      return launch<GemmConfig<kInput, kVariants[2].tile_n, kVariants[2].stages>>(pb, maps, p);
    default:
      return launch<GemmConfig<kInput, kVariants[3].tile_n, kVariants[3].stages>>(pb, maps, p);
  }
}

// Encodes the maps shared by all inputs (x), fills the common parameters, launches, and sums
// the split-K partials.
template <WeightInput kInput>
ffi::Error run(const Problem& pb, TensorMaps& maps, GemmParams p) {
  const int tile_n = kVariants[pb.variant].tile_n;
  if (ffi::Error e = encode_map(pb.op, "x", &maps.x, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, pb.x, pb.cols, pb.batch,
                                kTileK, tile_n, CU_TENSOR_MAP_SWIZZLE_128B);
      e.failure()) {
    return e;
  }
  p.y = static_cast<__nv_bfloat16*>(pb.y);
  p.partial = static_cast<float*>(pb.partial);
  p.rows = static_cast<int>(pb.rows);
  p.batch = static_cast<int>(pb.batch);
  p.kblocks = static_cast<int>(pb.cols / kTileK);
  p.splits = pb.splits;
  p.kblocks_per_split = (p.kblocks + pb.splits - 1) / pb.splits;
  if (ffi::Error e = launch_variant<kInput>(pb, maps, p); e.failure()) return e;
  if (pb.splits > 1) {
    const int64_t n4 = pb.batch * pb.rows / 4;  // rows is a multiple of 128
    const int blocks = static_cast<int>(std::min<int64_t>((n4 + 255) / 256, 4096));
    sum_splits_kernel<<<blocks, 256, 0, pb.stream>>>(static_cast<const float4*>(pb.partial), static_cast<uint2*>(pb.y),
                                                     n4, pb.splits);
    return launch_status(pb.op);
  }
  return ffi::Error::Success();
}

Problem make_problem(const char* op, cudaStream_t stream, const ffi::Buffer<ffi::BF16>& x, int64_t rows,
                     ffi::Result<ffi::Buffer<ffi::BF16>>& y, ffi::Result<ffi::Buffer<ffi::F32>>& partial,
                     int32_t variant, int32_t splits) {
  const auto xd = x.dimensions();
  return Problem{op,
                 stream,
                 x.untyped_data(),
                 xd.size() == 2 ? xd[0] : -1,
                 rows,
                 xd.size() == 2 ? xd[1] : -1,
                 y->untyped_data(),
                 partial->untyped_data(),
                 variant,
                 splits};
}

// Checks shared by every input: x is [B, C], y is [B, R], and the problem is one we take.
ffi::Error check_io(const Problem& pb, const ffi::Buffer<ffi::BF16>& x, ffi::Result<ffi::Buffer<ffi::BF16>>& y,
                    ffi::Result<ffi::Buffer<ffi::F32>>& partial) {
  if (x.dimensions().size() != 2) {
    return invalid_argument(pb.op, "x must be [batch, cols], got shape " + shape_str(x.dimensions()));
  }
  if (ffi::Error e = expect_shape(pb.op, "y", *y, {pb.batch, pb.rows}); e.failure()) return e;
  return check_problem(pb, partial->dimensions());
}

ffi::Error GemmPalette(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U8> palette,
                       ffi::Buffer<ffi::U8> idx, ffi::Buffer<ffi::U8> sm, ffi::Buffer<ffi::U32> esc_mask,
                       ffi::Buffer<ffi::U32> esc_prefix, ffi::Buffer<ffi::U8> esc_exp,
                       ffi::Result<ffi::Buffer<ffi::BF16>> y, ffi::Result<ffi::Buffer<ffi::F32>> partial,
                       int32_t variant, int32_t splits) {
  const char* op = "unweight_gemm_palette";
  const auto smd = sm.dimensions();
  if (smd.size() != 2) return invalid_argument(op, "sm must be [rows, cols], got shape " + shape_str(smd));
  const Problem pb = make_problem(op, stream, x, smd[0], y, partial, variant, splits);
  if (ffi::Error e = check_io(pb, x, y, partial); e.failure()) return e;
  if (pb.cols != smd[1]) {
    return invalid_argument(op, "x has " + std::to_string(pb.cols) + " columns, the weight " + std::to_string(smd[1]));
  }
  const int64_t words = escape_words_per_row(pb.cols);
  if (ffi::Error e = expect_shape(op, "palette", palette, {kPaletteSize}); e.failure()) return e;
  if (ffi::Error e = expect_shape(op, "idx", idx, {pb.rows, pb.cols / 2}); e.failure()) return e;
  if (ffi::Error e = expect_shape(op, "esc_mask", esc_mask, {pb.rows, words}); e.failure()) return e;
  if (ffi::Error e = expect_shape(op, "esc_prefix", esc_prefix, {pb.rows, words}); e.failure()) return e;
  const auto ed = esc_exp.dimensions();
  if (ed.size() != 2 || ed[1] != kGroup) {
    return invalid_argument(op, "esc_exp must be [n_esc, 64], got shape " + shape_str(ed));
  }

  TensorMaps maps;
  if (ffi::Error e = encode_map(op, "idx", &maps.w, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, idx.untyped_data(), pb.cols / 2,
                                pb.rows, kTileK / 2, kTileM, CU_TENSOR_MAP_SWIZZLE_32B);
      e.failure()) {
    return e;
  }
  if (ffi::Error e = encode_map(op, "sm", &maps.sm, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, sm.untyped_data(), pb.cols,
                                pb.rows, kTileK, kTileM, CU_TENSOR_MAP_SWIZZLE_64B);
      e.failure()) {
    return e;
  }
  GemmParams p{};
  p.palette = palette.typed_data();
  p.esc_mask = esc_mask.typed_data();
  p.esc_prefix = esc_prefix.typed_data();
  p.esc_exp = esc_exp.typed_data();
  p.esc_words = static_cast<int>(words);
  return run<WeightInput::kPalette>(pb, maps, p);
}

ffi::Error GemmExponent(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U8> exp,
                        ffi::Buffer<ffi::U8> sm, ffi::Result<ffi::Buffer<ffi::BF16>> y,
                        ffi::Result<ffi::Buffer<ffi::F32>> partial, int32_t variant, int32_t splits) {
  const char* op = "unweight_gemm_exponent";
  const auto smd = sm.dimensions();
  if (smd.size() != 2) return invalid_argument(op, "sm must be [rows, cols], got shape " + shape_str(smd));
  const Problem pb = make_problem(op, stream, x, smd[0], y, partial, variant, splits);
  if (ffi::Error e = check_io(pb, x, y, partial); e.failure()) return e;
  if (pb.cols != smd[1]) {
    return invalid_argument(op, "x has " + std::to_string(pb.cols) + " columns, the weight " + std::to_string(smd[1]));
  }
  if (ffi::Error e = expect_shape(op, "exp", exp, {pb.rows, pb.cols}); e.failure()) return e;

  TensorMaps maps;
  if (ffi::Error e = encode_map(op, "exp", &maps.w, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, exp.untyped_data(), pb.cols,
                                pb.rows, kTileK, kTileM, CU_TENSOR_MAP_SWIZZLE_64B);
      e.failure()) {
    return e;
  }
  if (ffi::Error e = encode_map(op, "sm", &maps.sm, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, sm.untyped_data(), pb.cols,
                                pb.rows, kTileK, kTileM, CU_TENSOR_MAP_SWIZZLE_64B);
      e.failure()) {
    return e;
  }
  return run<WeightInput::kExponent>(pb, maps, GemmParams{});
}

ffi::Error GemmBf16(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                    ffi::Result<ffi::Buffer<ffi::BF16>> y, ffi::Result<ffi::Buffer<ffi::F32>> partial,
                    int32_t variant, int32_t splits) {
  const char* op = "unweight_gemm_bf16";
  const auto wd = w.dimensions();
  if (wd.size() != 2) return invalid_argument(op, "w must be [rows, cols], got shape " + shape_str(wd));
  const Problem pb = make_problem(op, stream, x, wd[0], y, partial, variant, splits);
  if (ffi::Error e = check_io(pb, x, y, partial); e.failure()) return e;
  if (pb.cols != wd[1]) {
    return invalid_argument(op, "x has " + std::to_string(pb.cols) + " columns, the weight " + std::to_string(wd[1]));
  }
  TensorMaps maps;
  if (ffi::Error e = encode_map(op, "w", &maps.w, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, w.untyped_data(), pb.cols,
                                pb.rows, kTileK, kTileM, CU_TENSOR_MAP_SWIZZLE_128B);
      e.failure()) {
    return e;
  }
  maps.sm = maps.w;  // unused by the twin
  return run<WeightInput::kBf16>(pb, maps, GemmParams{});
}

}  // namespace
}  // namespace unweight::cuda::sm90

// Inputs in the fused-matmul contract's order, x first; results y and the split-K partials.
XLA_FFI_DEFINE_HANDLER_SYMBOL(UwGemmPaletteCuda, unweight::cuda::sm90::GemmPalette,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [B, C]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // palette [16]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // idx [R, C/2]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // sm [R, C]
                                  .Arg<ffi::Buffer<ffi::U32>>()   // esc_mask [R, ceil(C/64/32)]
                                  .Arg<ffi::Buffer<ffi::U32>>()   // esc_prefix [R, ceil(C/64/32)]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // esc_exp [n_esc, 64]
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // y [B, R]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // partials [splits, B, R], or [0]
                                  .Attr<int32_t>("variant")
                                  .Attr<int32_t>("splits"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(UwGemmExponentCuda, unweight::cuda::sm90::GemmExponent,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [B, C]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // exp [R, C]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // sm [R, C]
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // y [B, R]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // partials [splits, B, R], or [0]
                                  .Attr<int32_t>("variant")
                                  .Attr<int32_t>("splits"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(UwGemmBf16Cuda, unweight::cuda::sm90::GemmBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [B, C]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w [R, C]
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // y [B, R]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // partials [splits, B, R], or [0]
                                  .Attr<int32_t>("variant")
                                  .Attr<int32_t>("splits"));
