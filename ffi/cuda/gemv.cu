// The GEMV family of fused matmuls: y[B, R] = x[B, C] @ W[R, C]^T for batches of 1 to 16, fp32
// accumulation, y rounded to bf16. At these batches a step is pure weight traffic, so the weight
// is read in its compressed resident form (FORMAT.md section 3, or exponent + sign/mantissa
// bytes) and rebuilt to bf16 in registers; nothing of it is staged in shared memory. The plain
// bf16 twin runs the same kernels with the rebuild replaced by a load: the fused kernels must
// match it bit for bit, which is their proof of losslessness.
//
// Work split. A block owns RT tiles of 16 rows; its warps split the columns, in steps of 64 (one
// escape group of each row), and add their partial sums in shared memory at the end. In a step
// lane (g, t) = (lane / 4, lane % 4) reads columns [64 s + 16 t, +16) of rows g and g + 8 of
// each tile (one 16-byte load of sign+mantissa bytes and one 8-byte load of indices per row),
// U steps ahead of their first use. Those 16 weights feed four mma.m16n8k16 (gemv_fragment.cuh
// pairs the columns; the k-slots 2t, 2t+1, 2t+8, 2t+9 of mma j take columns 4j, 4j+2, 4j+1,
// 4j+3), and the B operand takes the same columns of x row g straight from global memory (L1),
// so x needs no staging and every lane's loads stay 16 bytes wide.
//
// The rows kernel (batch <= 4) splits the work the other way: a warp takes whole rows, lanes
// side by side along them, so each load instruction of a warp reads 512 consecutive bytes, and
// many small warps (about 80 registers) keep the loads in flight; it multiplies with fp32 FMA.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "byte_pack.cuh"
#include "ffi_support.cuh"
#include "gemv_fragment.cuh"
#include "gemv_stream.cuh"
#include "gemv_weights.cuh"
#include "unweight/format.h"
#include "xla/ffi/api/ffi.h"

namespace unweight::cuda {
namespace {

constexpr int kTileRows = 16;      // rows of an mma tile: lane (g, t) holds rows g and g + 8
constexpr int kMaxWarps = 8;       // warps per block, splitting the columns of its rows
constexpr int kMaxBatch = 16;
constexpr int kMaxFmaBatch = 4;

// Variant ids: the `variant` attribute (unweight_jax/ops/gemv.py documents them as VARIANTS).
enum Variant : int32_t {
  kMma = 0,        // tensor cores, 16 rows per warp, 4 steps in flight
  kMmaRows32 = 1,  // tensor cores, 32 rows per warp sharing x, 2 steps in flight
  kFma = 2,        // fp32 FMA, batch <= 4, 16 rows per warp, 4 steps in flight
  kMmaAcc4 = 3,    // as kMma, with four independent accumulators (a shorter mma chain)
  kMmaU2Acc4 = 4,  // as kMmaAcc4, 2 steps in flight (fewer registers, more resident warps)
  kMmaU1 = 5,      // as kMmaAcc4, 1 step in flight, at most 128 registers: more resident warps
  kRows = 6,       // fp32 FMA (batch <= 4), a warp per row along its length, 2 steps in flight
  kRows2 = 7,      // as kRows, a warp per 2 rows sharing x
  kRowsU4 = 8,     // as kRows, 4 steps in flight
  kStream = 9,     // Hopper: tensor cores fed by bulk copies through 4 shared-memory stages (gemv_stream.cuh)
  kStreamS3 = 10,  // as kStream, 3 stages (less shared memory per block)
  kStreamW8 = 11,  // as kStream, 8 consumer warps
};
constexpr int32_t kLastVariant = kStreamW8;

constexpr bool is_row_variant(int32_t v) { return v >= kRows && v <= kRowsU4; }
constexpr bool is_fma_variant(int32_t v) { return v == kFma || is_row_variant(v); }
constexpr bool is_stream_variant(int32_t v) { return v >= kStream; }

// ---- the warp's walk over its steps, shared by both kernels

// One chunk of N steps of the lane's 2 x RT rows, as loaded: the weights and, for the palette
// form, the escape groups among them.
template <class Weights, int RT, int N>
struct Chunk {
  static constexpr int kSteps = N;
  typename Weights::Lane lanes[RT][2][N];
  typename Weights::Escapes escapes[RT][2];

  __device__ const typename Weights::Lane& lane(int rt, int h, int u) const { return lanes[rt][h][u]; }
  __device__ const typename Weights::Escapes& escape(int rt, int h) const { return escapes[rt][h]; }
};

// The escape mask words (and prefixes) over `step` of the lane's rows. Loaded one chunk ahead of
// the weights they describe, so that a chunk's escape exponents are fetched together with its
// weights instead of one memory latency after them.
template <class Weights, int RT>
struct EscapeWords {
  uint2 words[RT][2];

