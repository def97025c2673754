// The streaming GEMV (Hopper): y[B, R] = x[B, C] @ W[R, C]^T for batches up to 16, the weight
// moved by TMA (cp.async.bulk.tensor, 2-D boxes) through a ring of stages in shared memory,
// multiplied on the tensor cores (mma.sync m16n8k16, fp32 accumulation), y rounded to bf16.
// Included by gemv.cu only.
//
// Why: the register-streaming kernels of gemv.cu hold their loads in flight in registers, which
// caps their occupancy (mma_acc4: 242 registers, 12.5 %); here one producer warp asks for a
// whole stage with a few copies, which need no registers to be in flight, and the consumer warps
// only read shared memory and compute. The number of copies, not their bytes, set the pace of
// the first version (one 1-D bulk copy per row and array, 32 per stage; under Nsight Compute on
// the 8B gate matrix at batch 1, benchmarks/results/gemv_stream_profile-h100.txt: 42.7 us against
// 41.3 us for gemv.cu's rows2), so a stage is now one 2-D box per array: 16 rows x 1 KB. With
// the boxes (gemv_stream_tma_profile-h100.txt) stream_w8 takes 39.5 us on that matrix and 40.1 us
// on the down matrix (rows2: 41.3 and 39.0); its palette form reaches 68 % of DRAM peak where the
// bf16 twin reaches 83 %: one block of 9 warps fits an SM (112 registers, 114 KB) and the rebuild's
// latency shows. Capping registers at 80 for two or three blocks an SM spilled and was slower
// (gemv_stream_capped_profile-h100.txt).
//
// Work split. A block is persistent: it takes tiles of 16 rows (tile, tile + grid, ...). A stage
// holds kStreamCols columns (16 escape groups) of the tile's 16 rows: producer lane 0 loads the
// boxes (sign+mantissa bytes and indices, for the palette form); producer lane r copies its row's
// first kStageEscapes escape groups' exponents (the consumers read any others from global memory)
// and writes a header: the stage's escape bits of the row and the esc_exp slot of its first
// escape. Consumer warp w takes steps (groups of 64 columns) [w 16 / W, (w + 1) 16 / W) of every
// stage with the lane layout of gemv.cu's mma kernel: lane (g, t) rebuilds columns [16 t, 16 t +
// 16) of the step for rows g and g + 8 and feeds them to four mma with x read straight from
// global memory (L1). The boxes land dense, rows 1 KB (indices: 512 B) apart, so rows g and g + 1
// read the same banks: a 2-way conflict (4-way for the indices), which costs shared-memory cycles
// the kernel has to spare at HBM speed. At the end of a tile the warps' partial sums are added in
// warp order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ffi_support.cuh"
#include "gemm_sm90_ptx.cuh"
#include "gemv_weights.cuh"
#include "tma_map.cuh"
#include "unweight/format.h"

namespace unweight::cuda {
namespace {

constexpr int kStreamCols = 1024;  // columns of a stage: 16 escape groups
constexpr int kStreamGroups = kStreamCols / kGroup;
constexpr int kStreamRows = 16;  // rows of a tile: the mma's M
constexpr int kStageEscapes = 2;  // escape groups of a row held in a stage (real weights: 0.05 to 0.3)
static_assert(kEscWordBits % kStreamGroups == 0, "a stage's groups must lie in one escape mask word");

#if UW_SM90A
__device__ __forceinline__ void bulk_load_hinted(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar,
                                                 uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          dst),
      "l"(src), "r"(bytes), "r"(bar), "l"(policy)
      : "memory");
}
// One box of a 2-D tensor map (c0: the inner coordinate, in elements), with an L2 cache policy.
__device__ __forceinline__ void tma_load_2d_hinted(uint32_t dst, const CUtensorMap* map, int32_t c0, int32_t c1,
                                                   uint32_t bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "l"(policy)
      : "memory");
}
__device__ __forceinline__ void sts64(uint32_t addr, uint32_t a, uint32_t b) {
  asm volatile("st.shared.v2.b32 [%0], {%1, %2};" ::"r"(addr), "r"(a), "r"(b) : "memory");
}
#endif

