// Huffman encoding (FORMAT.md 2.2, 2.3) in three passes, each split over threads:
//   1. split:  sign+mantissa bytes out, exponent histogram;
//   2. plan:   the words of every chunk follow from the code lengths alone, so the chunk offsets
//              are known before any word is written;
//   3. encode: every chunk writes straight into its slice of the final word array, whole steps
//              in AVX2 where the CPU has it (avx2.cc).
#include <algorithm>
#include <array>
#include <string>
#include <vector>

#include "avx2.h"
#include "byte_counter.h"
#include "parallel.h"
#include "unweight/format.h"
#include "unweight/huffman.h"

namespace unweight {

namespace {

constexpr int64_t kElementsPerBlock = 1 << 18;
constexpr int64_t kChunksPerBlock = 4;

// (length << 16) | code per exponent: one load per element.
using PackedCode = std::array<uint32_t, kSymbols>;
PackedCode pack(const CanonicalCode& code) {
  PackedCode packed;
  for (int s = 0; s < kSymbols; ++s) packed[s] = (uint32_t{code.length[s]} << 16) | code.code[s];
  return packed;
}

// One block of split_bf16, in pieces that stay in L1: a loop the compiler vectorises splits the
// bits, then the exponents are counted.
void split_block(const uint16_t* bits, int64_t begin, int64_t end, uint8_t* e, uint8_t* sm, ByteCounter& counter) {
  constexpr int64_t kPiece = 4096;
  uint8_t local[kPiece];
  for (int64_t at = begin; at < end; at += kPiece) {
    const int64_t len = std::min(kPiece, end - at);
    uint8_t* const x = e ? e + at : local;
    const uint16_t* const b = bits + at;
    uint8_t* const s = sm + at;
    for (int64_t i = 0; i < len; ++i) {
      x[i] = exponent_of(b[i]);
      s[i] = signmant_of(b[i]);
    }
    counter.add(x, len);
  }
}

// Words of a chunk: by FORMAT.md 2.3 a lane has taken ceil((P + L) / 16) words once it has
// refilled for its last code, P being the bits of its codes before that one.
int64_t chunk_words(const uint16_t* bits, int64_t m, const PackedCode& packed, int max_len, bool simd) {
  alignas(32) uint32_t before_last[kLanes] = {};  // bits of all codes but the latest, per lane
  alignas(32) uint32_t last[kLanes] = {};         // length of the latest code, per lane
  const int64_t simd_steps = simd ? m / kLanes : 0;
  if (simd_steps) lane_bits_avx2(bits, simd_steps, packed.data(), before_last, last);
  for (int64_t i = simd_steps * kLanes; i < m; ++i) {
    const int lane = static_cast<int>(i & (kLanes - 1));
    before_last[lane] += last[lane];
    last[lane] = packed[exponent_of(bits[i])] >> 16;
  }
  int64_t words = 0;
  const int active = static_cast<int>(std::min<int64_t>(m, kLanes));
  for (int lane = 0; lane < active; ++lane) words += (before_last[lane] + max_len + kWordBits - 1) / kWordBits;
  return words;
}

// One element of lane `l`: the scalar twin of encode_steps_avx2.
inline void encode_element(EncodeLanes& s, int l, uint32_t entry, int max_len, uint32_t& pos, uint16_t* out) {
  const uint32_t len = entry >> 16;
  if (s.avail[l] < max_len) {  // the decoder refills before it decodes this code
    s.slot[l][s.asked[l]++ & 3] = pos++;
    s.avail[l] += kWordBits;
  }
  s.avail[l] -= static_cast<int32_t>(len);
  s.acc[l] = (s.acc[l] << len) | (entry & 0xFFFF);
  s.pending[l] += static_cast<int32_t>(len);
  if (s.pending[l] >= kWordBits) {
    s.pending[l] -= kWordBits;
    out[s.slot[l][s.written[l]++ & 3]] = static_cast<uint16_t>(s.acc[l] >> s.pending[l]);
  }
}

// One chunk's words in decoder order (see EncodeLanes); whole steps in AVX2 where available.
void encode_chunk(const uint16_t* bits, int64_t m, const uint32_t* packed, int max_len, bool simd, uint16_t* out) {
  EncodeLanes lanes{};
  uint32_t pos = 0;
  const int64_t simd_steps = simd ? m / kLanes : 0;
  if (simd_steps) encode_steps_avx2(bits, simd_steps, packed, max_len, &lanes, &pos, out);
  for (int64_t i = simd_steps * kLanes; i < m; ++i)
    encode_element(lanes, static_cast<int>(i & (kLanes - 1)), packed[exponent_of(bits[i])], max_len, pos, out);

  const int active = static_cast<int>(std::min<int64_t>(m, kLanes));
  for (int l = 0; l < active; ++l) {
    if (lanes.pending[l] > 0)
      out[lanes.slot[l][lanes.written[l]++ & 3]] = static_cast<uint16_t>(lanes.acc[l] << (kWordBits - lanes.pending[l]));
    // A lane whose bits ran out before its last refill takes a zero word.
    while (lanes.written[l] < lanes.asked[l]) out[lanes.slot[l][lanes.written[l]++ & 3]] = 0;
  }
}

}  // namespace

Histogram split_bf16(const uint16_t* bits, int64_t n, uint8_t* e, uint8_t* sm, int threads) {
  const Blocks blocks(n, kElementsPerBlock, threads);
  std::vector<Histogram> per_worker(blocks.workers(), Histogram{});
  blocks.run([&](int worker, int64_t b) {
    ByteCounter counter;
    split_block(bits, blocks.begin(b), blocks.end(b), e, sm, counter);
    counter.add_to(per_worker[worker]);
  });
  Histogram total{};
  for (const Histogram& h : per_worker)
    for (int s = 0; s < kSymbols; ++s) total[s] += h[s];
  return total;
}

Status plan_chunks(const uint16_t* bits, int64_t n, int chunk_steps, const CanonicalCode& code,
                   uint32_t* chunks, int64_t* n_words, int threads) {
  const PackedCode packed = pack(code);
  const bool simd = have_avx2();
  const int64_t n_chunks = num_chunks(n, chunk_steps);
  std::vector<int64_t> sizes(n_chunks);
  const Blocks blocks(n_chunks, kChunksPerBlock, threads);
  blocks.run([&](int, int64_t b) {
    for (int64_t c = blocks.begin(b); c < blocks.end(b); ++c)
      sizes[c] = chunk_words(bits + c * chunk_elems(chunk_steps), chunk_size(n, chunk_steps, c), packed,
                             code.max_len, simd);
  });
  int64_t offset = 0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    if (offset > UINT32_MAX)
      return Status::Error("the stream needs more than 2^32 words; u32 chunk offsets cannot address chunk " +
                           std::to_string(c));
    chunks[c] = static_cast<uint32_t>(offset);
    offset += sizes[c];
  }
  *n_words = offset;
  return Status();
}

void encode_chunks(const uint16_t* bits, int64_t n, int chunk_steps, const CanonicalCode& code,
                   const uint32_t* chunks, uint16_t* words, int threads) {
  const PackedCode packed = pack(code);
  const bool simd = have_avx2();
  const int64_t n_chunks = num_chunks(n, chunk_steps);
  const Blocks blocks(n_chunks, kChunksPerBlock, threads);
  blocks.run([&](int, int64_t b) {
    for (int64_t c = blocks.begin(b); c < blocks.end(b); ++c)
      encode_chunk(bits + c * chunk_elems(chunk_steps), chunk_size(n, chunk_steps, c), packed.data(), code.max_len, simd,
                   words + chunks[c]);
  });
}

}  // namespace unweight
