// Register-level byte shuffles shared by the decode kernels: rebuilding bf16 from exponent and
// sign+mantissa bytes (FORMAT.md section 1), 16-entry palette lookups, and nibble packing.
// Each works on four elements held one per byte of a 32-bit register, so a lane turns 16-byte
// loads into 16-byte stores without touching single bytes.
#pragma once

#include <cstdint>

namespace unweight::cuda {

// (a & mask) | (b & ~mask): one LOP3. In PTX because, left to itself, ptxas narrows the two
// masks to different immediates where later selects overwrite bits, and then needs two LOP3s.
__device__ __forceinline__ uint32_t bit_select(uint32_t mask, uint32_t a, uint32_t b) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xCA;" : "=r"(r) : "r"(mask), "r"(a), "r"(b));
  return r;
}

// Two bf16 values from t = [sm0, e0, sm1, e1] (bytes, low first): per 16-bit half
// t = (e << 8) | sm, and bf16 = (sm & 0x80) << 8 | e << 7 | (sm & 0x7F).
__device__ __forceinline__ uint32_t bf16_pair(uint32_t t) {
  const uint32_t exponent = bit_select(0x7F807F80u, t >> 1, t);  // e << 7, sm's low 7 bits kept
  return bit_select(0x80008000u, t << 8, exponent);              // sm's top bit is the sign
}

// Four bf16 values (two 32-bit words) from four exponent bytes and four sign+mantissa bytes.
__device__ __forceinline__ uint2 join_bf16x4(uint32_t exponents, uint32_t signmants) {
  return make_uint2(bf16_pair(__byte_perm(signmants, exponents, 0x5140)),
                    bf16_pair(__byte_perm(signmants, exponents, 0x7362)));
}

// Four palette entries (one per byte) for the four 4-bit indices in the low 16 bits of
// `nibbles` (index j in bits 4j..4j+3). `palette` holds the 16 entries, entry i in byte i.
// PRMT picks one of 8 bytes per selector nibble (bit 3 would request sign replication, so it
// is masked off): entries 0-7 and 8-15 are looked up separately, then bit 3 chooses.
__device__ __forceinline__ uint32_t palette_lookup4(uint32_t nibbles, uint4 palette) {
  const uint32_t low_sel = nibbles & 0x7777u;
  const uint32_t from_low = __byte_perm(palette.x, palette.y, low_sel);
  const uint32_t from_high = __byte_perm(palette.z, palette.w, low_sel);
  const uint32_t pick = 0x3210u | ((nibbles >> 1) & 0x4444u);  // byte j, +4 where bit 3 is set
  return __byte_perm(from_low, from_high, pick);
}

// Packs the 4-bit values held in the bytes of `lo` (elements 0-3) and `hi` (elements 4-7) into
// four nibbles each: element 2k in the low nibble of byte k, as FORMAT.md section 3 stores `idx`.
__device__ __forceinline__ uint32_t pack_nibbles8(uint32_t lo, uint32_t hi) {
  return __byte_perm(lo | (lo >> 4), hi | (hi >> 4), 0x6420);
}

}  // namespace unweight::cuda