// The tensor maps of a call: the weight's one or two arrays, each read in boxes of kStreamRows
// rows by kStreamCols columns (viewed as u32, so that a box row can be 1 KB).
struct StreamMaps {
  CUtensorMap a, b;
};

// A weight array [rows, row_bytes] read in boxes of kStreamRows rows x box_bytes, as u32 words
// (a box row of u8 could hold only 256 bytes).
inline ffi::Error stream_map(const char* op, const char* what, CUtensorMap* map, const void* base, int64_t row_bytes,
                             int64_t rows, int box_bytes) {
  return encode_map(op, what, map, CU_TENSOR_MAP_DATA_TYPE_UINT32, 4, base, row_bytes / 4, rows, box_bytes / 4,
                    kStreamRows, CU_TENSOR_MAP_SWIZZLE_NONE);
}

// What a stage holds of a tile in each resident form (kBytes per row: the form's arrays one after
// the other, each [kStreamRows][its bytes per row], dense as the TMA writes them), how the
// producer loads it (one box per array, the whole tile stage in two copies) and how a consumer
// lane reads row r's 16 weights from column `col` (a multiple of 16) as the form's Lane, which
// Weights::rebuild_lane turns into pairs. Boxes hanging over the last row or column are filled
// with zeros; those rows are never stored and those columns never multiplied.
template <class Weights>
struct StreamRow;

template <>
struct StreamRow<PaletteWeights> {
  static constexpr int kBytes = kStreamCols + kStreamCols / 2;  // sign+mantissa bytes, then indices
  static constexpr int kIdxOff = kStreamRows * kStreamCols;
  static constexpr int kMaps = 2;
  static ffi::Error encode(const char* op, const PaletteWeights& w, int64_t rows, StreamMaps& maps) {
    if (auto err = stream_map(op, "sm", &maps.a, w.sm, w.cols, rows, kStreamCols); err.failure()) return err;
    return stream_map(op, "idx", &maps.b, w.idx, w.cols / 2, rows, kStreamCols / 2);
  }
#if UW_SM90A
  __device__ static void load(const StreamMaps& maps, uint32_t stage, int row0, int c0, int cols, uint32_t bar,
                              uint64_t policy) {
    sm90::mbar_expect_tx(bar, kStreamRows * kBytes);
    tma_load_2d_hinted(stage, &maps.a, c0 / 4, row0, bar, policy);
    tma_load_2d_hinted(stage + kIdxOff, &maps.b, c0 / 8, row0, bar, policy);
  }
  __device__ static PaletteWeights::Lane read(uint32_t stage, int r, int col) {
    return {sm90::lds128(stage + r * kStreamCols + col), sm90::lds64(stage + kIdxOff + r * (kStreamCols / 2) + col / 2)};
  }
#endif
};

template <>
struct StreamRow<ExponentWeights> {
  static constexpr int kBytes = 2 * kStreamCols;  // exponent bytes, then sign+mantissa bytes
  static constexpr int kSmOff = kStreamRows * kStreamCols;
  static constexpr int kMaps = 2;
  static ffi::Error encode(const char* op, const ExponentWeights& w, int64_t rows, StreamMaps& maps) {
    if (auto err = stream_map(op, "exp", &maps.a, w.exp, w.cols, rows, kStreamCols); err.failure()) return err;
    return stream_map(op, "sm", &maps.b, w.sm, w.cols, rows, kStreamCols);
  }
#if UW_SM90A
  __device__ static void load(const StreamMaps& maps, uint32_t stage, int row0, int c0, int cols, uint32_t bar,
                              uint64_t policy) {
    sm90::mbar_expect_tx(bar, kStreamRows * kBytes);
    tma_load_2d_hinted(stage, &maps.a, c0 / 4, row0, bar, policy);
    tma_load_2d_hinted(stage + kSmOff, &maps.b, c0 / 4, row0, bar, policy);
  }
  __device__ static ExponentWeights::Lane read(uint32_t stage, int r, int col) {
    return {sm90::lds128(stage + r * kStreamCols + col), sm90::lds128(stage + kSmOff + r * kStreamCols + col)};
  }
#endif
};