  __device__ void load(const Weights& weights, const int64_t (&row)[RT][2], int step) {
    if constexpr (Weights::kEscapes) {
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) words[rt][h] = weights.escape_words(row[rt][h], step);
      }
    }
  }
};

// Issues the loads of N steps (from step0) of the lane's rows. N divides 32 and step0 is a
// multiple of N, so the N steps share one escape mask word, `esc`. The __syncwarp() keeps the
// loads where they are written: ptxas would otherwise sink them into the computation before
// them, leaving nothing in flight while it runs.
template <class Weights, int RT, int N>
__device__ __forceinline__ void load_chunk(const Weights& weights, const int64_t (&row)[RT][2], int step0, int t,
                                           uint64_t policy, const EscapeWords<Weights, RT>& esc,
                                           Chunk<Weights, RT, N>& chunk) {
  static_assert(kEscWordBits % N == 0, "a chunk of steps must not straddle two escape mask words");
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int u = 0; u < N; ++u) {
        chunk.lanes[rt][h][u] = weights.load(row[rt][h], int64_t(step0 + u) * kStepCols + kLaneCols * t, policy);
      }
    }
  }
  if constexpr (Weights::kEscapes) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        chunk.escapes[rt][h] = weights.template escapes<N>(esc.words[rt][h], step0, t, policy);
      }
    }
  }
  __syncwarp();
}

// Runs compute(chunk, step0) over this warp's share of the row's steps: whole chunks of U steps
// split evenly between the block's warps (the last warp also takes the leftover steps, one at a
// time). Software-pipelined: chunk c + 1 is in flight while chunk c is rebuilt and multiplied,
// and each chunk's escape mask words arrive one chunk before its weights, so the warp always has
// a chunk of weights on the way and no load waits on another.
template <class Weights, int RT, int U, typename Compute>
__device__ __forceinline__ void walk_steps(const Weights& weights, const int64_t (&row)[RT][2], int steps, int warp,
                                           int warps, int t, uint64_t policy, Compute&& compute) {
  const int chunks = steps / U;
  const int first = int(int64_t(chunks) * warp / warps), end = int(int64_t(chunks) * (warp + 1) / warps);
  const int last_step = steps - 1;  // mask words are looked up at a clamped step past the end
  EscapeWords<Weights, RT> esc;
  Chunk<Weights, RT, U> ping, pong;
  if (first < end) {
    esc.load(weights, row, first * U);
    load_chunk<Weights, RT, U>(weights, row, first * U, t, policy, esc, ping);
    esc.load(weights, row, min((first + 1) * U, last_step));
  }
  for (int c = first; c < end; c += 2) {
    if (c + 1 < end) {
      load_chunk<Weights, RT, U>(weights, row, (c + 1) * U, t, policy, esc, pong);
      esc.load(weights, row, min((c + 2) * U, last_step));
    }
    compute(ping, c * U);
    if (c + 1 >= end) break;
    if (c + 2 < end) {
      load_chunk<Weights, RT, U>(weights, row, (c + 2) * U, t, policy, esc, ping);
      esc.load(weights, row, min((c + 3) * U, last_step));
    }
    compute(pong, (c + 1) * U);
  }
  if (warp == warps - 1) {
    for (int s = chunks * U; s < steps; ++s) {
      Chunk<Weights, RT, 1> single;
      esc.load(weights, row, s);
      load_chunk<Weights, RT, 1>(weights, row, s, t, policy, esc, single);
      compute(single, s);
    }
  }
}

// Shared memory of a block: the partial sums of all warps but the first.
template <int kValues>
constexpr size_t partial_bytes(int warps) {
  return size_t(warps - 1) * kValues * kLanes * sizeof(float);
}

// Adds the block's per-warp partial sums into warp 0's, in warp order (so the result does not
// depend on timing). Returns false in every other warp, which then has nothing left to do.
template <int kValues>
__device__ __forceinline__ bool reduce_warps(float (&acc)[kValues], void* smem, int warp, int warps, int lane) {
  if (warps == 1) return true;
  float* partial = static_cast<float*>(smem);
  if (warp > 0) {
#pragma unroll
    for (int i = 0; i < kValues; ++i) partial[((warp - 1) * kValues + i) * kLanes + lane] = acc[i];
  }
  __syncthreads();
  if (warp > 0) return false;
  for (int w = 1; w < warps; ++w) {
#pragma unroll
    for (int i = 0; i < kValues; ++i) acc[i] += partial[((w - 1) * kValues + i) * kLanes + lane];
  }
  return true;
}

