// The reconstructive tensor-core GEMM for Hopper: y[B, R] = x[B, C] @ W[R, C]^T computed as
// y^T = W x^T, so that the weight, rebuilt to bf16 in registers, is WGMMA's A operand.
//
// One CTA = one producer warpgroup + two consumer warpgroups, persistent over output tiles of
// 128 weight rows x kTileN batch rows (a K range of the tile when split-K is on):
//
//   producer (40 registers): for each 64-wide k-block, TMA copies the compressed weight tile
//     (palette: idx 128x32 B + sm 128x64 B; exponent: exp + sm; twin: bf16 128x128 B) and the
//     x tile (kTileN x 64 bf16, 128-byte swizzle) into the next stage of a ring, plus, for the
//     palette input, the 64 verbatim exponents of each row whose group is an escape group and a
//     128-bit "row escapes" mask. All of it completes one `full` mbarrier. With the palette input
//     all four warps work (32 rows of escapes each, the copies in turn); otherwise warp 0 alone.
//   consumers (232 registers, 64 weight rows each): rebuild the bf16 A fragments of the k-block
//     in registers (palette looked up with PRMT from 4 registers), issue 4 WGMMA m64nNk16 with
//     B = the x tile in shared memory, and hand the stage back through its `empty` mbarrier
//     once those WGMMAs are done. fp32 accumulators live in registers for the whole tile.
//
// The k-loop keeps two register sets of A fragments: k-block i is rebuilt while the WGMMAs of
// k-block i-1 run, and `wgmma.wait_group 1` after issuing i frees the set of i-1.
//
// Rebuilding reads the canonical row-major layouts of FORMAT.md section 3 as TMA lands them.
// Thread (g = lane/4, t = lane%4) of warp w holds rows 16w+g and 16w+g+8 of its warpgroup's 64
// rows and, in k16 step s, columns 16s+2t, 16s+2t+1 ("chunk" 2s) and 16s+8+2t, 16s+8+2t+1
// (chunk 2s+1): the WGMMA A-fragment order, so x needs no permutation. Per row and step that is
// one 16-byte load of sign/mantissa bytes and one 8-byte load of indices (swizzled by TMA, so a
// warp's loads are free of bank conflicts), and two bf16x2 registers out.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <type_traits>

#include "gemm_sm90_ptx.cuh"
#include "unweight/format.h"

namespace unweight::cuda::sm90 {

enum class WeightInput : int { kPalette, kExponent, kBf16 };

constexpr int kTileM = 128;  // weight rows per tile: two consumer warpgroups of 64
constexpr int kTileK = 64;   // one escape group; one 128-byte swizzle row of x
constexpr int kConsumerWarpgroups = 2;
constexpr int kWarpgroupThreads = 128;
constexpr int kThreads = (kConsumerWarpgroups + 1) * kWarpgroupThreads;
constexpr int kProducerRegisters = 40;
constexpr int kConsumerRegisters = 232;  // 40 * 128 + 232 * 256 <= 64K registers
constexpr int kMaxSmem = 227 * 1024;

// One compiled variant: what the weight tile is, the batch tile width and the ring depth.
template <WeightInput kInput, int kTileN, int kStages>
struct GemmConfig {
  static constexpr WeightInput input = kInput;
  static constexpr int tile_n = kTileN;
  static constexpr int stages = kStages;
  static constexpr bool palette = kInput == WeightInput::kPalette;
  // Warps of the producer warpgroup at work: the palette's escape rows keep all four busy.
  static constexpr int producer_warps = palette ? kWarpgroupThreads / 32 : 1;