// The bf16 twin: a box row holds 512 columns (1 KB), so a stage is two boxes, [16][512] each; the
// second is left out where the row ends before it.
template <>
struct StreamRow<Bf16Weights> {
  static constexpr int kBytes = 2 * kStreamCols;
  static constexpr int kHalfCols = kStreamCols / 2;
  static constexpr int kHalfOff = kStreamRows * kStreamCols;
  static constexpr int kMaps = 1;
  static ffi::Error encode(const char* op, const Bf16Weights& w, int64_t rows, StreamMaps& maps) {
    return stream_map(op, "w", &maps.a, w.w, 2 * w.cols, rows, 2 * kHalfCols);
  }
#if UW_SM90A
  __device__ static void load(const StreamMaps& maps, uint32_t stage, int row0, int c0, int cols, uint32_t bar,
                              uint64_t policy) {
    const bool second = c0 + kHalfCols < cols;
    sm90::mbar_expect_tx(bar, (second ? 2 : 1) * kHalfOff);
    tma_load_2d_hinted(stage, &maps.a, c0 / 2, row0, bar, policy);
    if (second) tma_load_2d_hinted(stage + kHalfOff, &maps.a, (c0 + kHalfCols) / 2, row0, bar, policy);
  }
  __device__ static Bf16Weights::Lane read(uint32_t stage, int r, int col) {
    const int half = col / kHalfCols;
    const uint32_t at = stage + half * kHalfOff + r * kStreamCols + 2 * (col - half * kHalfCols);
    return {sm90::lds128(at), sm90::lds128(at + 16)};
  }
#endif
};

// Shared memory of one block: S stages of [16 rows][kBytes], then (palette form) the escape
// slots [16][kStageEscapes][64] and the headers [16] x {escape bits, first slot}; then the
// consumer warps' partial sums (two tiles' worth, so that a tile's can be written while warp 0
// still adds the previous one's); then the S "full" and S "empty" mbarriers.
template <class Weights, int NT, int W, int S>
struct StreamLayout {
  static constexpr int kRows = kStreamRows;
  static constexpr int kEscOff = kRows * StreamRow<Weights>::kBytes;
  static constexpr int kHeaderOff = kEscOff + (Weights::kEscapes ? kRows * kStageEscapes * kGroup : 0);
  static constexpr int kStageBytes = (kHeaderOff + (Weights::kEscapes ? kRows * 8 : 0) + 127) / 128 * 128;
  static constexpr int kValues = NT * 4;  // a lane's sums: 4 per tile of 8 batch rows
  static constexpr int kPartialOff = S * kStageBytes;
  static constexpr int kPartialBytes = 2 * (W - 1) * kValues * kLanes * 4;
  static constexpr int kBarOff = kPartialOff + kPartialBytes;
  static constexpr int kSmemBytes = kBarOff + 2 * S * 8;
  static constexpr int kThreads = (W + 1) * kLanes;  // W consumer warps and the producer warp
  static constexpr int kStageSteps = kStreamGroups / W;  // steps of 64 columns per consumer warp and stage
  static_assert(kStreamGroups % W == 0, "the consumer warps split a stage's steps evenly");
};

template <int S>
struct StreamRing {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == S) {
      stage = 0;
      phase ^= 1;
    }
  }
};