// ---- the kernels

// Tensor cores: NT tiles of 8 batch rows (1 up to batch 8, else 2), RT tiles of 16 rows per warp.
// ACC accumulator sets take the four mma of a step in turn, so that ACC chains of dependent mma
// run side by side; they are added in a fixed order at the end.
template <class Weights, int NT, int RT, int U, int ACC, int MINB>
__global__ void __launch_bounds__(kMaxWarps* kLanes, MINB)
    gemv_mma_kernel(Weights weights, const uint16_t* __restrict__ x, uint16_t* __restrict__ y, int batch, int rows,
                    int cols) {
  extern __shared__ uint4 smem[];
  const int lane = threadIdx.x % kLanes, warp = threadIdx.x / kLanes, warps = blockDim.x / kLanes;
  const int g = lane / 4, t = lane % 4;
  const uint64_t policy = evict_first_policy();
  const auto table = weights.table();

  const int first_row = blockIdx.x * kTileRows * RT;
  int64_t row[RT][2];  // clamped: the last tile's missing rows re-read a real one, never stored
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) row[rt][h] = min(first_row + kTileRows * rt + 8 * h + g, rows - 1);
  }
  const uint16_t* x_lane[NT];
  bool x_valid[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int b = 8 * nt + g;
    x_valid[nt] = b < batch;
    x_lane[nt] = x + int64_t(x_valid[nt] ? b : 0) * cols + kLaneCols * t;
  }

  float acc[RT][NT][ACC][4] = {};
  walk_steps<Weights, RT, U>(weights, row, cols / kStepCols, warp, warps, t, policy, [&](const auto& chunk, int step0) {
    constexpr int N = std::decay_t<decltype(chunk)>::kSteps;
#pragma unroll
    for (int u = 0; u < N; ++u) {
      Pairs xs[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) xs[nt] = load_x16(x_lane[nt] + int64_t(step0 + u) * kStepCols, x_valid[nt]);
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        const Pairs a = weights.rebuild(chunk.lane(rt, 0, u), table, chunk.escape(rt, 0), step0, u, t, policy);
        const Pairs b = weights.rebuild(chunk.lane(rt, 1, u), table, chunk.escape(rt, 1), step0, u, t, policy);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            mma_bf16(acc[rt][nt][j % ACC], a.w[2 * j], b.w[2 * j], a.w[2 * j + 1], b.w[2 * j + 1],
                     xs[nt].w[2 * j], xs[nt].w[2 * j + 1]);
          }
        }
      }
    }
  });

  float sum[RT][NT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        sum[rt][nt][i] = acc[rt][nt][0][i];
#pragma unroll
        for (int a = 1; a < ACC; ++a) sum[rt][nt][i] += acc[rt][nt][a][i];
      }
    }
  }
  if (!reduce_warps<RT * NT * 4>(reinterpret_cast<float(&)[RT * NT * 4]>(sum), smem, warp, warps, lane)) return;
  // acc[rt][nt]: (row g, batch 2t), (row g, 2t + 1), (row g + 8, 2t), (row g + 8, 2t + 1) of tile (rt, nt).
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = first_row + kTileRows * rt + 8 * (i / 2) + g, b = 8 * nt + 2 * t + i % 2;
        if (r < rows && b < batch) y[int64_t(b) * rows + r] = to_bf16(sum[rt][nt][i]);
      }
    }
  }
}

