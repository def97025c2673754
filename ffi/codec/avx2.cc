// The AVX2 loops of avx2.h. The 32 lanes of a chunk are four vectors of eight; what varies
// per lane (a word taken or written) becomes an 8-bit mask per vector.
#include "avx2.h"

#if defined(__x86_64__)

#include <immintrin.h>

#define UW_AVX2 __attribute__((target("avx2,bmi,bmi2,popcnt")))

namespace unweight {

namespace {

constexpr int kVectors = kLanes / 8;

// For each 8-bit mask of lanes taking a word: byte i = how many lanes below i take one, i.e.
// the offset of lane i's word among the next eight words of the stream.
struct ExpandTable {
  uint64_t offsets[256];
};
constexpr ExpandTable make_expand_table() {
  ExpandTable table{};
  for (int mask = 0; mask < 256; ++mask) {
    uint64_t offsets = 0;
    for (int lane = 0, below = 0; lane < 8; ++lane) {
      offsets |= uint64_t(below) << (8 * lane);
      below += (mask >> lane) & 1;
    }
    table.offsets[mask] = offsets;
  }
  return table;
}
constexpr ExpandTable kExpand = make_expand_table();

}  // namespace

bool have_avx2() {
  static const bool supported =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  return supported;
}

// Per vector and step: the lanes that need a word are a bit mask; since a step's words lie
// consecutively in the stream, one 16-byte load and a permutation by the mask's prefix counts
// hands each such lane its word (no gather). The code lookup is one gather from the u32 table.
UW_AVX2 int64_t decode_steps_avx2(const uint16_t* words, int64_t n_words, int64_t* pos_io, const uint32_t* lut32,
                                  int max_len, LaneState* lanes, uint8_t* symbols, int64_t steps, uint32_t* bad_io) {
  alignas(32) uint32_t buf_in[kLanes];
  alignas(32) int32_t avail_in[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    buf_in[l] = lanes[l].buf;
    avail_in[l] = lanes[l].avail;
  }
  __m256i buf[kVectors], avail[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    buf[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf_in + 8 * v));
    avail[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(avail_in + 8 * v));
  }
  const __m256i len_limit = _mm256_set1_epi32(max_len);
  const __m256i word_bits = _mm256_set1_epi32(kWordBits);
  const __m128i peek_shift = _mm_cvtsi32_si128(32 - max_len);
  const __m256i low_byte = _mm256_set1_epi32(0xFF);
  const __m256i zero = _mm256_setzero_si256();
  // Undoes the lane interleaving of the two packs below (units of four symbols).
  const __m256i unpack_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i bad = zero;

  int64_t pos = *pos_io;
  int64_t k = 0;
  for (; k < steps && pos + kLanes <= n_words; ++k) {
    __m256i symbol[kVectors];
    for (int v = 0; v < kVectors; ++v) {
      // refill: lanes with avail < L take the next words in lane order
      const __m256i need = _mm256_cmpgt_epi32(len_limit, avail[v]);
      const unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(need)));
      const __m256i offsets = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(&kExpand.offsets[mask])));
      const __m256i next = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(words + pos)));
      const __m256i word = _mm256_and_si256(_mm256_permutevar8x32_epi32(next, offsets), need);
      buf[v] = _mm256_or_si256(buf[v], _mm256_sllv_epi32(word, _mm256_sub_epi32(word_bits, avail[v])));
      avail[v] = _mm256_add_epi32(avail[v], _mm256_and_si256(need, word_bits));
      pos += _mm_popcnt_u32(mask);
      // decode: one table entry per lane
      const __m256i entry = _mm256_i32gather_epi32(reinterpret_cast<const int*>(lut32), _mm256_srl_epi32(buf[v], peek_shift), 4);
      bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(entry, zero));
      const __m256i len = _mm256_srli_epi32(entry, 8);
      buf[v] = _mm256_sllv_epi32(buf[v], len);
      avail[v] = _mm256_sub_epi32(avail[v], len);
      symbol[v] = _mm256_and_si256(entry, low_byte);
    }
    const __m256i packed = _mm256_packus_epi16(_mm256_packus_epi32(symbol[0], symbol[1]),
                                               _mm256_packus_epi32(symbol[2], symbol[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(symbols + k * kLanes),
                        _mm256_permutevar8x32_epi32(packed, unpack_order));
  }

  for (int v = 0; v < kVectors; ++v) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(buf_in + 8 * v), buf[v]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(avail_in + 8 * v), avail[v]);
  }
  for (int l = 0; l < kLanes; ++l) lanes[l] = LaneState{buf_in[l], avail_in[l]};
  *pos_io = pos;
  if (_mm256_movemask_epi8(bad)) *bad_io |= 0x80000000u;
  return k;
}