#if UW_SM90A
// Producer lane `lane` < kRows: for each tile, row tile * kRows + lane, stage by stage. The
// escape mask word of the next 4 stages is loaded 4 stages before it is needed.
template <class Weights, int NT, int W, int S>
__device__ __forceinline__ void stream_produce(const Weights& weights, const StreamMaps& maps, uint32_t smem, int lane,
                                               int rows, int cols) {
  using L = StreamLayout<Weights, NT, W, S>;
  const int tiles = (rows + L::kRows - 1) / L::kRows, stages = (cols + kStreamCols - 1) / kStreamCols;
  const uint64_t policy = evict_first_policy();
  auto row_of = [&](int tile) { return min(int64_t(tile) * L::kRows + lane, int64_t(rows) - 1); };
  const int groups = int(groups_per_row(cols));
  uint2 word = make_uint2(0, 0), next = make_uint2(0, 0);
  if constexpr (Weights::kEscapes) {
    if (blockIdx.x < tiles) next = weights.escape_words(row_of(blockIdx.x), 0);
  }
  StreamRing<S> ring;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row = row_of(tile);
    for (int s = 0; s < stages; ++s, ring.advance()) {
      const uint32_t stage = smem + ring.stage * L::kStageBytes;
      const uint32_t full = smem + L::kBarOff + 8 * ring.stage, empty = full + 8 * S;
      sm90::mbar_wait(empty, ring.phase ^ 1);
      const int c0 = s * kStreamCols;
      if (lane == 0) StreamRow<Weights>::load(maps, stage, tile * L::kRows, c0, cols, full, policy);
      if constexpr (Weights::kEscapes) {
        const int g0 = c0 / kGroup, bit = g0 % kEscWordBits;
        if (bit == 0) {  // the row's next mask word: take the prefetched one, prefetch the one after
          word = next;
          const int g_next = g0 + kEscWordBits;
          if (g_next < groups) {
            next = weights.escape_words(row, g_next);
          } else if (tile + int(gridDim.x) < tiles) {
            next = weights.escape_words(row_of(tile + gridDim.x), 0);
          }
        }
        const uint32_t bits = kStreamGroups == kEscWordBits ? word.x : (word.x >> bit) & ((1u << kStreamGroups) - 1u), first = escape_slot(word.x, word.y, bit);
        sts64(stage + L::kHeaderOff + 8 * lane, bits, first);
        const int held = min(int(__popc(bits)), kStageEscapes);
        sm90::mbar_expect_tx(full, held * kGroup);
        for (int k = 0; k < held; ++k) {
          bulk_load_hinted(stage + L::kEscOff + (lane * kStageEscapes + k) * kGroup,
                           weights.esc_exp + int64_t(first + k) * kGroup, kGroup, full, policy);
        }
      }
      sm90::mbar_arrive(full);  // after the header and the expect_tx: its release publishes both
    }
  }
}

// Consumer warp `warp`: steps [warp kStageSteps, +kStageSteps) of every stage of each tile. ACC
// accumulator sets take a step's four mma in turn (four short dependent chains, not one long).
template <class Weights, int NT, int W, int S>
__device__ __forceinline__ void stream_consume(const Weights& weights, uint32_t smem, int warp, int lane,
                                               const uint16_t* __restrict__ x, uint16_t* __restrict__ y, int batch,
                                               int rows, int cols) {
  using L = StreamLayout<Weights, NT, W, S>;
  constexpr int ACC = 4;
  const int tiles = (rows + L::kRows - 1) / L::kRows, stages = (cols + kStreamCols - 1) / kStreamCols;
  const auto table = weights.table();
  const uint64_t policy = evict_first_policy();
  const int g = lane / 4, t = lane % 4;
  const uint16_t* x_lane[NT];
  bool x_valid[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int b = 8 * nt + g;
    x_valid[nt] = b < batch;
    x_lane[nt] = x + int64_t(x_valid[nt] ? b : 0) * cols + kLaneCols * t;
  }
  StreamRing<S> ring;
  uint32_t parity = 0;  // which half of the partial-sum area this tile uses
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x, parity ^= 1) {
    float acc[NT][ACC][4] = {};
    for (int s = 0; s < stages; ++s, ring.advance()) {
      const uint32_t stage = smem + ring.stage * L::kStageBytes;
      const uint32_t full = smem + L::kBarOff + 8 * ring.stage, empty = full + 8 * S;
      const int first_col = s * kStreamCols + warp * L::kStageSteps * kGroup;  // of the warp's first step
      // The warp's steps in chunks of kChunk: a chunk's shared-memory reads are all issued before
      // any is used, and x of the next chunk is loaded before this one is multiplied (x of the
      // first before the wait: it does not depend on the stage).
      constexpr int kChunk = L::kStageSteps < 2 ? L::kStageSteps : 2;
      auto load_xs = [&](Pairs (&xs)[kChunk][NT], int i0) {
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          const int col = first_col + (i0 + i) * kGroup;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) xs[i][nt] = load_x16(x_lane[nt] + col, x_valid[nt] && col < cols);
        }
      };
      Pairs xs[kChunk][NT];
      load_xs(xs, 0);
      sm90::mbar_wait(full, ring.phase);
      uint2 header[2] = {};
      if constexpr (Weights::kEscapes) {
#pragma unroll
        for (int h = 0; h < 2; ++h) header[h] = sm90::lds64(stage + L::kHeaderOff + 8 * (g + 8 * h));
      }