  // Bytes of one stage's tiles, each a multiple of 1024 so every swizzle atom stays aligned.
  static constexpr int x_bytes = kTileN * kTileK * 2;                                 // bf16 [N][64], 128B swizzle
  static constexpr int idx_bytes = palette ? kTileM * kTileK / 2 : 0;                 // u8 [128][32], 32B swizzle
  static constexpr int exp_bytes = kInput == WeightInput::kExponent ? kTileM * kTileK : 0;  // u8 [128][64], 64B
  static constexpr int sm_bytes = kInput != WeightInput::kBf16 ? kTileM * kTileK : 0;      // u8 [128][64], 64B
  static constexpr int w_bytes = kInput == WeightInput::kBf16 ? kTileM * kTileK * 2 : 0;   // bf16 [128][64], 128B
  static constexpr int esc_bytes = palette ? kTileM * kGroup : 0;  // u8 [128][64]: row r's escape exponents
  static constexpr int tma_bytes = x_bytes + idx_bytes + exp_bytes + sm_bytes + w_bytes;
  static constexpr int stage_bytes = tma_bytes + esc_bytes;

  static constexpr int x_off = 0;
  static constexpr int idx_off = x_off + x_bytes;
  static constexpr int exp_off = idx_off + idx_bytes;
  static constexpr int sm_off = exp_off + exp_bytes;
  static constexpr int w_off = sm_off + sm_bytes;
  static constexpr int esc_off = w_off + w_bytes;

  // After the stages: full[stages] and empty[stages] mbarriers, then per stage a 128-bit mask
  // of the rows whose group in that k-block is an escape group.
  static constexpr int ctrl_off = kStages * stage_bytes;
  static constexpr int full_off = ctrl_off;
  static constexpr int empty_off = ctrl_off + 8 * kStages;
  static constexpr int flags_off = ctrl_off + 16 * kStages;
  static constexpr int ctrl_bytes = 32 * kStages;
  // + 1024: the dynamic shared memory base is aligned up to 1024 bytes by hand.
  static constexpr int smem_bytes = ctrl_off + ctrl_bytes + 1024;

  static_assert(kTileN == 64 || kTileN == 128 || kTileN == 256, "WGMMA N of 64, 128 or 256");
  static_assert(stage_bytes % 1024 == 0, "stages must keep 1024-byte alignment");
  static_assert(smem_bytes <= kMaxSmem, "stages do not fit in shared memory");
};

// Everything a launch needs besides the tensor maps. The host fills it (gemm_sm90.cu).
struct GemmParams {
  const uint8_t* palette;      // u8 [16]                   (palette input)
  const uint32_t* esc_mask;    // u32 [rows, esc_words]     (palette input)
  const uint32_t* esc_prefix;  // u32 [rows, esc_words]     (palette input)
  const uint8_t* esc_exp;      // u8 [n_esc, 64]            (palette input)
  __nv_bfloat16* y;            // bf16 [batch, rows]        (splits == 1)
  float* partial;              // f32 [splits, batch, rows] (splits > 1)
  int rows;
  int batch;
  int esc_words;          // mask words per row: ceil(cols / 64 / 32)
  int kblocks;            // cols / 64
  int n_tiles;            // ceil(batch / tile_n)
  int splits;             // K ranges per output tile
  int kblocks_per_split;  // every split non-empty (the host checks)
  int num_tiles;          // rows / 128 * n_tiles * splits
};

// The output tile number `t` covers: weight rows m0.., batch rows n0.., k-blocks [kb_begin, kb_end).
struct Tile {
  int m0, n0, split, kb_begin, kb_end;
};

__device__ __forceinline__ Tile tile_at(int t, const GemmParams& p, int tile_n) {
  // Splits fastest, then batch tiles: CTAs running at the same time share weight tiles in L2.
  Tile tile;
  tile.split = t % p.splits;
  const int mn = t / p.splits;
  tile.n0 = (mn % p.n_tiles) * tile_n;
  tile.m0 = (mn / p.n_tiles) * kTileM;
  tile.kb_begin = tile.split * p.kblocks_per_split;
  tile.kb_end = min(tile.kb_begin + p.kblocks_per_split, p.kblocks);
  return tile;
}

#if UW_SM90A

// Position in the ring of stages; the phase bit flips each time the ring wraps.
template <int kStages>
struct RingPosition {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// Byte offsets of TMA's swizzled tiles (the chunk index XORed with the row bits of the address;
// tile bases are 1024-byte aligned).
__device__ __forceinline__ uint32_t swz32_offset(int row, int piece8) {  // rows of 32 B, 8-byte piece 0..3
  return row * 32 + 16 * ((piece8 >> 1) ^ ((row >> 2) & 1)) + 8 * (piece8 & 1);
}
__device__ __forceinline__ uint32_t swz64_offset(int row, int chunk16) {  // rows of 64 B, chunk 0..3
  return row * 64 + 16 * (chunk16 ^ ((row >> 1) & 3));
}
__device__ __forceinline__ uint32_t swz128_offset(int row, int chunk16) {  // rows of 128 B, chunk 0..7
  return row * 128 + 16 * (chunk16 ^ (row & 7));
}

// ---------------------------------------------------------------------------------- producer

template <class Cfg>
struct Producer {
  const CUtensorMap* map_x;
  const CUtensorMap* map_w;   // idx (palette), exp (exponent) or w (twin)
  const CUtensorMap* map_sm;  // sm (palette, exponent)
  const GemmParams& p;
  uint32_t smem;
  int warp;  // in the producer warpgroup; palette input: escapes of tile rows 32 warp .. 32 warp + 31
  int lane;