// fp32 FMA (batch B <= 4), 16 rows per warp: every lane reads its 16 columns of each x row.
template <class Weights, int B, int U>
__global__ void __launch_bounds__(kMaxWarps* kLanes)
    gemv_fma_kernel(Weights weights, const uint16_t* __restrict__ x, uint16_t* __restrict__ y, int rows, int cols) {
  extern __shared__ uint4 smem[];
  const int lane = threadIdx.x % kLanes, warp = threadIdx.x / kLanes, warps = blockDim.x / kLanes;
  const int g = lane / 4, t = lane % 4;
  const uint64_t policy = evict_first_policy();
  const auto table = weights.table();

  const int first_row = blockIdx.x * kTileRows;
  const int64_t row[1][2] = {{min(first_row + g, rows - 1), min(first_row + 8 + g, rows - 1)}};
  const uint16_t* x_lane = x + kLaneCols * t;

  float acc[2][B] = {};
  walk_steps<Weights, 1, U>(weights, row, cols / kStepCols, warp, warps, t, policy, [&](const auto& chunk, int step0) {
    constexpr int N = std::decay_t<decltype(chunk)>::kSteps;
#pragma unroll
    for (int u = 0; u < N; ++u) {
      Pairs xs[B];
#pragma unroll
      for (int b = 0; b < B; ++b) xs[b] = load_x16(x_lane + int64_t(b) * cols + int64_t(step0 + u) * kStepCols, true);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const Pairs w = weights.rebuild(chunk.lane(0, h, u), table, chunk.escape(0, h), step0, u, t, policy);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const float lo = low_bf16(w.w[k]), hi = high_bf16(w.w[k]);
#pragma unroll
          for (int b = 0; b < B; ++b) {
            acc[h][b] = fmaf(lo, low_bf16(xs[b].w[k]), acc[h][b]);
            acc[h][b] = fmaf(hi, high_bf16(xs[b].w[k]), acc[h][b]);
          }
        }
      }
    }
  });

  // The four lanes of a row hold a quarter of its columns each.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
      acc[h][b] += __shfl_xor_sync(0xFFFFFFFFu, acc[h][b], 1);
      acc[h][b] += __shfl_xor_sync(0xFFFFFFFFu, acc[h][b], 2);
    }
  }
  if (!reduce_warps<2 * B>(reinterpret_cast<float(&)[2 * B]>(acc), smem, warp, warps, lane)) return;
  if (t != 0) return;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = first_row + 8 * h + g;
#pragma unroll
    for (int b = 0; b < B; ++b) {
      if (r < rows) y[int64_t(b) * rows + r] = to_bf16(acc[h][b]);
    }
  }
}

// fp32 FMA (batch B <= 4), one warp per R rows, the lanes side by side along a row: in step s
// lane l reads columns [512 s + 16 l, +16) of each of its rows, so a warp's loads of a row are
// 512 (sign+mantissa) and 256 (indices) consecutive bytes and need no shared memory. A warp
// walks its rows' whole length with U steps in flight (double-buffered): many short warps with
// few registers each fill the GPU. The lane's group of 64 is 8 s + l / 4; where it is an escape
// group, its 16 verbatim exponents are fetched together with the weights.
template <class Weights, int R, int N>
struct RowChunk {
  static constexpr int kSteps = N;
  typename Weights::Lane lanes[R][N];
  uint4 verbatim[R][N];
  uint32_t escaped;  // bit R u + r: the lane's group in step u of row r is an escape group
  uint32_t valid;    // bit u: the lane's columns of step u lie inside the row
};

constexpr int kRowStepCols = kLanes * kLaneCols;  // 512 columns of a row per warp step
constexpr int kRowWarps = 8;                      // warps per block, each its own rows
constexpr int64_t kRowMaxCols = int64_t(kLanes) * kEscWordBits * kGroup;  // a mask word per lane