#pragma unroll
      for (int i0 = 0; i0 < L::kStageSteps; i0 += kChunk) {
        if (first_col + i0 * kGroup >= cols) break;  // the row's last stage may be partial
        typename Weights::Lane raw[kChunk][2];
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          const int col = (warp * L::kStageSteps + i0 + i) * kGroup + kLaneCols * t;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            raw[i][h] = StreamRow<Weights>::read(stage, g + 8 * h, col);
          }
        }
        Pairs xs_next[kChunk][NT];
        if (i0 + kChunk < L::kStageSteps) load_xs(xs_next, i0 + kChunk);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          const int u = warp * L::kStageSteps + i0 + i;  // the step's group in the stage
          if (first_col + (i0 + i) * kGroup >= cols) break;
          Pairs w[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            bool escaped = false;
            uint4 verbatim = make_uint4(0, 0, 0, 0);
            if constexpr (Weights::kEscapes) {
              escaped = (header[h].x >> u) & 1u;
              if (escaped) {  // rare: 0.3 to 1.7 % of groups on real weights
                const uint32_t k = __popc(header[h].x & ((1u << u) - 1u));
                const int r = g + 8 * h;
                verbatim =
                    k < kStageEscapes
                        ? sm90::lds128(stage + L::kEscOff + (r * kStageEscapes + k) * kGroup + kLaneCols * t)
                        : load_weights16(weights.esc_exp + int64_t(header[h].y + k) * kGroup + kLaneCols * t, policy);
              }
            }
            w[h] = weights.rebuild_lane(raw[i][h], table, escaped, verbatim);
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              mma_bf16(acc[nt][j % ACC], w[0].w[2 * j], w[1].w[2 * j], w[0].w[2 * j + 1], w[1].w[2 * j + 1],
                       xs[i][nt].w[2 * j], xs[i][nt].w[2 * j + 1]);
            }
          }
        }
        if (i0 + kChunk < L::kStageSteps) {
#pragma unroll
          for (int i = 0; i < kChunk; ++i) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) xs[i][nt] = xs_next[i][nt];
          }
        }
      }
      sm90::mbar_arrive(empty);  // every consumer thread: its own reads of the stage are done
    }

    // The tile's sums: accumulator sets, then warps, in a fixed order.
    float sum[L::kValues];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        sum[4 * nt + i] = acc[nt][0][i];