  // The escape index words of this lane's row of the tile, for one mask word (32 k-blocks): their
  // load stalls this warp once per 32 k-blocks, while the copies of the other stages fly.
  struct EscapeWords {
    uint32_t mask;
    uint32_t prefix;
    int word = -1;
  };

  __device__ void run() {
    RingPosition<Cfg::stages> ring;
    for (int t = blockIdx.x; t < p.num_tiles; t += gridDim.x) {
      const Tile tile = tile_at(t, p, Cfg::tile_n);
      EscapeWords esc;
      for (int kb = tile.kb_begin; kb < tile.kb_end; ++kb) {
        const uint32_t full = smem + Cfg::full_off + 8 * ring.stage;
        const uint32_t stage = smem + ring.stage * Cfg::stage_bytes;
        mbar_wait(smem + Cfg::empty_off + 8 * ring.stage, ring.phase ^ 1);
        // The producer warps take turns at the copies, so that no SM sub-partition's consumer warps
        // lose more issue slots than the others' (a warpgroup's WGMMA waits for its slowest warp).
        if (lane == 0 && warp == kb % Cfg::producer_warps) load_tiles(tile, kb, stage, full);
        if constexpr (Cfg::palette) load_escapes(tile, kb, stage, full, ring.stage, esc);
        ring.advance();
      }
    }
  }

  __device__ __forceinline__ void load_tiles(const Tile& tile, int kb, uint32_t stage, uint32_t full) {
    if constexpr (Cfg::palette) {
      mbar_expect_tx(full, Cfg::tma_bytes);  // the escape rows arrive with the counts
    } else {
      mbar_arrive_expect_tx(full, Cfg::tma_bytes);
    }
    tma_load_2d(stage + Cfg::x_off, map_x, kb * kTileK, tile.n0, full);
    if constexpr (Cfg::palette) {
      tma_load_2d(stage + Cfg::idx_off, map_w, kb * kTileK / 2, tile.m0, full);
      tma_load_2d(stage + Cfg::sm_off, map_sm, kb * kTileK, tile.m0, full);
    } else if constexpr (Cfg::input == WeightInput::kExponent) {
      tma_load_2d(stage + Cfg::exp_off, map_w, kb * kTileK, tile.m0, full);
      tma_load_2d(stage + Cfg::sm_off, map_sm, kb * kTileK, tile.m0, full);
    } else {
      tma_load_2d(stage + Cfg::w_off, map_w, kb * kTileK, tile.m0, full);
    }
  }

