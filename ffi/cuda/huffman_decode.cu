// Huffman stream -> bf16, exponent bytes, or 4-bit palette indices: three XLA FFI handlers over
// the one warp decoder of huffman_core.cuh, differing only in their output sinks.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "byte_pack.cuh"
#include "ffi_support.cuh"
#include "huffman_core.cuh"
#include "unweight/format.h"
#include "xla/ffi/api/ffi.h"

namespace unweight::cuda {
namespace {

// Sinks (see huffman_core.cuh). In a full stage lane l writes 16 elements; where it writes
// bf16 it takes elements 8l..8l+7 and 256+8l..256+8l+7, so that each store instruction of the
// warp covers 512 contiguous bytes.

struct NoChunkState {
  __device__ void begin_chunk(const HuffmanStream&, const uint16_t*, int64_t, int64_t, int64_t) {}
};

// The table holds exponents.
struct ExponentSymbols {
  static constexpr bool kMapsSymbols = false;
};

// The table holds the palette index of each exponent (0 for those outside the palette).
struct PaletteSymbols {
  static constexpr bool kMapsSymbols = true;
  const uint8_t* sym_to_idx;
  __device__ uint32_t symbol_map(uint32_t exponent) const { return sym_to_idx[exponent] & 0xFu; }
};

// bf16 = the decoded exponent joined with the stored sign+mantissa byte.
struct Bf16Sink : NoChunkState, ExponentSymbols {
  const uint8_t* sm;
  uint16_t* out;
  uint2 sm_low, sm_high;  // this lane's sign+mantissa bytes of the stage being decoded

  __device__ void prefetch(int64_t first, int lane) {
    sm_low = __ldcs(reinterpret_cast<const uint2*>(sm + first + 8 * lane));
    sm_high = __ldcs(reinterpret_cast<const uint2*>(sm + first + kStageElems / 2 + 8 * lane));
  }

  __device__ void write_full(int64_t first, const uint8_t* stage, int lane) const {
    const uint2 e_low = *reinterpret_cast<const uint2*>(stage + 8 * lane);
    const uint2 e_high = *reinterpret_cast<const uint2*>(stage + kStageElems / 2 + 8 * lane);
    const uint2 a = join_bf16x4(e_low.x, sm_low.x), b = join_bf16x4(e_low.y, sm_low.y);
    const uint2 c = join_bf16x4(e_high.x, sm_high.x), d = join_bf16x4(e_high.y, sm_high.y);
    *reinterpret_cast<uint4*>(out + first + 8 * lane) = make_uint4(a.x, a.y, b.x, b.y);
    *reinterpret_cast<uint4*>(out + first + kStageElems / 2 + 8 * lane) = make_uint4(c.x, c.y, d.x, d.y);
  }

  __device__ void write_partial(int64_t first, int count, const uint8_t* stage, int lane) const {
    for (int j = lane; j < count; j += kLanes) out[first + j] = join_bf16(stage[j], sm[first + j]);
  }
};

struct ExponentSink : NoChunkState, ExponentSymbols {
  uint8_t* out;

  __device__ void prefetch(int64_t, int) {}

  __device__ void write_full(int64_t first, const uint8_t* stage, int lane) const {
    *reinterpret_cast<uint4*>(out + first + 16 * lane) = *reinterpret_cast<const uint4*>(stage + 16 * lane);
  }

  __device__ void write_partial(int64_t first, int count, const uint8_t* stage, int lane) const {
    for (int j = lane; j < count; j += kLanes) out[first + j] = stage[j];
  }
};

// Palette indices for an even row length: element i is nibble i % 2 of idx byte i / 2, and
// chunks and stages start at even elements, so each stage owns whole bytes.
struct PaletteEvenColsSink : NoChunkState, PaletteSymbols {
  uint8_t* idx;

  __device__ void prefetch(int64_t, int) {}

  __device__ void write_full(int64_t first, const uint8_t* stage, int lane) const {
    const uint4 v = *reinterpret_cast<const uint4*>(stage + 16 * lane);
    *reinterpret_cast<uint2*>(idx + first / 2 + 8 * lane) = make_uint2(pack_nibbles8(v.x, v.y), pack_nibbles8(v.z, v.w));
  }

