// How the GEMV kernels (gemv.cu) turn a lane's 16 weights of a row, and 16 values of x, into
// bf16 pairs for mma.sync. Host and device code alike, so that tests/test_gemv_layout.py runs
// these very functions on the CPU.
//
// A lane holds 16 consecutive columns c0..c15 of a row. Its eight 32-bit pairs are
//   pairs[2j] = (c[4j], c[4j+2]),  pairs[2j+1] = (c[4j+1], c[4j+3])   (low half first),
// not (c0, c1), (c2, c3), ...: with that pairing the exponent bytes e0..e3 of four weights land
// in place with one shift per pair (e << 7 puts e0 and e2 at bits 7..14 of each half, e >> 1
// puts e1 and e3 there). x is paired the same way, which is free: a dot product may take its
// terms in any order as long as both operands agree.
#pragma once

#include <cstdint>

#include "unweight/format.h"

namespace unweight::gemv {

// CUDA's __byte_perm: byte i of the result is byte (sel >> 4i) & 7 of the 8 bytes {b, a}.
UW_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, sel);
#else
  const uint64_t bytes = (uint64_t(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    r |= uint32_t((bytes >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  }
  return r;
#endif
}

struct PairWords {
  uint32_t even;  // (c0, c2)
  uint32_t odd;   // (c1, c3)
};

// bf16 pairs of four weights from their exponent bytes e4 and sign+mantissa bytes sm4 (one per
// byte, c0 lowest). Per 16-bit half, sm duplicated into both bytes supplies the sign (bit 15)
// and the mantissa (bits 0..6); the shifted exponents supply bits 7..14 (FORMAT.md section 1).
UW_HD PairWords join_bf16_pairs(uint32_t e4, uint32_t sm4) {
  constexpr uint32_t kSignMantissa = 0x807F807Fu;
  const uint32_t sm02 = byte_perm(sm4, 0, 0x2200);
  const uint32_t sm13 = byte_perm(sm4, 0, 0x3311);
  return {(sm02 & kSignMantissa) | ((e4 << 7) & ~kSignMantissa), (sm13 & kSignMantissa) | ((e4 >> 1) & ~kSignMantissa)};
}

// The same pairing for four plain bf16 values held as (c0, c1) in w01 and (c2, c3) in w23.
UW_HD PairWords bf16_pairs(uint32_t w01, uint32_t w23) {
  return {byte_perm(w01, w23, 0x5410), byte_perm(w01, w23, 0x7632)};
}

}  // namespace unweight::gemv