  // Group kb of this warp's 32 rows: publish which are escape groups (one bit per row, this
  // warp's word of the stage's 128-bit mask), arrive on `full` with their bytes, and bring their
  // 64 verbatim exponents into the stage, row r at esc_off + 64 r. The four producer warps share
  // the work: one warp alone was the kernel's limit (benchmarks/results/gemm_profile-h100.md).
  __device__ __forceinline__ void load_escapes(const Tile& tile, int kb, uint32_t stage, uint32_t full, int ring_stage,
                                               EscapeWords& esc) const {
    const int word = kb / kEscWordBits;
    if (word != esc.word) {
      const int64_t at = int64_t(tile.m0 + 32 * warp + lane) * p.esc_words + word;
      esc.mask = __ldg(p.esc_mask + at);
      esc.prefix = __ldg(p.esc_prefix + at);
      esc.word = word;
    }
    const uint32_t bit = kb % kEscWordBits;
    const bool escaping = (esc.mask >> bit) & 1u;
    const uint32_t rows_escaping = __ballot_sync(0xFFFFFFFFu, escaping);
    if (lane == 0) {
      sts32(smem + Cfg::flags_off + 16 * ring_stage + 4 * warp, rows_escaping);
      mbar_arrive_expect_tx(full, __popc(rows_escaping) * kGroup);  // release: the flags are visible after the wait
    }
    if (rows_escaping != 0) {
      __syncwarp();  // the copies' bytes complete a count already raised
      if (escaping) {
        const uint32_t slot = escape_slot(esc.mask, esc.prefix, bit);
        bulk_load(stage + Cfg::esc_off + (32 * warp + lane) * kGroup, p.esc_exp + int64_t(slot) * kGroup, kGroup, full);
      }
    }
  }
};

// ---------------------------------------------------------------------------------- rebuild

// PRMT: byte i of the result is byte (sel >> 4i) & 7 of {b, a} (a = bytes 0-3). Written out
// because __byte_perm clears bit 3 of every selector nibble with an extra LOP3 whenever the
// compiler cannot prove it clear; no selector here has it set.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// (a & mask) | (b & ~mask) as one LOP3 (the compiler splits it in two when the mask is a constant).
__device__ __forceinline__ uint32_t select_bits(uint32_t mask, uint32_t a, uint32_t b) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xCA;" : "=r"(d) : "r"(mask), "r"(a), "r"(b));
  return d;
}

// Two bf16 (one A register) from sign/mantissa bytes doubled into [s0, s0, s1, s1] and
// exponents at bytes 0 and 2: per 16-bit half, bf16 = (sm & 0x80) << 8 | e << 7 | (sm & 0x7F)
// (FORMAT.md section 1). The shift runs on the FMA pipe, the LOP3 on the ALU pipe.
__device__ __forceinline__ uint32_t join_pair(uint32_t sm_doubled, uint32_t exp_spread) {
  return select_bits(0x807F807Fu, sm_doubled, exp_spread * 128u);
}

// The palette entries of the four 4-bit indices in the low 16 bits of `q` (index j in bits
// 4j..4j+3), entry j in byte j. PRMT picks one of 8 bytes per selector nibble (bit 3 would ask
// for sign replication, so it is cleared): entries 0-7 and 8-15 are looked up apart, then a
// third PRMT keeps per byte the one bit 3 of the index names. As byte_pack.cuh's
// palette_lookup4, with the final selector built by one LOP3: the ALU pipe is this kernel's
// busiest.
__device__ __forceinline__ uint32_t palette_lookup(uint32_t q, uint4 palette) {
  const uint32_t low = q & 0x7777u;
  const uint32_t from_low = prmt(palette.x, palette.y, low);
  const uint32_t from_high = prmt(palette.z, palette.w, low);
  uint32_t pick;  // byte j, or byte j of from_high (j + 4) where bit 3 of index j is set
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(pick) : "r"(q >> 1), "r"(0x4444u), "r"(0x3210u));
  return prmt(from_low, from_high, pick);
}

// Per-thread constants of the rebuild: PRMT selectors that pick this thread's two columns
// (2t, 2t+1) out of an 8-byte chunk of a row.
struct PairSelectors {
  uint32_t sm;   // chunk bytes 2t, 2t, 2t+1, 2t+1 -> the doubled sign/mantissa pair
  uint32_t exp;  // chunk bytes 2t, -, 2t+1, -     -> exponents at bytes 0 and 2
  uint32_t idx;  // byte t of two idx words (= the index byte of columns 2t, 2t+1 of each chunk)
  __device__ __forceinline__ explicit PairSelectors(int t) {
    const uint32_t b = 2 * t;
    sm = b | (b << 4) | ((b + 1) << 8) | ((b + 1) << 12);
    exp = b | ((b + 1) << 8);
    idx = t | ((t + 4) << 4);
  }
};