  __device__ void write_partial(int64_t first, int count, const uint8_t* stage, int lane) const {
    for (int j = 2 * lane; j < count; j += 2 * kLanes) {
      const uint32_t high = j + 1 < count ? stage[j + 1] : 0u;
      idx[(first + j) / 2] = static_cast<uint8_t>(stage[j] | high << 4);
    }
  }
};

// Palette indices for any row length (the odd case): a byte's two elements may lie in two
// stages or two chunks. The stage holding a byte's first element writes it, taking the second
// from the next stage (this stage's writes lag by one element: the previous stage's last
// symbol is kept) or, at the chunk's end, from the next chunk's first code, decoded here.
struct PaletteAnyColsSink : PaletteSymbols {
  uint8_t* idx;
  int64_t cols;
  int64_t chunk_first, chunk_end;
  uint32_t previous;    // symbol of the element before the current stage
  uint32_t next_chunk;  // symbol of the element after the chunk

  __device__ void begin_chunk(const HuffmanStream& s, const uint16_t* table, int64_t c, int64_t first, int64_t m) {
    chunk_first = first;
    chunk_end = first + m;
    previous = 0;
    next_chunk = c + 1 < s.n_chunks ? first_symbol(s, table, c + 1) : 0u;
  }

  __device__ void prefetch(int64_t, int) {}

  __device__ void write_full(int64_t first, const uint8_t* stage, int lane) {
    write_partial(first, kStageElems, stage, lane);
  }

  __device__ void write_partial(int64_t first, int count, const uint8_t* stage, int lane) {
    const int64_t lo = first == chunk_first ? first : first - 1;
    const int64_t hi = first + count == chunk_end ? chunk_end : first + count - 1;
    const int64_t end = idx_byte_at_or_after(hi, cols);
    for (int64_t b = idx_byte_at_or_after(lo, cols) + lane; b < end; b += kLanes) {
      const IdxByteElems e = idx_byte_elems(b, cols);
      const uint32_t high = e.has_second ? symbol_at(e.first + 1, first, count, stage) : 0u;
      idx[b] = static_cast<uint8_t>(symbol_at(e.first, first, count, stage) | high << 4);
    }
    previous = stage[count - 1];
  }

  __device__ uint32_t symbol_at(int64_t i, int64_t first, int count, const uint8_t* stage) const {
    if (i < first) return previous;
    if (i >= first + count) return next_chunk;
    return stage[i - first];
  }
};

// Escape groups keep all-zero indices (FORMAT.md section 3): one warp per group, a byte per lane.
__global__ void zero_escape_groups_kernel(uint8_t* idx, const uint32_t* esc_groups, int64_t n_esc, int64_t rows,
                                          int64_t cols) {
  const int64_t groups = groups_per_row(cols);
  const int lane = threadIdx.x % kLanes;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kLanes);
  for (int64_t k = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes; k < n_esc; k += warps) {
    const int64_t gid = esc_groups[k];
    if (gid >= rows * groups) continue;  // not a group of this tensor
    const int64_t r = gid / groups, g = gid % groups;
    if (lane < (group_len(cols, g) + 1) / 2) idx[r * packed_cols(cols) + g * (kGroup / 2) + lane] = 0;
  }
}

// ---- handlers

// Checks the stream buffers against n and chunk_steps and fills `s`.
ffi::Error make_stream(const char* op, int64_t n, const ffi::Buffer<ffi::U16>& words,
                       const ffi::Buffer<ffi::U32>& chunks, const ffi::Buffer<ffi::U16>& table, int32_t chunk_steps,
                       HuffmanStream& s) {
  if (chunk_steps < 1) return invalid_argument(op, "chunk_steps must be >= 1, got " + std::to_string(chunk_steps));
  const int64_t n_chunks = static_cast<int64_t>(chunks.element_count());
  if (n_chunks != num_chunks(n, chunk_steps)) {
    return invalid_argument(op, "chunks has " + std::to_string(n_chunks) + " entries; " + std::to_string(n) +
                                    " elements in chunks of " + std::to_string(chunk_elems(chunk_steps)) + " need " +
                                    std::to_string(num_chunks(n, chunk_steps)));
  }
  const uint64_t n_words = words.element_count();
  if (n_words > UINT32_MAX) return invalid_argument(op, "words has more than 2^32 - 1 entries");
  if (!is_aligned16(words.untyped_data())) return invalid_argument(op, "words is not 16-byte aligned");
  if (!is_aligned16(table.untyped_data())) return invalid_argument(op, "lut is not 16-byte aligned");
  const uint64_t table_size = table.element_count();
  int max_len = 0;
  while ((uint64_t(1) << max_len) < table_size) ++max_len;
  if (n > 0 && (max_len < 1 || max_len > kMaxCodeLen || (uint64_t(1) << max_len) != table_size)) {
    return invalid_argument(op, "lut has " + std::to_string(table_size) + " entries; a decoder table has 2^L, L in 1.." +
                                    std::to_string(kMaxCodeLen));
  }
  s = HuffmanStream{words.typed_data(), chunks.typed_data(), table.typed_data(), static_cast<uint32_t>(n_words),
                    n, n_chunks, chunk_steps, max_len};
  return ffi::Error::Success();
}

// The decoder is a chain of dependent steps per chunk, so all of a weight's chunks should be
// resident at once (one wave): 8 blocks of ~23 KB per SM, which takes the largest shared-memory
// carveout; ask for it rather than rely on the driver's choice.
template <class Sink>
ffi::Error launch_decode(const char* op, cudaStream_t stream, const HuffmanStream& s, const Sink& sink) {
  const size_t table_bytes = sizeof(uint16_t) << s.max_len;
  const auto kernel = huffman_decode_kernel<Sink>;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string(op) + ": cannot set the shared-memory carveout: " + cudaGetErrorString(err));
  }
  const int grid = resident_grid(kernel, kDecodeThreads, table_bytes, (s.n_chunks + kDecodeWarps - 1) / kDecodeWarps);
  kernel<<<grid, kDecodeThreads, table_bytes, stream>>>(s, sink);
  return ffi::Error::Success();
}

