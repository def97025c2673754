// Exponent histograms: four sub-histograms, so that runs of equal bytes (common in weights)
// spread their increments over independent counters instead of one serial chain.
#pragma once

#include <cstdint>

#include "unweight/huffman.h"

namespace unweight {

class ByteCounter {
 public:
  // Counts up to 2^32 - 1 bytes in all (32-bit counters); callers count one work block each.
  void add(const uint8_t* x, int64_t len) {
    int64_t i = 0;
    for (; i + 4 <= len; i += 4)
      for (int j = 0; j < 4; ++j) ++sub_[j][x[i + j]];
    for (; i < len; ++i) ++sub_[0][x[i]];
  }

  void add_to(Histogram& total) const {
    for (int s = 0; s < kSymbols; ++s) total[s] += uint64_t{sub_[0][s]} + sub_[1][s] + sub_[2][s] + sub_[3][s];
  }

 private:
  uint32_t sub_[4][kSymbols] = {};
};

}  // namespace unweight