// The A registers of one row for k16 step s: chunk 2s in .x, chunk 2s+1 in .y.
template <class Cfg>
struct PaletteRows {
  uint4 palette;  // entry i in byte i
  PairSelectors sel;
  __device__ __forceinline__ PaletteRows(const GemmParams& p, int t)
      : palette(__ldg(reinterpret_cast<const uint4*>(p.palette))), sel(t) {}

  template <bool kEscape>
  __device__ __forceinline__ uint2 pair(uint32_t stage, int row, int s) const {
    const uint4 sm = lds128(stage + Cfg::sm_off + swz64_offset(row, s));
    uint32_t e0, e1;
    if constexpr (kEscape) {
      const uint4 e = lds128(stage + Cfg::esc_off + row * kGroup + 16 * s);
      e0 = prmt(e.x, e.y, sel.exp);
      e1 = prmt(e.z, e.w, sel.exp);
    } else {
      const uint2 idx = lds64(stage + Cfg::idx_off + swz32_offset(row, s));
      // four exponents: columns 2t, 2t+1 of chunk 2s, then of chunk 2s+1
      const uint32_t e = palette_lookup(prmt(idx.x, idx.y, sel.idx), palette);
      e0 = prmt(e, 0, 0x0100);
      e1 = prmt(e, 0, 0x0302);
    }
    return make_uint2(join_pair(prmt(sm.x, sm.y, sel.sm), e0), join_pair(prmt(sm.z, sm.w, sel.sm), e1));
  }
};

template <class Cfg>
struct ExponentRows {
  PairSelectors sel;
  __device__ __forceinline__ ExponentRows(const GemmParams&, int t) : sel(t) {}
  __device__ __forceinline__ uint2 pair(uint32_t stage, int row, int s) const {
    const uint4 sm = lds128(stage + Cfg::sm_off + swz64_offset(row, s));
    const uint4 e = lds128(stage + Cfg::exp_off + swz64_offset(row, s));
    return make_uint2(join_pair(prmt(sm.x, sm.y, sel.sm), prmt(e.x, e.y, sel.exp)),
                      join_pair(prmt(sm.z, sm.w, sel.sm), prmt(e.z, e.w, sel.exp)));
  }
};

// The uncompressed twin: the same fragments, loaded as they are.
template <class Cfg>
struct Bf16Rows {
  uint32_t word;  // byte offset of columns 2t, 2t+1 in an 8-column chunk
  __device__ __forceinline__ Bf16Rows(const GemmParams&, int t) : word(4 * t) {}
  __device__ __forceinline__ uint2 pair(uint32_t stage, int row, int s) const {
    return make_uint2(lds32(stage + Cfg::w_off + swz128_offset(row, 2 * s) + word),
                      lds32(stage + Cfg::w_off + swz128_offset(row, 2 * s + 1) + word));
  }
};

// What the consumers rebuild their fragments from.
template <class Cfg>
using RowsOf = std::conditional_t<Cfg::palette, PaletteRows<Cfg>,
                                  std::conditional_t<Cfg::input == WeightInput::kExponent, ExponentRows<Cfg>, Bf16Rows<Cfg>>>;

// ---------------------------------------------------------------------------------- consumer

template <class Cfg>
struct Consumer {
  static constexpr int kAcc = Cfg::tile_n / 2;  // fp32 accumulators per thread (m64 x N / 128)
  using Fragments = uint32_t[4][4];             // [k16 step][register]
  using Rows = RowsOf<Cfg>;

  const GemmParams& p;
  uint32_t smem;
  int warpgroup;  // 0 or 1: rows 64 * warpgroup .. of the tile
  int warp;       // in the warpgroup
  int lane;

  float acc[kAcc];
  Fragments frag[2];

