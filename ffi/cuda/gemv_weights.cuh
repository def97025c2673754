// The weight sources of the GEMV kernels (gemv.cu, gemv_stream.cuh): how a lane's 16 weights
// of a row are read in each resident form and rebuilt into the bf16 pairs that mma.sync and the
// FMA loops take, and the memory-access helpers they use. Included by gemv.cu only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "byte_pack.cuh"
#include "gemv_fragment.cuh"
#include "unweight/format.h"

namespace unweight::cuda {
namespace {

constexpr int kStepCols = kGroup;  // columns of a row per warp step: one escape group
constexpr int kLaneCols = 16;      // columns of a row per lane and step

// ---- memory access

// The weights are read once per call: they bypass L1 and go first when L2 evicts, which keeps
// x (read by every block) in both.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ uint4 load_weights16(const void* p, uint64_t policy) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p), "l"(policy));
  return v;
}

__device__ __forceinline__ uint2 load_weights8(const void* p, uint64_t policy) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v2.u32 {%0, %1}, [%2], %3;"
               : "=r"(v.x), "=r"(v.y)
               : "l"(p), "l"(policy));
  return v;
}

// Loads only where `pred` holds, leaving v as it was elsewhere: a predicated load, not a branch
// (a branch between a chunk's loads and their use lets ptxas sink the loads past it).
__device__ __forceinline__ void load_weights16_if(bool pred, const void* p, uint64_t policy, uint4& v) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %4, 0;\n"
      " @p ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%5], %6;\n}\n"
      : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
      : "r"(int(pred)), "l"(p), "l"(policy));
}

// ---- register fragments

// Sixteen consecutive columns as eight bf16 pairs: w[2j] = columns (4j, 4j+2), w[2j+1] =
// (4j+1, 4j+3) (gemv_fragment.cuh).
struct Pairs {
  uint32_t w[8];
};

__device__ __forceinline__ void set_pairs(Pairs& p, int i, gemv::PairWords q) {
  p.w[2 * i] = q.even;
  p.w[2 * i + 1] = q.odd;
}

// From 16 exponent bytes and 16 sign+mantissa bytes.
__device__ __forceinline__ Pairs join16(uint4 e, uint4 sm) {
  Pairs p;
  set_pairs(p, 0, gemv::join_bf16_pairs(e.x, sm.x));
  set_pairs(p, 1, gemv::join_bf16_pairs(e.y, sm.y));
  set_pairs(p, 2, gemv::join_bf16_pairs(e.z, sm.z));
  set_pairs(p, 3, gemv::join_bf16_pairs(e.w, sm.w));
  return p;
}

// From 16 plain bf16 values (columns 0-7 in lo, 8-15 in hi).
__device__ __forceinline__ Pairs pairs16(uint4 lo, uint4 hi) {
  Pairs p;
  set_pairs(p, 0, gemv::bf16_pairs(lo.x, lo.y));
  set_pairs(p, 1, gemv::bf16_pairs(lo.z, lo.w));
  set_pairs(p, 2, gemv::bf16_pairs(hi.x, hi.y));
  set_pairs(p, 3, gemv::bf16_pairs(hi.z, hi.w));
  return p;
}