constexpr char kToBf16[] = "unweight_huffman_to_bf16";
constexpr char kToExponent[] = "unweight_huffman_to_exponent";
constexpr char kToPalette[] = "unweight_huffman_to_palette";

ffi::Error HuffmanToBf16(cudaStream_t stream, ffi::Buffer<ffi::U8> sm, ffi::Buffer<ffi::U16> words,
                         ffi::Buffer<ffi::U32> chunks, ffi::Buffer<ffi::U16> table, int32_t chunk_steps,
                         ffi::ResultBuffer<ffi::BF16> out) {
  const int64_t n = static_cast<int64_t>(out->element_count());
  if (static_cast<int64_t>(sm.element_count()) != n) {
    return invalid_argument(kToBf16, "sm has " + std::to_string(sm.element_count()) + " elements, the output " +
                                         std::to_string(n));
  }
  HuffmanStream s;
  if (ffi::Error err = make_stream(kToBf16, n, words, chunks, table, chunk_steps, s); err.failure()) return err;
  if (n == 0) return ffi::Error::Success();
  if (!is_aligned16(sm.untyped_data()) || !is_aligned16(out->untyped_data())) {
    return invalid_argument(kToBf16, "sm and the output must be 16-byte aligned");
  }
  Bf16Sink sink{};
  sink.sm = sm.typed_data();
  sink.out = out->typed_data();
  if (ffi::Error err = launch_decode(kToBf16, stream, s, sink); err.failure()) return err;
  return launch_status(kToBf16);
}

ffi::Error HuffmanToExponent(cudaStream_t stream, ffi::Buffer<ffi::U16> words, ffi::Buffer<ffi::U32> chunks,
                             ffi::Buffer<ffi::U16> table, int32_t chunk_steps, ffi::ResultBuffer<ffi::U8> out) {
  const int64_t n = static_cast<int64_t>(out->element_count());
  HuffmanStream s;
  if (ffi::Error err = make_stream(kToExponent, n, words, chunks, table, chunk_steps, s); err.failure()) return err;
  if (n == 0) return ffi::Error::Success();
  if (!is_aligned16(out->untyped_data())) return invalid_argument(kToExponent, "the output must be 16-byte aligned");
  ExponentSink sink{};
  sink.out = out->typed_data();
  if (ffi::Error err = launch_decode(kToExponent, stream, s, sink); err.failure()) return err;
  return launch_status(kToExponent);
}