  // This thread's two rows in the tile.
  __device__ __forceinline__ int row0() const { return 64 * warpgroup + 16 * warp + lane / 4; }

  __device__ void run() {
    const Rows rows(p, lane % 4);

    RingPosition<Cfg::stages> ring;
    for (int t = blockIdx.x; t < p.num_tiles; t += gridDim.x) {
      const Tile tile = tile_at(t, p, Cfg::tile_n);
      const int n = tile.kb_end - tile.kb_begin;
      int held = -1;  // the stage whose WGMMAs may still be running
      int i = 0;
      for (; i + 1 < n; i += 2) {
        k_block<0>(ring, i == 0, held, rows);
        k_block<1>(ring, false, held, rows);
      }
      if (i < n) k_block<0>(ring, i == 0, held, rows);
      wgmma_wait<0>();
      release(held);
      store(tile);
    }
  }

  // Every thread arrives: an arrive releases only the arriving thread's own reads of the stage
  // (the PTX memory model; compute-sanitizer's racecheck flags a warp released by one lane).
  __device__ __forceinline__ void release(int stage) { mbar_arrive(smem + Cfg::empty_off + 8 * stage); }

  template <int kSet>
  __device__ __forceinline__ void k_block(RingPosition<Cfg::stages>& ring, bool first, int& held, const Rows& rows) {
    const uint32_t stage = smem + ring.stage * Cfg::stage_bytes;
    mbar_wait(smem + Cfg::full_off + 8 * ring.stage, ring.phase);

    // Rebuild: frag[kSet] was last read by the WGMMAs of k-block i-2, finished by the
    // wait_group 1 of k-block i-1.
    Fragments& a = frag[kSet];
    const int r0 = row0();
    if constexpr (Cfg::palette) {
      // Rows 16w..16w+15 of the warp sit in one 16-bit field of the stage's escape mask: the
      // check is warp-uniform, and k-blocks without escapes (almost all) skip the per-row test.
      const uint32_t flags = lds32(smem + Cfg::flags_off + 16 * ring.stage + 4 * (r0 / 32));
      if (((flags >> (r0 & 16)) & 0xFFFFu) == 0) {
        rebuild_palette<false>(stage, r0, 0, a, rows);
      } else {
        rebuild_palette<true>(stage, r0, flags, a, rows);
      }
    } else {
#pragma unroll
      for (int s = 0; s < 4; ++s) set_step(a[s], rows.pair(stage, r0, s), rows.pair(stage, r0 + 8, s));
    }

#pragma unroll
    for (int s = 0; s < 4; ++s) {
#pragma unroll
      for (int r = 0; r < 4; ++r) fence_operand(a[s][r]);
    }
#pragma unroll
    for (int j = 0; j < kAcc; ++j) fence_operand(acc[j]);
    wgmma_fence();
    const uint64_t desc = smem_desc_k_sw128(stage + Cfg::x_off);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      // K advances 16 elements = 32 bytes = 2 descriptor units inside the swizzle atom
      WgmmaRS<Cfg::tile_n>::mma(acc, a[s], desc + 2 * s, (first && s == 0) ? 0u : 1u);
    }
    wgmma_commit();
    wgmma_wait<1>();
#pragma unroll
    for (int j = 0; j < kAcc; ++j) fence_operand(acc[j]);
    if (held >= 0) release(held);
    held = ring.stage;
    ring.advance();
  }

  // A-fragment registers of step s: (row g, chunk 2s), (row g+8, chunk 2s), (row g, chunk 2s+1),
  // (row g+8, chunk 2s+1).
  __device__ __forceinline__ static void set_step(uint32_t (&a)[4], uint2 lo, uint2 hi) {
    a[0] = lo.x;
    a[1] = hi.x;
    a[2] = lo.y;
    a[3] = hi.y;
  }

  template <bool kAnyEscape>
  __device__ __forceinline__ void rebuild_palette(uint32_t stage, int r0, uint32_t flags, Fragments& a,
                                                  const Rows& rows) const {
    const int r1 = r0 + 8;
    const bool esc0 = kAnyEscape && ((flags >> (r0 & 31)) & 1u);
    const bool esc1 = kAnyEscape && ((flags >> (r1 & 31)) & 1u);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const uint2 lo = esc0 ? rows.template pair<true>(stage, r0, s) : rows.template pair<false>(stage, r0, s);
      const uint2 hi = esc1 ? rows.template pair<true>(stage, r1, s) : rows.template pair<false>(stage, r1, s);
      set_step(a[s], lo, hi);
    }
  }

  // Accumulator j: row g (j % 4 < 2) or g + 8, batch row 8 (j / 4) + 2t + j % 2 of the tile.
  // Full tiles store unconditionally; only the batch tail tests each row.
  __device__ __forceinline__ void store(const Tile& tile) {
#pragma unroll
    for (int j = 0; j < kAcc; ++j) fence_operand(acc[j]);
    const int64_t m = tile.m0 + row0();
    const int n_base = tile.n0 + 2 * (lane % 4);
    const bool full = tile.n0 + Cfg::tile_n <= p.batch;
    if (p.splits == 1) {
      if (full) {
        store_rows<true>(p.y, m, n_base, [](float v) { return __float2bfloat16_rn(v); });
      } else {
        store_rows<false>(p.y, m, n_base, [](float v) { return __float2bfloat16_rn(v); });
      }
    } else {
      float* out = p.partial + int64_t(tile.split) * p.batch * p.rows;
      if (full) {
        store_rows<true>(out, m, n_base, [](float v) { return v; });
      } else {
        store_rows<false>(out, m, n_base, [](float v) { return v; });
      }
    }
  }

  template <bool kFull, class T, class Convert>
  __device__ __forceinline__ void store_rows(T* out, int64_t m, int n_base, Convert convert) const {
#pragma unroll
    for (int j = 0; j < kAcc; ++j) {
      const int n = n_base + 8 * (j / 4) + (j % 2);
      if (kFull || n < p.batch) out[int64_t(n) * p.rows + m + 8 * ((j / 2) % 2)] = convert(acc[j]);
    }
  }
};