UW_AVX2 void lane_bits_avx2(const uint16_t* bits, int64_t steps, const uint32_t* packed, uint32_t* before_last,
                            uint32_t* last) {
  const __m256i low_byte = _mm256_set1_epi32(0xFF);
  for (int v = 0; v < kVectors; ++v) {
    __m256i sum = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(before_last + 8 * v));
    __m256i newest = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(last + 8 * v));
    for (int64_t k = 0; k < steps; ++k) {
      const __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + k * kLanes + 8 * v)));
      const __m256i e = _mm256_and_si256(_mm256_srli_epi32(b, 7), low_byte);  // exponent_of
      sum = _mm256_add_epi32(sum, newest);
      newest = _mm256_srli_epi32(_mm256_i32gather_epi32(reinterpret_cast<const int*>(packed), e, 4), 16);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(before_last + 8 * v), sum);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(last + 8 * v), newest);
  }
}

// Per step: one gather per vector of the lanes' (length, code); the decoder's refills and the
// words completed become 32-bit masks, and only their set bits (about one element in six each)
// take scalar work, to reserve a slot or to store a word in one.
UW_AVX2 void encode_steps_avx2(const uint16_t* bits, int64_t steps, const uint32_t* packed, int max_len,
                               EncodeLanes* lanes, uint32_t* pos_io, uint16_t* out) {
  __m256i acc[kVectors], pending[kVectors], avail[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    acc[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes->acc + 8 * v));
    pending[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes->pending + 8 * v));
    avail[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes->avail + 8 * v));
  }
  const __m256i len_limit = _mm256_set1_epi32(max_len);
  const __m256i word_bits = _mm256_set1_epi32(kWordBits);
  const __m256i below_word = _mm256_set1_epi32(kWordBits - 1);
  const __m256i low_byte = _mm256_set1_epi32(0xFF);
  const __m256i low_half = _mm256_set1_epi32(0xFFFF);
  alignas(32) uint32_t completed[kLanes];
  uint32_t pos = *pos_io;

  for (int64_t k = 0; k < steps; ++k) {
    uint32_t refills = 0, full_lanes = 0;
    for (int v = 0; v < kVectors; ++v) {
      const __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + k * kLanes + 8 * v)));
      const __m256i e = _mm256_and_si256(_mm256_srli_epi32(b, 7), low_byte);  // exponent_of
      const __m256i entry = _mm256_i32gather_epi32(reinterpret_cast<const int*>(packed), e, 4);
      const __m256i len = _mm256_srli_epi32(entry, 16);
      // the decoder refills before it decodes this code
      const __m256i need = _mm256_cmpgt_epi32(len_limit, avail[v]);
      refills |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(need))) << (8 * v);
      avail[v] = _mm256_sub_epi32(_mm256_add_epi32(avail[v], _mm256_and_si256(need, word_bits)), len);
      // append the code; a lane holding 16 bits or more gives up its oldest 16
      acc[v] = _mm256_or_si256(_mm256_sllv_epi32(acc[v], len), _mm256_and_si256(entry, low_half));
      pending[v] = _mm256_add_epi32(pending[v], len);
      const __m256i full = _mm256_cmpgt_epi32(pending[v], below_word);
      full_lanes |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(full))) << (8 * v);
      pending[v] = _mm256_sub_epi32(pending[v], _mm256_and_si256(full, word_bits));
      _mm256_store_si256(reinterpret_cast<__m256i*>(completed + 8 * v), _mm256_srlv_epi32(acc[v], pending[v]));
    }
    // reservations first, in lane order: a word may complete in the step that asks for it
    for (; refills; refills &= refills - 1) {
      const int l = static_cast<int>(_tzcnt_u32(refills));
      lanes->slot[l][lanes->asked[l]++ & 3] = pos++;
    }
    for (; full_lanes; full_lanes &= full_lanes - 1) {
      const int l = static_cast<int>(_tzcnt_u32(full_lanes));
      out[lanes->slot[l][lanes->written[l]++ & 3]] = static_cast<uint16_t>(completed[l]);
    }
  }

  for (int v = 0; v < kVectors; ++v) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes->acc + 8 * v), acc[v]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes->pending + 8 * v), pending[v]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes->avail + 8 * v), avail[v]);
  }
  *pos_io = pos;
}

}  // namespace unweight

#else  // not x86-64: the scalar loops do all the work

namespace unweight {

bool have_avx2() { return false; }

int64_t decode_steps_avx2(const uint16_t*, int64_t, int64_t*, const uint32_t*, int, LaneState*, uint8_t*, int64_t,
                          uint32_t*) {
  return 0;
}

void lane_bits_avx2(const uint16_t*, int64_t, const uint32_t*, uint32_t*, uint32_t*) {}

void encode_steps_avx2(const uint16_t*, int64_t, const uint32_t*, int, EncodeLanes*, uint32_t*, uint16_t*) {}

}  // namespace unweight

#endif
