// A warp's view of one chunk's word stream (FORMAT.md 2.3): a ring in shared memory, filled with
// 16-byte coalesced loads well ahead of the words the decoder takes.
//
// The decoder reads the stream through a window: at the start of a stage the ring is made to
// hold the next kWindowWords words (the most a stage can take, 32 a step), and the words of
// ring slots [0, kMirrorWords) are also kept past the ring's end, so that the window is
// contiguous in shared memory wherever it starts. A word's address is then one multiply-add,
// with no wrap-around mask on the decoder's critical path.
#pragma once

#include <cstdint>

#include "unweight/format.h"

namespace unweight::cuda {

constexpr int kFetchWords = 8 * kLanes;      // one 16-byte load per lane
constexpr int kRingWords = 4 * kFetchWords;  // a power of two: slots wrap with a mask
constexpr int kWindowWords = 16 * kLanes;    // 16 steps of at most 32 words
constexpr int kMirrorWords = kWindowWords;   // slots repeated past the end of the ring
constexpr int kRingSlots = kRingWords + kMirrorWords;

static_assert((kRingWords & (kRingWords - 1)) == 0, "ring slots wrap with a mask");
// Filling stops less than kFetchWords words past pos + kWindowWords; the words from pos on must
// survive it.
static_assert(kRingWords >= kWindowWords + kFetchWords, "a window and the block filled after it fit the ring");

// Words [g, g + kFetchWords) of the stream (g a multiple of 8), lane l holding words
// g + 8l .. g + 8l + 7; words at or past `end` (the chunk's end) read as 0.
__device__ __forceinline__ uint4 fetch_words(const uint16_t* words, uint32_t g, uint32_t end, int lane) {
  const uint32_t i = g + 8u * lane;
  if (i < end && end - i >= 8) return __ldcs(reinterpret_cast<const uint4*>(words + i));
  uint32_t w[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) w[j] = (i < end && uint32_t(j) < end - i) ? words[i + j] : 0u;
  return make_uint4(w[0] | w[1] << 16, w[2] | w[3] << 16, w[4] | w[5] << 16, w[6] | w[7] << 16);
}

class WarpRing {
 public:
  // Starts with two blocks in the ring and a third in flight, all three loads issued together.
  __device__ WarpRing(const uint16_t* words, uint32_t start, uint32_t end, uint16_t* slots, int lane)
      : words_(words),
        slots_(slots),
        slots_address_(static_cast<uint32_t>(__cvta_generic_to_shared(slots))),
        end_(end),
        lane_(lane),
        pos_(start),
        fetched_(start & ~7u) {
    const uint4 first = fetch_words(words_, fetched_, end_, lane_);
    const uint4 second = fetch_words(words_, fetched_ + kFetchWords, end_, lane_);
    next_ = fetch_words(words_, fetched_ + 2 * kFetchWords, end_, lane_);
    store(first);
    store(second);
  }

  // The shared-memory address of stream word pos, from which the next kWindowWords words are
  // contiguous. Ring slots overwritten here hold words before pos, all consumed.
  __device__ uint32_t window() {
    while (int32_t(fetched_ - pos_) < kWindowWords) {
      store(next_);
      next_ = fetch_words(words_, fetched_, end_, lane_);
    }
    __syncwarp();
    return slots_address_ + 2 * (pos_ & (kRingWords - 1));
  }

  __device__ void advance(uint32_t taken) { pos_ += taken; }

 private:
  // Puts the block of words starting at fetched_ in the ring (and its mirror), then moves on.
  __device__ void store(uint4 block) {
    const uint32_t slot = (fetched_ + 8u * lane_) & (kRingWords - 1);
    *reinterpret_cast<uint4*>(&slots_[slot]) = block;
    if (slot < kMirrorWords) *reinterpret_cast<uint4*>(&slots_[kRingWords + slot]) = block;
    fetched_ += kFetchWords;
  }

  const uint16_t* words_;
  uint16_t* slots_;         // kRingSlots words
  uint32_t slots_address_;  // their shared-memory address
  uint32_t end_;
  int lane_;
  uint32_t pos_;      // next word of the stream to hand out
  uint32_t fetched_;  // words before this are in the ring (or consumed); next_ holds the block here
  uint4 next_;
};

}  // namespace unweight::cuda