template <class Weights, int B, int R, int U>
__global__ void __launch_bounds__(kRowWarps* kLanes)
    gemv_rows_kernel(Weights weights, const uint16_t* __restrict__ x, uint16_t* __restrict__ y, int rows, int cols) {
  const int lane = threadIdx.x % kLanes, t = lane % 4;
  const int64_t first_row = (int64_t(blockIdx.x) * kRowWarps + threadIdx.x / kLanes) * R;
  if (first_row >= rows) return;
  const uint64_t policy = evict_first_policy();
  const auto table = weights.table();
  int64_t row[R];
#pragma unroll
  for (int r = 0; r < R; ++r) row[r] = min(first_row + r, int64_t(rows) - 1);  // a clamped row is never stored

  // The rows' escape mask words and prefixes: word w in lane w, handed round by shuffles.
  uint32_t mask[R] = {}, prefix[R] = {};
  if constexpr (Weights::kEscapes) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (lane < weights.mask_words) {
        const uint2 w = weights.escape_words(row[r], lane * kEscWordBits);
        mask[r] = w.x;
        prefix[r] = w.y;
      }
    }
  }

  // Issues the loads of the N steps from step0; a lane past the end of the row loads nothing.
  auto load = [&](int step0, auto& c) {
    constexpr int N = std::decay_t<decltype(c)>::kSteps;
    c.escaped = c.valid = 0;
#pragma unroll
    for (int u = 0; u < N; ++u) {
      const int col = (step0 + u) * kRowStepCols + kLaneCols * lane;
      const bool valid = col < cols;
      c.valid |= uint32_t(valid) << u;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        c.lanes[r][u] = weights.load(row[r], valid ? col : 0, policy);
        if constexpr (Weights::kEscapes) {
          const int group = col / kGroup, word = group / kEscWordBits, bit = group % kEscWordBits;
          const uint32_t m = __shfl_sync(0xFFFFFFFFu, mask[r], word % kLanes);
          const uint32_t p = __shfl_sync(0xFFFFFFFFu, prefix[r], word % kLanes);
          const bool escaped = valid && ((m >> bit) & 1u);
          c.escaped |= uint32_t(escaped) << (R * u + r);
          load_weights16_if(escaped, weights.esc_exp + int64_t(escape_slot(m, p, bit)) * kGroup + kLaneCols * t,
                            policy, c.verbatim[r][u]);
        }
      }
    }
    __syncwarp();  // keeps the loads here (see load_chunk)
  };

  float acc[R][B] = {};
  auto compute = [&](const auto& c, int step0) {
    constexpr int N = std::decay_t<decltype(c)>::kSteps;
#pragma unroll
    for (int u = 0; u < N; ++u) {
      if (!((c.valid >> u) & 1u)) continue;  // only in a row's last, partial step
      const int col = (step0 + u) * kRowStepCols + kLaneCols * lane;
      Pairs xs[B];
#pragma unroll
      for (int b = 0; b < B; ++b) xs[b] = load_x16(x + int64_t(b) * cols + col, true);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const Pairs w = weights.rebuild_lane(c.lanes[r][u], table, (c.escaped >> (R * u + r)) & 1u,
                                             Weights::kEscapes ? c.verbatim[r][u] : make_uint4(0, 0, 0, 0));
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const float lo = low_bf16(w.w[k]), hi = high_bf16(w.w[k]);
#pragma unroll
          for (int b = 0; b < B; ++b) {
            acc[r][b] = fmaf(lo, low_bf16(xs[b].w[k]), acc[r][b]);
            acc[r][b] = fmaf(hi, high_bf16(xs[b].w[k]), acc[r][b]);
          }
        }
      }
    }
  };

  // Whole chunks of U steps ping-pong (one in flight while the other is multiplied), then the
  // remaining steps, the last maybe partial, one at a time.
  const int steps = (cols + kRowStepCols - 1) / kRowStepCols, chunks = steps / U;
  RowChunk<Weights, R, U> ping, pong;
  if (chunks > 0) load(0, ping);
  for (int c = 0; c < chunks; c += 2) {
    if (c + 1 < chunks) load((c + 1) * U, pong);
    compute(ping, c * U);
    if (c + 1 >= chunks) break;
    if (c + 2 < chunks) load((c + 2) * U, ping);
    compute(pong, (c + 1) * U);
  }
  for (int s = chunks * U; s < steps; ++s) {
    RowChunk<Weights, R, 1> single;
    load(s, single);
    compute(single, s);
  }

  // Each lane holds 1/32 of the columns: a butterfly adds them, in the same order everywhere.
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
#pragma unroll
      for (int d = 1; d < kLanes; d *= 2) acc[r][b] += __shfl_xor_sync(0xFFFFFFFFu, acc[r][b], d);
    }
  }
  if (lane != 0) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
      if (first_row + r < rows) y[int64_t(b) * rows + first_row + r] = to_bf16(acc[r][b]);
    }
  }
}

// ---- launching

struct Problem {
  const uint16_t* x;
  uint16_t* y;
  int batch;
  int rows;
  int cols;
};

int sm_count() {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms;
}

// Resident blocks per SM of `kernel` at this block size, asked of CUDA once per kernel and size.
template <typename Kernel>
int blocks_per_sm(Kernel kernel, int warps, size_t smem) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> known;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), warps);
  auto it = known.find(key);
  if (it == known.end()) {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, warps * kLanes, smem) != cudaSuccess) n = 0;
    it = known.emplace(key, n).first;
  }
  return it->second;
}

// Warps per block: the most (up to 8, and no more than there are chunks of U steps in a row)
// for which the whole grid is resident at once, so that every warp streams from the start and
// none waits for a second wave. Sized with the palette kernel, so the twin and the fused kernels
// split the columns alike and sum in the same order.
template <typename PaletteKernel>
int warps_per_block(PaletteKernel kernel, int64_t blocks, int chunks, size_t (*smem)(int)) {
  const int sms = sm_count();
  for (int warps = kMaxWarps; warps > 1; warps /= 2) {
    if (warps > chunks) continue;
    if (blocks <= int64_t(blocks_per_sm(kernel, warps, smem(warps))) * sms) return warps;
  }
  return 1;
}