__device__ __forceinline__ uint16_t to_bf16(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
__device__ __forceinline__ float low_bf16(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float high_bf16(uint32_t pair) { return __uint_as_float(pair & 0xFFFF0000u); }

// d += a * b for one 16x8x16 tile: a = rows (g, g + 8) x k-slots (2t, 2t+1, 2t+8, 2t+9), b = x.
__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 16 values of x (bf16) as pairs; zero for batch rows past the batch.
__device__ __forceinline__ Pairs load_x16(const uint16_t* p, bool valid) {
  uint4 lo = make_uint4(0, 0, 0, 0), hi = lo;
  if (valid) {
    lo = __ldg(reinterpret_cast<const uint4*>(p));
    hi = __ldg(reinterpret_cast<const uint4*>(p + 8));
  }
  return pairs16(lo, hi);
}

// ---- weight sources: what a lane loads for one row and step, and how it becomes bf16 pairs

// The palette form: 4-bit indices and sign+mantissa bytes, escape groups' exponents verbatim.
struct PaletteWeights {
  const uint8_t* palette;
  const uint8_t* idx;
  const uint8_t* sm;
  const uint32_t* esc_mask;
  const uint32_t* esc_prefix;
  const uint8_t* esc_exp;
  int64_t cols;
  int64_t mask_words;  // esc_mask / esc_prefix words per row

  static constexpr bool kEscapes = true;
  struct Lane {
    uint4 sm;
    uint2 idx;
  };
  struct Table {
    uint4 palette;  // the 16 exponents, one per byte: looked up with PRMT
  };

  __device__ Table table() const { return {__ldg(reinterpret_cast<const uint4*>(palette))}; }

  __device__ Lane load(int64_t row, int64_t col, uint64_t policy) const {
    const int64_t at = row * cols + col;
    return {load_weights16(sm + at, policy), load_weights8(idx + at / 2, policy)};
  }

  // One row's escape groups among the N steps of a chunk.
  struct Escapes {
    uint32_t steps;   // bit u: step step0 + u is an escape group
    uint32_t mask;    // the row's escape mask word holding those steps
    uint32_t prefix;  // and its prefix
    uint4 first;      // this lane's 16 verbatim exponents of the first of them
  };

  // The row's escape mask word over `step`, and its prefix: loaded before the weights, so that
  // the exponents of an escape group can be fetched right after them.
  __device__ uint2 escape_words(int64_t row, int step) const {
    const int64_t at = row * mask_words + step / kEscWordBits;
    return make_uint2(__ldg(esc_mask + at), __ldg(esc_prefix + at));
  }

  __device__ const uint8_t* group_exponents(const Escapes& esc, int step, int t) const {
    return esc_exp + int64_t(escape_slot(esc.mask, esc.prefix, step % kEscWordBits)) * kGroup + kLaneCols * t;
  }

  // Escape groups are rare (0.3 to 1.7 % of groups on real weights), two of a row in one chunk
  // rarer still: the first one's exponents are fetched right after the chunk's weights.
  template <int N>
  __device__ Escapes escapes(uint2 words, int step0, int t, uint64_t policy) const {
    Escapes esc{(words.x >> (step0 % kEscWordBits)) & ((1u << N) - 1u), words.x, words.y, make_uint4(0, 0, 0, 0)};
    const int first = esc.steps ? __ffs(esc.steps) - 1 : 0;
    load_weights16_if(esc.steps != 0, group_exponents(esc, step0 + first, t), policy, esc.first);
    return esc;
  }

  __device__ Pairs rebuild(const Lane& lane, const Table& table, const Escapes& esc, int step0, int u, int t,
                           uint64_t policy) const {
    uint4 e = make_uint4(palette_lookup4(lane.idx.x, table.palette), palette_lookup4(lane.idx.x >> 16, table.palette),
                         palette_lookup4(lane.idx.y, table.palette), palette_lookup4(lane.idx.y >> 16, table.palette));
    const bool escaped = (esc.steps >> u) & 1u;
    const bool first = escaped && (esc.steps & ((1u << u) - 1u)) == 0;
    if (first) e = esc.first;
    // A second escape group of the row in one chunk (~1e-4 of chunks): fetched here, stalling.
    load_weights16_if(escaped && !first, group_exponents(esc, step0 + u, t), policy, e);
    return join16(e, lane.sm);
  }

  // For the row kernel: `verbatim` holds the lane's 16 exponents where its group is an escape.
  __device__ Pairs rebuild_lane(const Lane& lane, const Table& table, bool escaped, uint4 verbatim) const {
    uint4 e = make_uint4(palette_lookup4(lane.idx.x, table.palette), palette_lookup4(lane.idx.x >> 16, table.palette),
                         palette_lookup4(lane.idx.y, table.palette), palette_lookup4(lane.idx.y >> 16, table.palette));
    if (escaped) e = verbatim;
    return join16(e, lane.sm);
  }
};

// Exponent bytes beside sign+mantissa bytes (the `exponent` pipeline).
struct ExponentWeights {
  const uint8_t* exp;
  const uint8_t* sm;
  int64_t cols;

  static constexpr bool kEscapes = false;
  struct Lane {
    uint4 exp;
    uint4 sm;
  };
  struct Table {};

  __device__ Table table() const { return {}; }

  __device__ Lane load(int64_t row, int64_t col, uint64_t policy) const {
    const int64_t at = row * cols + col;
    return {load_weights16(exp + at, policy), load_weights16(sm + at, policy)};
  }

  struct Escapes {};

  __device__ Pairs rebuild(const Lane& lane, const Table&, const Escapes&, int, int, int, uint64_t) const {
    return join16(lane.exp, lane.sm);
  }
  __device__ Pairs rebuild_lane(const Lane& lane, const Table&, bool, uint4) const { return join16(lane.exp, lane.sm); }
};

// Plain bf16: the twin.
struct Bf16Weights {
  const uint16_t* w;
  int64_t cols;

  static constexpr bool kEscapes = false;
  struct Lane {
    uint4 lo;
    uint4 hi;
  };
  struct Table {};

  __device__ Table table() const { return {}; }

  __device__ Lane load(int64_t row, int64_t col, uint64_t policy) const {
    const uint16_t* p = w + row * cols + col;
    return {load_weights16(p, policy), load_weights16(p + 8, policy)};
  }

  struct Escapes {};

  __device__ Pairs rebuild(const Lane& lane, const Table&, const Escapes&, int, int, int, uint64_t) const {
    return pairs16(lane.lo, lane.hi);
  }
  __device__ Pairs rebuild_lane(const Lane& lane, const Table&, bool, uint4) const { return pairs16(lane.lo, lane.hi); }
};

}  // namespace
}  // namespace unweight::cuda
