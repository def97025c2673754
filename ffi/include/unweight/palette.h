// The palette (inference) form of FORMAT.md section 3, over the [R, C] view of a tensor:
// 4-bit indices into the 16 most frequent exponents, whole 64-element groups kept verbatim
// where an exponent falls outside the palette. Multi-threaded over groups.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "unweight/huffman.h"
#include "unweight/status.h"

namespace unweight {

constexpr uint8_t kNotInPalette = 0xFF;

struct Palette {
  std::array<uint8_t, 16> values{};  // ascending; unused slots 0
  std::array<uint8_t, kSymbols> index{};  // palette slot of each exponent, or kNotInPalette
};

// The 16 most frequent exponents (ties: the smaller first), sorted.
Palette choose_palette(const Histogram& counts);

Histogram exponent_histogram(const uint8_t* e, int64_t n, int threads);

struct Escapes {
  std::vector<uint32_t> groups;    // flat group ids r * G + g, ascending
  std::vector<uint8_t> exponents;  // 64 per group, 0 past the end of a short group
};

// Exponents e [R, C] -> indices idx [R, ceil(C/2)] and the escape groups; fails if the group
// ids outgrow u32.
Status pack_palette(const uint8_t* e, int64_t rows, int64_t cols, const Palette& palette, uint8_t* idx,
                    Escapes* escapes, int threads);

// The indices of a known palette and escape list: nibble = sym_to_idx[e] & 15, then the nibbles
// of every listed group cleared. Fails on a group id outside the R * G groups.
Status pack_indices(const uint8_t* e, int64_t rows, int64_t cols, const uint8_t* sym_to_idx,
                    const uint32_t* esc_groups, int64_t n_esc, uint8_t* idx, int threads);

// Palette form -> bf16 bit patterns [R, C]. Fails on a group id outside the R * G groups.
Status unpack_palette(const uint8_t* palette, const uint8_t* idx, const uint8_t* sm, int64_t rows, int64_t cols,
                      const uint32_t* esc_groups, const uint8_t* esc_exp, int64_t n_esc, uint16_t* bits,
                      int threads);

}  // namespace unweight