template <class Weights, int NT, int RT, int U, int ACC, int MINB>
void launch_mma(const Weights& weights, const Problem& p, cudaStream_t stream) {
  constexpr int kValues = RT * NT * 4;
  const int64_t blocks = (int64_t(p.rows) + kTileRows * RT - 1) / (kTileRows * RT);
  const int warps = warps_per_block(gemv_mma_kernel<PaletteWeights, NT, RT, U, ACC, MINB>, blocks,
                                    p.cols / kStepCols / U, partial_bytes<kValues>);
  gemv_mma_kernel<Weights, NT, RT, U, ACC, MINB><<<blocks, warps * kLanes, partial_bytes<kValues>(warps), stream>>>(
      weights, p.x, p.y, p.batch, p.rows, p.cols);
}

template <class Weights, int B>
void launch_fma(const Weights& weights, const Problem& p, cudaStream_t stream) {
  constexpr int U = 4, kValues = 2 * B;
  const int64_t blocks = (int64_t(p.rows) + kTileRows - 1) / kTileRows;
  const int warps = warps_per_block(gemv_fma_kernel<PaletteWeights, B, U>, blocks, p.cols / kStepCols / U,
                                    partial_bytes<kValues>);
  gemv_fma_kernel<Weights, B, U>
      <<<blocks, warps * kLanes, partial_bytes<kValues>(warps), stream>>>(weights, p.x, p.y, p.rows, p.cols);
}

template <class Weights, int B, int R, int U>
void launch_rows(const Weights& weights, const Problem& p, cudaStream_t stream) {
  const int64_t warps = (int64_t(p.rows) + R - 1) / R;
  gemv_rows_kernel<Weights, B, R, U><<<(warps + kRowWarps - 1) / kRowWarps, kRowWarps * kLanes, 0, stream>>>(
      weights, p.x, p.y, p.rows, p.cols);
}

// The mma kernels take one tile of 8 batch rows up to batch 8, two above; the FMA kernels are
// compiled for each batch.
template <class Weights, int RT, int U, int ACC, int MINB = 1>
void launch_mma_batch(const Weights& weights, const Problem& p, cudaStream_t stream) {
  return p.batch > 8 ? launch_mma<Weights, 2, RT, U, ACC, MINB>(weights, p, stream)
                     : launch_mma<Weights, 1, RT, U, ACC, MINB>(weights, p, stream);
}

template <class Weights>
void launch_fma_batch(const Weights& weights, const Problem& p, cudaStream_t stream) {
  switch (p.batch) {
    case 1: return launch_fma<Weights, 1>(weights, p, stream);
    case 2: return launch_fma<Weights, 2>(weights, p, stream);
    case 3: return launch_fma<Weights, 3>(weights, p, stream);
    default: return launch_fma<Weights, 4>(weights, p, stream);
  }
}

template <class Weights, int R, int U>
void launch_rows_batch(const Weights& weights, const Problem& p, cudaStream_t stream) {
  switch (p.batch) {
    case 1: return launch_rows<Weights, 1, R, U>(weights, p, stream);
    case 2: return launch_rows<Weights, 2, R, U>(weights, p, stream);
    case 3: return launch_rows<Weights, 3, R, U>(weights, p, stream);
    default: return launch_rows<Weights, 4, R, U>(weights, p, stream);
  }
}

// MINB: blocks of 8 warps per SM that the registers must allow (2: at most 128 registers).
//                                                          rows/16  U  ACC  MINB
template <class Weights>
ffi::Error launch(const char* op, const Weights& weights, const Problem& p, int32_t variant, cudaStream_t stream) {
  switch (variant) {
    case kMma: launch_mma_batch<Weights, 1, 4, 1>(weights, p, stream); break;
    case kMmaRows32: launch_mma_batch<Weights, 2, 2, 1>(weights, p, stream); break;
    case kMmaAcc4: launch_mma_batch<Weights, 1, 4, 4>(weights, p, stream); break;
    case kMmaU2Acc4: launch_mma_batch<Weights, 1, 2, 4>(weights, p, stream); break;
    case kMmaU1: launch_mma_batch<Weights, 1, 1, 4, 2>(weights, p, stream); break;
    case kFma: launch_fma_batch<Weights>(weights, p, stream); break;
    //                                       rows per warp  steps in flight
    case kRows: launch_rows_batch<Weights, 1, 2>(weights, p, stream); break;
    case kRows2: launch_rows_batch<Weights, 2, 2>(weights, p, stream); break;
    case kRowsU4: launch_rows_batch<Weights, 1, 4>(weights, p, stream); break;
    //                                           consumer warps  stages
    case kStream: return launch_stream<Weights, 4, 4>(op, weights, p.x, p.y, p.batch, p.rows, p.cols, stream);
    case kStreamS3: return launch_stream<Weights, 4, 3>(op, weights, p.x, p.y, p.batch, p.rows, p.cols, stream);
    case kStreamW8: return launch_stream<Weights, 8, 4>(op, weights, p.x, p.y, p.batch, p.rows, p.cols, stream);
  }
  return ffi::Error::Success();
}

