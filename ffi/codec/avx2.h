// AVX2 inner loops of the Huffman encoder and decoder, chosen at run time (have_avx2()). Each
// takes the scalar loop's state, advances it by whole steps (32 elements, one per lane) exactly
// as the scalar loop would, and hands it back for the scalar loop to finish the chunk.
#pragma once

#include <cstdint>

#include "unweight/format.h"

namespace unweight {

// True on an x86-64 CPU with AVX2 and BMI1/2; always false elsewhere.
bool have_avx2();

// ---- decoder (huffman_decode.cc)

// Decodes whole steps while the stream has 32 words from *pos on, so that its loads need no
// clamp. `lut32` is the decoder table widened to u32. Updates lanes, *pos and *bad (top bit set
// when a code is not in the table); returns the steps decoded (<= steps).
int64_t decode_steps_avx2(const uint16_t* words, int64_t n_words, int64_t* pos, const uint32_t* lut32, int max_len,
                          LaneState* lanes, uint8_t* symbols, int64_t steps, uint32_t* bad);

// ---- encoder (huffman_encode.cc)

// The encoder's lanes. The decoder's refills are simulated to reserve each word's slot in the
// chunk when the decoder will ask for it; the word is written once its 16 bits are coded. At
// most two words of a lane are reserved and not yet written (a refill asks for bits at most
// L < 16 ahead of those coded), so four slots per lane suffice.
struct alignas(32) EncodeLanes {
  uint32_t acc[kLanes];      // coded bits not yet written, in the low `pending` bits
  int32_t pending[kLanes];
  int32_t avail[kLanes];     // the simulated decoder's bits in hand
  uint32_t asked[kLanes];    // words reserved
  uint32_t written[kLanes];  // words written
  uint32_t slot[kLanes][4];  // positions of reserved words, by word number mod 4
};

// Adds, per lane, the lengths of the codes of `steps` whole steps: before_last[l] += last[l]
// and last[l] = the newest length, code by code (plan_chunks' word count).
void lane_bits_avx2(const uint16_t* bits, int64_t steps, const uint32_t* packed, uint32_t* before_last,
                    uint32_t* last);

// Encodes `steps` whole steps of `bits` (the chunk's first unencoded step) into the chunk's
// words `out`; `packed` is (length << 16) | code per exponent; *pos counts reserved words.
void encode_steps_avx2(const uint16_t* bits, int64_t steps, const uint32_t* packed, int max_len, EncodeLanes* lanes,
                       uint32_t* pos, uint16_t* out);

}  // namespace unweight