#pragma unroll
        for (int a = 1; a < ACC; ++a) sum[4 * nt + i] += acc[nt][a][i];
      }
    }
    const uint32_t partial = smem + L::kPartialOff + parity * (L::kPartialBytes / 2);
    if (warp > 0) {
#pragma unroll
      for (int v = 0; v < L::kValues; ++v) sm90::sts32(partial + (((warp - 1) * L::kValues + v) * kLanes + lane) * 4, __float_as_uint(sum[v]));
    }
    // The consumers only (the producer warp never joins): warp 0 reads what the others wrote.
    asm volatile("bar.sync 1, %0;" ::"n"(W * kLanes) : "memory");
    if (warp > 0) continue;
    for (int w = 1; w < W; ++w) {
#pragma unroll
      for (int v = 0; v < L::kValues; ++v) sum[v] += __uint_as_float(sm90::lds32(partial + (((w - 1) * L::kValues + v) * kLanes + lane) * 4));
    }
    // sum[4 nt + i]: (row g, batch 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1) of batch tile nt.
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t r = int64_t(tile) * L::kRows + 8 * (i / 2) + g;
        const int b = 8 * nt + 2 * t + i % 2;
        if (r < rows && b < batch) y[int64_t(b) * rows + r] = to_bf16(sum[4 * nt + i]);
      }
    }
  }
}
#endif  // UW_SM90A

template <class Weights, int NT, int W, int S>
__global__ void __launch_bounds__(StreamLayout<Weights, NT, W, S>::kThreads)
    gemv_stream_kernel(Weights weights, const __grid_constant__ StreamMaps maps, const uint16_t* __restrict__ x,
                       uint16_t* __restrict__ y, int batch, int rows, int cols) {
#if UW_SM90A
  using L = StreamLayout<Weights, NT, W, S>;
  extern __shared__ __align__(128) uint8_t stream_smem[];
  const uint32_t smem = sm90::smem_u32(stream_smem);
  const int warp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      sm90::mbar_init(smem + L::kBarOff + 8 * s, L::kRows);          // full: one arrive per producer lane
      sm90::mbar_init(smem + L::kBarOff + 8 * (S + s), W * kLanes);  // empty: every consumer thread
    }
    sm90::fence_mbar_init();
  }
  if (threadIdx.x == W * kLanes) {
    sm90::prefetch_tensormap(&maps.a);
    if (StreamRow<Weights>::kMaps > 1) sm90::prefetch_tensormap(&maps.b);
  }
  __syncthreads();
  if (warp == W) {
    if (lane < L::kRows) stream_produce<Weights, NT, W, S>(weights, maps, smem, lane, rows, cols);
  } else {
    stream_consume<Weights, NT, W, S>(weights, smem, warp, lane, x, y, batch, rows, cols);
  }
#endif
}

// Launches on a persistent grid: as many blocks as are resident at once, at most one per tile.
// The caller has checked that the device is a Hopper GPU; a failure of the shared-memory
// reservation or of the launch is left for launch_status to report.
template <class Weights, int NT, int W, int S>
void launch_stream_kernel(const Weights& weights, const StreamMaps& maps, const uint16_t* x, uint16_t* y, int batch,
                          int rows, int cols, cudaStream_t stream) {
  using L = StreamLayout<Weights, NT, W, S>;
  auto* kernel = &gemv_stream_kernel<Weights, NT, W, S>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kSmemBytes) != cudaSuccess) return;
  const int64_t tiles = (int64_t(rows) + L::kRows - 1) / L::kRows;
  kernel<<<resident_grid(kernel, L::kThreads, L::kSmemBytes, tiles), L::kThreads, L::kSmemBytes, stream>>>(
      weights, maps, x, y, batch, rows, cols);
}

// One tile of 8 batch rows up to batch 8, two above (missing rows of x read as zero, never stored).
template <class Weights, int W, int S>
ffi::Error launch_stream(const char* op, const Weights& weights, const uint16_t* x, uint16_t* y, int batch, int rows,
                         int cols, cudaStream_t stream) {
  StreamMaps maps{};
  if (auto err = StreamRow<Weights>::encode(op, weights, rows, maps); err.failure()) return err;
  if (batch <= 8) {
    launch_stream_kernel<Weights, 1, W, S>(weights, maps, x, y, batch, rows, cols, stream);
  } else {
    launch_stream_kernel<Weights, 2, W, S>(weights, maps, x, y, batch, rows, cols, stream);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace unweight::cuda