// ---- argument checks shared by the three handlers

std::string dims_text(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

bool dims_are(ffi::Span<const int64_t> dims, std::initializer_list<int64_t> want) {
  if (dims.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t d : want) {
    if (dims[i++] != d) return false;
  }
  return true;
}

// Checks x, the output and the variant against a weight of `rows` x `cols`, and fills `p`.
ffi::Error check_problem(const char* op, ffi::Buffer<ffi::BF16> x, ffi::Span<const int64_t> w_dims,
                         ffi::Result<ffi::Buffer<ffi::BF16>>& y, int32_t variant, Problem& p) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return invalid_argument(op, "x must be [batch, C], got " + dims_text(xd));
  if (w_dims.size() != 2) return invalid_argument(op, "the weight must be [R, C], got " + dims_text(w_dims));
  const int64_t batch = xd[0], cols = xd[1], rows = w_dims[0];
  if (w_dims[1] != cols) {
    return invalid_argument(op, "x " + dims_text(xd) + " and the weight " + dims_text(w_dims) + " differ in C");
  }
  if (batch < 1 || batch > kMaxBatch) {
    return invalid_argument(op, "batch " + std::to_string(batch) + " is outside the GEMV kernels' 1 to 16");
  }
  if (cols < kStepCols || cols % kStepCols != 0) {
    return invalid_argument(op, "C = " + std::to_string(cols) + " is not a positive multiple of 64");
  }
  if (rows > INT32_MAX || cols > INT32_MAX) {
    return invalid_argument(op, "the weight " + dims_text(w_dims) + " is too large");
  }
  if (variant < kMma || variant > kLastVariant) {
    return invalid_argument(op, "unknown variant " + std::to_string(variant));
  }
  if (is_fma_variant(variant) && batch > kMaxFmaBatch) {
    return invalid_argument(op, "the fma variants take batches up to 4, got " + std::to_string(batch));
  }
  if (is_stream_variant(variant)) {
    int device = 0, major = 0, minor = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    if (major != 9 || minor != 0) {
      return invalid_argument(op, "the stream variants need a Hopper GPU (sm_90a); this device is sm_" +
                                      std::to_string(major) + std::to_string(minor));
    }
  }
  if (is_row_variant(variant) && cols > kRowMaxCols) {
    return invalid_argument(op, "the rows variants take C up to " + std::to_string(kRowMaxCols) + ", got " +
                                    std::to_string(cols));
  }
  if (!dims_are(y->dimensions(), {batch, rows})) {
    return invalid_argument(op, "the output is " + dims_text(y->dimensions()) + ", expected [" +
                                    std::to_string(batch) + ", " + std::to_string(rows) + "]");
  }
  if (!is_aligned16(x.untyped_data())) return invalid_argument(op, "x must be 16-byte aligned");
  p = Problem{x.typed_data(), y->typed_data(), int(batch), int(rows), int(cols)};
  return ffi::Error::Success();
}

constexpr char kPaletteOp[] = "unweight_gemv_palette";
constexpr char kExponentOp[] = "unweight_gemv_exponent";
constexpr char kBf16Op[] = "unweight_gemv_bf16";