#endif  // UW_SM90A

template <class Cfg>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_sm90_kernel(const __grid_constant__ CUtensorMap map_x, const __grid_constant__ CUtensorMap map_w,
                     const __grid_constant__ CUtensorMap map_sm, const __grid_constant__ GemmParams p) {
#if UW_SM90A
  extern __shared__ uint8_t smem_raw[];
  const uint32_t smem = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const int warpgroup = threadIdx.x / kWarpgroupThreads;
  const int warp = (threadIdx.x / 32) % 4;
  const int lane = threadIdx.x % 32;

  if (threadIdx.x == 0) {
    for (int s = 0; s < Cfg::stages; ++s) {
      // the producer's arrives (one per producer warp for the palette input), plus the copies' bytes
      mbar_init(smem + Cfg::full_off + 8 * s, Cfg::producer_warps);
      mbar_init(smem + Cfg::empty_off + 8 * s, kConsumerWarpgroups * kWarpgroupThreads);  // per consumer thread
    }
    fence_mbar_init();
    prefetch_tensormap(&map_x);
    prefetch_tensormap(&map_w);
    if constexpr (Cfg::input != WeightInput::kBf16) prefetch_tensormap(&map_sm);
  }
  __syncthreads();

  if (warpgroup == 0) {
    setmaxnreg_dec<kProducerRegisters>();
    if (warp < Cfg::producer_warps) Producer<Cfg>{&map_x, &map_w, &map_sm, p, smem, warp, lane}.run();
  } else {
    setmaxnreg_inc<kConsumerRegisters>();
    Consumer<Cfg>{p, smem, warpgroup - 1, warp, lane}.run();
  }
#endif
}

// Sums the split-K partials in split order (deterministic) and rounds to bf16: y = sum_s partial[s].
__global__ void sum_splits_kernel(const float4* __restrict__ partial, uint2* __restrict__ y, int64_t n4, int splits);

}  // namespace unweight::cuda::sm90
