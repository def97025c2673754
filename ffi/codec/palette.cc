// The palette form (FORMAT.md section 3). Work is split over flat group ids: a group covers
// 64 columns, i.e. 32 whole bytes of its row's indices, so no two threads share a byte.
#include <algorithm>
#include <cstring>
#include <string>

#include "byte_counter.h"
#include "parallel.h"
#include "unweight/format.h"
#include "unweight/palette.h"

namespace unweight {

namespace {

constexpr int64_t kGroupsPerBlock = 1 << 12;
constexpr int64_t kElementsPerBlock = 1 << 18;

// Escape groups are given from outside: refuse an id that does not name a group.
Status check_escape_groups(const uint32_t* esc_groups, int64_t n_esc, int64_t n_groups) {
  for (int64_t i = 0; i < n_esc; ++i)
    if (esc_groups[i] >= n_groups)
      return Status::Error("esc_groups[" + std::to_string(i) + "] = " + std::to_string(esc_groups[i]) +
                           " is not a group id (the tensor has " + std::to_string(n_groups) + " groups)");
  return Status();
}

// Packs `len` 4-bit values into (len + 1) / 2 bytes, low nibble first; a padding nibble is 0.
void pack_nibbles(const uint8_t* nib, int64_t len, uint8_t* out) {
  for (int64_t j = 0; j + 1 < len; j += 2) out[j / 2] = static_cast<uint8_t>(nib[j] | (nib[j + 1] << 4));
  if (len & 1) out[len / 2] = nib[len - 1];
}

// Calls body(gid, row, first column, length) for the groups [begin, end) of an [R, C] tensor.
template <class Body>
void for_groups(int64_t begin, int64_t end, int64_t cols, Body&& body) {
  const int64_t per_row = groups_per_row(cols);
  for (int64_t gid = begin; gid < end; ++gid) {
    const int64_t r = gid / per_row, g = gid % per_row;
    body(gid, r, g * kGroup, group_len(cols, g));
  }
}

}  // namespace

Palette choose_palette(const Histogram& counts) {
  std::array<int, kSymbols> ranked;
  for (int s = 0; s < kSymbols; ++s) ranked[s] = s;
  std::stable_sort(ranked.begin(), ranked.end(), [&](int a, int b) { return counts[a] > counts[b]; });
  int used = 0;
  while (used < kPaletteSize && counts[ranked[used]] > 0) ++used;
  std::sort(ranked.begin(), ranked.begin() + used);

  Palette palette;
  palette.index.fill(kNotInPalette);
  for (int i = 0; i < used; ++i) {
    palette.values[i] = static_cast<uint8_t>(ranked[i]);
    palette.index[ranked[i]] = static_cast<uint8_t>(i);
  }
  return palette;
}

Histogram exponent_histogram(const uint8_t* e, int64_t n, int threads) {
  const Blocks blocks(n, kElementsPerBlock, threads);
  std::vector<Histogram> per_worker(blocks.workers(), Histogram{});
  blocks.run([&](int worker, int64_t b) {
    ByteCounter counter;
    counter.add(e + blocks.begin(b), blocks.end(b) - blocks.begin(b));
    counter.add_to(per_worker[worker]);
  });
  Histogram total{};
  for (const Histogram& h : per_worker)
    for (int s = 0; s < kSymbols; ++s) total[s] += h[s];
  return total;
}

Status pack_palette(const uint8_t* e, int64_t rows, int64_t cols, const Palette& palette, uint8_t* idx,
                    Escapes* escapes, int threads) {
  const int64_t n_groups = rows * groups_per_row(cols);
  if (n_groups > int64_t{UINT32_MAX} + 1)
    return Status::Error("a tensor of " + std::to_string(n_groups) + " groups outgrows u32 group ids");
  const int64_t row_bytes = packed_cols(cols);
  const Blocks blocks(n_groups, kGroupsPerBlock, threads);
  std::vector<Escapes> per_block(blocks.blocks());
  blocks.run([&](int, int64_t b) {
    Escapes& out = per_block[b];
    for_groups(blocks.begin(b), blocks.end(b), cols, [&](int64_t gid, int64_t r, int64_t c0, int64_t len) {
      const uint8_t* src = e + r * cols + c0;
      uint8_t* dst = idx + r * row_bytes + c0 / 2;
      uint8_t nib[kGroup];
      uint8_t any = 0;
      for (int64_t j = 0; j < len; ++j) {
        nib[j] = palette.index[src[j]];
        any |= nib[j];
      }
      if (any & 0xF0) {  // an exponent outside the palette: the group goes verbatim
        out.groups.push_back(static_cast<uint32_t>(gid));
        out.exponents.insert(out.exponents.end(), src, src + len);
        out.exponents.resize(out.exponents.size() + (kGroup - len), 0);
        std::memset(dst, 0, (len + 1) / 2);
      } else {
        pack_nibbles(nib, len, dst);
      }
    });
  });
  escapes->groups.clear();
  escapes->exponents.clear();
  for (const Escapes& found : per_block) {
    escapes->groups.insert(escapes->groups.end(), found.groups.begin(), found.groups.end());
    escapes->exponents.insert(escapes->exponents.end(), found.exponents.begin(), found.exponents.end());
  }
  return Status();
}

Status pack_indices(const uint8_t* e, int64_t rows, int64_t cols, const uint8_t* sym_to_idx,
                    const uint32_t* esc_groups, int64_t n_esc, uint8_t* idx, int threads) {
  const int64_t n_groups = rows * groups_per_row(cols);
  if (Status st = check_escape_groups(esc_groups, n_esc, n_groups); !st.ok()) return st;
  const int64_t row_bytes = packed_cols(cols);
  const Blocks blocks(n_groups, kGroupsPerBlock, threads);
  blocks.run([&](int, int64_t b) {
    for_groups(blocks.begin(b), blocks.end(b), cols, [&](int64_t, int64_t r, int64_t c0, int64_t len) {
      const uint8_t* src = e + r * cols + c0;
      uint8_t nib[kGroup];
      for (int64_t j = 0; j < len; ++j) nib[j] = sym_to_idx[src[j]] & 0xF;
      pack_nibbles(nib, len, idx + r * row_bytes + c0 / 2);
    });
  });
  for (int64_t i = 0; i < n_esc; ++i)
    for_groups(esc_groups[i], int64_t{esc_groups[i]} + 1, cols, [&](int64_t, int64_t r, int64_t c0, int64_t len) {
      std::memset(idx + r * row_bytes + c0 / 2, 0, (len + 1) / 2);
    });
  return Status();
}

Status unpack_palette(const uint8_t* palette, const uint8_t* idx, const uint8_t* sm, int64_t rows, int64_t cols,
                      const uint32_t* esc_groups, const uint8_t* esc_exp, int64_t n_esc, uint16_t* bits,
                      int threads) {
  const int64_t n_groups = rows * groups_per_row(cols);
  if (Status st = check_escape_groups(esc_groups, n_esc, n_groups); !st.ok()) return st;
  const int64_t row_bytes = packed_cols(cols);
  const Blocks blocks(n_groups, kGroupsPerBlock, threads);
  blocks.run([&](int, int64_t b) {
    for_groups(blocks.begin(b), blocks.end(b), cols, [&](int64_t, int64_t r, int64_t c0, int64_t len) {
      const uint8_t* nibbles = idx + r * row_bytes;
      const int64_t at = r * cols + c0;
      for (int64_t j = 0; j < len; ++j) bits[at + j] = join_bf16(palette[nibble_at(nibbles, c0 + j)], sm[at + j]);
    });
  });
  // Escape groups are few; overwriting them afterwards keeps the loop above free of lookups.
  for (int64_t i = 0; i < n_esc; ++i)
    for_groups(esc_groups[i], int64_t{esc_groups[i]} + 1, cols, [&](int64_t, int64_t r, int64_t c0, int64_t len) {
      const int64_t at = r * cols + c0;
      for (int64_t j = 0; j < len; ++j) bits[at + j] = join_bf16(esc_exp[i * kGroup + j], sm[at + j]);
    });
  return Status();
}

}  // namespace unweight