ffi::Error GemvPalette(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U8> palette,
                       ffi::Buffer<ffi::U8> idx, ffi::Buffer<ffi::U8> sm, ffi::Buffer<ffi::U32> esc_mask,
                       ffi::Buffer<ffi::U32> esc_prefix, ffi::Buffer<ffi::U8> esc_exp,
                       ffi::Result<ffi::Buffer<ffi::BF16>> y, int32_t variant) {
  const char* op = kPaletteOp;
  Problem p;
  if (auto err = check_problem(op, x, sm.dimensions(), y, variant, p); err.failure()) return err;
  const int64_t rows = p.rows, cols = p.cols, words = escape_words_per_row(cols);
  if (palette.element_count() != kPaletteSize) {
    return invalid_argument(op, "palette has " + std::to_string(palette.element_count()) + " entries, expected 16");
  }
  if (!dims_are(idx.dimensions(), {rows, cols / 2})) {
    return invalid_argument(op, "idx is " + dims_text(idx.dimensions()) + ", expected [" + std::to_string(rows) + ", " +
                                    std::to_string(cols / 2) + "]");
  }
  for (const auto* part : {&esc_mask, &esc_prefix}) {
    if (!dims_are(part->dimensions(), {rows, words})) {
      return invalid_argument(op, std::string(part == &esc_mask ? "esc_mask" : "esc_prefix") + " is " +
                                      dims_text(part->dimensions()) + ", expected [" + std::to_string(rows) + ", " +
                                      std::to_string(words) + "]");
    }
  }
  const auto ed = esc_exp.dimensions();
  if (ed.size() != 2 || ed[1] != kGroup) {
    return invalid_argument(op, "esc_exp must be [n_esc, 64], got " + dims_text(ed));
  }
  if (!is_aligned16(palette.untyped_data()) || !is_aligned16(idx.untyped_data()) || !is_aligned16(sm.untyped_data()) ||
      (ed[0] > 0 && !is_aligned16(esc_exp.untyped_data()))) {
    return invalid_argument(op, "palette, idx, sm and esc_exp must be 16-byte aligned");
  }
  if (rows == 0) return ffi::Error::Success();
  const PaletteWeights weights{palette.typed_data(),    idx.typed_data(),     sm.typed_data(), esc_mask.typed_data(),
                               esc_prefix.typed_data(), esc_exp.typed_data(), cols,            words};
  if (auto err = launch(op, weights, p, variant, stream); err.failure()) return err;
  return launch_status(op);
}

ffi::Error GemvExponent(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U8> exp,
                        ffi::Buffer<ffi::U8> sm, ffi::Result<ffi::Buffer<ffi::BF16>> y, int32_t variant) {
  const char* op = kExponentOp;
  Problem p;
  if (auto err = check_problem(op, x, sm.dimensions(), y, variant, p); err.failure()) return err;
  if (!dims_are(exp.dimensions(), {p.rows, p.cols})) {
    return invalid_argument(op, "exp is " + dims_text(exp.dimensions()) + ", sm " + dims_text(sm.dimensions()));
  }
  if (!is_aligned16(exp.untyped_data()) || !is_aligned16(sm.untyped_data())) {
    return invalid_argument(op, "exp and sm must be 16-byte aligned");
  }
  if (p.rows == 0) return ffi::Error::Success();
  if (auto err = launch(op, ExponentWeights{exp.typed_data(), sm.typed_data(), p.cols}, p, variant, stream);
      err.failure()) {
    return err;
  }
  return launch_status(op);
}

ffi::Error GemvBf16(cudaStream_t stream, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                    ffi::Result<ffi::Buffer<ffi::BF16>> y, int32_t variant) {
  const char* op = kBf16Op;
  Problem p;
  if (auto err = check_problem(op, x, w.dimensions(), y, variant, p); err.failure()) return err;
  if (!is_aligned16(w.untyped_data())) return invalid_argument(op, "w must be 16-byte aligned");
  if (p.rows == 0) return ffi::Error::Success();
  if (auto err = launch(op, Bf16Weights{w.typed_data(), p.cols}, p, variant, stream); err.failure()) return err;
  return launch_status(op);
}

}  // namespace
}  // namespace unweight::cuda

namespace ffi = xla::ffi;

// Each handler only launches one kernel on XLA's stream (no host sync, no allocation): graph-safe.
XLA_FFI_DEFINE_HANDLER_SYMBOL(UwGemvPaletteCuda, unweight::cuda::GemvPalette,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [B, C]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // palette: the 16 exponents
                                  .Arg<ffi::Buffer<ffi::U8>>()    // idx [R, C / 2]: 4-bit indices
                                  .Arg<ffi::Buffer<ffi::U8>>()    // sm [R, C]: sign+mantissa bytes
                                  .Arg<ffi::Buffer<ffi::U32>>()   // esc_mask [R, ceil(G / 32)]
                                  .Arg<ffi::Buffer<ffi::U32>>()   // esc_prefix [R, ceil(G / 32)]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // esc_exp [n_esc, 64]
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // y [B, R]
                                  .Attr<int32_t>("variant"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(UwGemvExponentCuda, unweight::cuda::GemvExponent,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [B, C]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // exp [R, C]: exponent bytes
                                  .Arg<ffi::Buffer<ffi::U8>>()    // sm [R, C]: sign+mantissa bytes
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // y [B, R]
                                  .Attr<int32_t>("variant"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(UwGemvBf16Cuda, unweight::cuda::GemvBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [B, C]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w [R, C]
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // y [B, R]
                                  .Attr<int32_t>("variant"),
                              {ffi::Traits::kCmdBufferCompatible});
