// The unweight format v1 (docs/FORMAT.md) as inline functions shared by the C++ codec, the CPU
// FFI handlers and the CUDA kernels, so that the index math is written once and tested on the CPU.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define UW_HD __host__ __device__ __forceinline__
#else
#define UW_HD inline
#endif

namespace unweight {

constexpr int kFormatVersion = 1;
constexpr int kLanes = 32;          // lanes per chunk: one warp decodes one chunk
constexpr int kMaxCodeLen = 12;     // longest Huffman code; the decoder table has 2^L entries
constexpr int kWordBits = 16;       // the stream is made of 16-bit words
constexpr int kGroup = 64;          // palette escape granularity, along a row
constexpr int kPaletteSize = 16;    // 4-bit indices
constexpr int kDefaultChunkSteps = 512;

// ---- bf16 split (FORMAT.md section 1)
UW_HD uint8_t exponent_of(uint16_t b) { return static_cast<uint8_t>((b >> 7) & 0xFF); }
UW_HD uint8_t signmant_of(uint16_t b) { return static_cast<uint8_t>(((b >> 8) & 0x80) | (b & 0x7F)); }
UW_HD uint16_t join_bf16(uint32_t e, uint32_t sm) {
  return static_cast<uint16_t>(((sm & 0x80u) << 8) | ((e & 0xFFu) << 7) | (sm & 0x7Fu));
}

// ---- chunks and lanes (section 2.2)
UW_HD int64_t chunk_elems(int chunk_steps) { return int64_t(kLanes) * chunk_steps; }
UW_HD int64_t num_chunks(int64_t n, int chunk_steps) {
  const int64_t e = chunk_elems(chunk_steps);
  return (n + e - 1) / e;
}
// Elements in chunk `c` (the last one may be short).
UW_HD int64_t chunk_size(int64_t n, int chunk_steps, int64_t c) {
  const int64_t e = chunk_elems(chunk_steps);
  const int64_t rest = n - c * e;
  return rest < e ? rest : e;
}
// Steps needed by a chunk of `m` elements.
UW_HD int64_t chunk_steps_used(int64_t m) { return (m + kLanes - 1) / kLanes; }

// ---- decoder table: entry = (len << 8) | symbol; len == 0 marks a code not in the table
UW_HD uint32_t lut_len(uint16_t entry) { return entry >> 8; }
UW_HD uint32_t lut_symbol(uint16_t entry) { return entry & 0xFF; }

// One lane of the interleaved decoder (section 2.3): a left-aligned 32-bit buffer.
struct LaneState {
  uint32_t buf = 0;
  int32_t avail = 0;
};
UW_HD bool lane_needs_word(const LaneState& s, int max_len) { return s.avail < max_len; }
UW_HD void lane_refill(LaneState& s, uint32_t word) {
  s.buf |= word << (kWordBits - s.avail);
  s.avail += kWordBits;
}
// The index into the 2^max_len decoder table for the lane's next code.
UW_HD uint32_t lane_peek(const LaneState& s, int max_len) { return s.buf >> (32 - max_len); }
UW_HD void lane_consume(LaneState& s, uint32_t len) {
  s.buf <<= len;
  s.avail -= static_cast<int32_t>(len);
}
// Branch-free refill step for CPU decoders: the lane takes `word` only if it needs one.
// Returns 1 when the word was taken (the stream position advances), else 0.
UW_HD uint32_t lane_refill_if_needed(LaneState& s, uint32_t word, int max_len) {
  const uint32_t need = lane_needs_word(s, max_len) ? 1u : 0u;
  s.buf |= (word & (0u - need)) << ((kWordBits - s.avail) & 31);
  s.avail += kWordBits * static_cast<int32_t>(need);
  return need;
}

// ---- palette form (section 3)
UW_HD int64_t groups_per_row(int64_t cols) { return (cols + kGroup - 1) / kGroup; }
// Elements in group `g` of a row (the last group of a row may be short); it starts at column
// g * kGroup, byte g * kGroup / 2 of the row's indices.
UW_HD int64_t group_len(int64_t cols, int64_t g) {
  const int64_t rest = cols - g * kGroup;
  return rest < kGroup ? rest : kGroup;
}
UW_HD int64_t packed_cols(int64_t cols) { return (cols + 1) / 2; }
UW_HD uint32_t nibble_at(const uint8_t* idx_row, int64_t c) {
  return (idx_row[c >> 1] >> ((c & 1) * 4)) & 0xFu;
}
// The elements of `idx` byte `b` of an [R, cols] tensor: the flat index of its low-nibble
// element, and whether its high nibble holds the next one (not so for the padding of odd cols).
struct IdxByteElems {
  int64_t first;
  bool has_second;
};
UW_HD IdxByteElems idx_byte_elems(int64_t b, int64_t cols) {
  const int64_t p = packed_cols(cols);
  const int64_t c = 2 * (b % p);
  return {(b / p) * cols + c, c + 1 < cols};
}
// The first `idx` byte whose first element is at flat index `i` or later (R * packed_cols for i = n).
UW_HD int64_t idx_byte_at_or_after(int64_t i, int64_t cols) {
  return (i / cols) * packed_cols(cols) + ((i % cols) + 1) / 2;
}

// ---- escape index of the fused kernels (unweight_jax.weights.escape_index)
// Per row, one bit per group in 32-bit words, and per word the esc_exp slot of its first escape.
constexpr int kEscWordBits = 32;
UW_HD int64_t escape_words_per_row(int64_t cols) {
  return (groups_per_row(cols) + kEscWordBits - 1) / kEscWordBits;
}
UW_HD uint32_t popcount32(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __popc(v);
#else
  return static_cast<uint32_t>(__builtin_popcount(v));
#endif
}
// The esc_exp slot of the escape group at bit `bit` of a row's mask word `mask_word`, whose
// first escape has slot `prefix_word`.
UW_HD uint32_t escape_slot(uint32_t mask_word, uint32_t prefix_word, uint32_t bit) {
  return prefix_word + popcount32(mask_word & ((1u << bit) - 1u));
}

}  // namespace unweight