ffi::Error HuffmanToPalette(cudaStream_t stream, ffi::Buffer<ffi::U16> words, ffi::Buffer<ffi::U32> chunks,
                            ffi::Buffer<ffi::U16> table, ffi::Buffer<ffi::U8> sym_to_idx,
                            ffi::Buffer<ffi::U32> esc_groups, int32_t chunk_steps, int64_t cols,
                            ffi::ResultBuffer<ffi::U8> idx) {
  if (cols < 1) return invalid_argument(kToPalette, "cols must be >= 1, got " + std::to_string(cols));
  const auto dims = idx->dimensions();
  if (dims.size() == 0 || dims.back() != packed_cols(cols)) {
    return invalid_argument(kToPalette, "idx must have a last dimension of ceil(cols / 2) = " +
                                            std::to_string(packed_cols(cols)));
  }
  if (sym_to_idx.element_count() != 256) {
    return invalid_argument(kToPalette, "sym_to_idx has " + std::to_string(sym_to_idx.element_count()) +
                                            " entries, expected 256");
  }
  const int64_t rows = static_cast<int64_t>(idx->element_count()) / packed_cols(cols);
  const int64_t n = rows * cols;
  HuffmanStream s;
  if (ffi::Error err = make_stream(kToPalette, n, words, chunks, table, chunk_steps, s); err.failure()) return err;
  if (n == 0) return ffi::Error::Success();
  if (!is_aligned16(idx->untyped_data())) return invalid_argument(kToPalette, "idx must be 16-byte aligned");
  ffi::Error launched = ffi::Error::Success();
  if (cols % 2 == 0) {
    PaletteEvenColsSink sink{};
    sink.sym_to_idx = sym_to_idx.typed_data();
    sink.idx = idx->typed_data();
    launched = launch_decode(kToPalette, stream, s, sink);
  } else {
    PaletteAnyColsSink sink{};
    sink.sym_to_idx = sym_to_idx.typed_data();
    sink.idx = idx->typed_data();
    sink.cols = cols;
    launched = launch_decode(kToPalette, stream, s, sink);
  }
  if (launched.failure()) return launched;
  const int64_t n_esc = static_cast<int64_t>(esc_groups.element_count());
  if (n_esc > 0) {
    constexpr int kThreads = 256;
    const int grid = resident_grid(zero_escape_groups_kernel, kThreads, 0, (n_esc + kThreads / kLanes - 1) / (kThreads / kLanes));
    zero_escape_groups_kernel<<<grid, kThreads, 0, stream>>>(idx->typed_data(), esc_groups.typed_data(), n_esc, rows, cols);
  }
  return launch_status(kToPalette);
}

}  // namespace
}  // namespace unweight::cuda

namespace ffi = xla::ffi;

// Every handler only launches kernels on XLA's stream (no host sync, no allocation): graph-safe.
XLA_FFI_DEFINE_HANDLER_SYMBOL(UwHuffmanToBf16Cuda, unweight::cuda::HuffmanToBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()   // sm: sign+mantissa bytes, the tensor's shape
                                  .Arg<ffi::Buffer<ffi::U16>>()  // words: the interleaved stream
                                  .Arg<ffi::Buffer<ffi::U32>>()  // chunks: first word of each chunk
                                  .Arg<ffi::Buffer<ffi::U16>>()  // lut: decoder table, 2^L entries
                                  .Attr<int32_t>("chunk_steps")
                                  .Ret<ffi::Buffer<ffi::BF16>>(),  // the tensor, the shape of sm
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(UwHuffmanToExponentCuda, unweight::cuda::HuffmanToExponent,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()  // words
                                  .Arg<ffi::Buffer<ffi::U32>>()  // chunks
                                  .Arg<ffi::Buffer<ffi::U16>>()  // lut
                                  .Attr<int32_t>("chunk_steps")
                                  .Ret<ffi::Buffer<ffi::U8>>(),  // exponent bytes, the tensor's shape
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(UwHuffmanToPaletteCuda, unweight::cuda::HuffmanToPalette,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()  // words
                                  .Arg<ffi::Buffer<ffi::U32>>()  // chunks
                                  .Arg<ffi::Buffer<ffi::U16>>()  // lut
                                  .Arg<ffi::Buffer<ffi::U8>>()   // sym_to_idx: palette index of each exponent
                                  .Arg<ffi::Buffer<ffi::U32>>()  // esc_groups: flat ids of escape groups
                                  .Attr<int32_t>("chunk_steps")
                                  .Attr<int64_t>("cols")         // C of the [R, C] view
                                  .Ret<ffi::Buffer<ffi::U8>>(),  // idx [R, ceil(C / 2)]
                              {ffi::Traits::kCmdBufferCompatible});
