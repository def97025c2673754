// One step of the warp decoder of FORMAT.md 2.3, for every lane of the warp at once.
//
// Each step is a dependent chain through the whole warp (a lane's refill test needs its previous
// code's length, the ballot needs every lane's test, a lane's word needs the ballot, its next
// code needs the word), and 7 warps share each scheduler, so the step is written to be short
// in both latency and instructions (18 SASS instructions on sm_90a with nvcc 13.0, no branch):
//
// - Lane state is `buf` (valid bits left-aligned, zeros below) and shift = 16 - avail, the left
//   shift that puts a refill word right below the valid bits: the refill test is one compare,
//   the refill buf += word << shift (the bits are disjoint), predicated, not branched.
// - Word and table addresses are shared-memory byte addresses, one multiply-add each; the table
//   index buf >> (32 - L) is the high word of buf * 2^L (the FMA pipe, not the busier INT pipe).
//
// tests/test_huffman_decode_model.py replays this step, lane by lane, against the reference codec.
#pragma once

#include <cstdint>

#include "unweight/format.h"

namespace unweight::cuda {

// What the step needs of the tensor's longest code length L.
struct CodeShape {
  uint32_t table_size;   // 2^L: the high word of buf * 2^L is the table index of the next code
  int32_t refill_above;  // 16 - L: a lane takes a word when shift > refill_above (avail < L)

  __device__ explicit CodeShape(int max_len) : table_size(1u << max_len), refill_above(kWordBits - max_len) {}
};

struct LaneBits {
  uint32_t buf = 0;           // valid bits left-aligned, zeros below
  int32_t shift = kWordBits;  // 16 - avail
};

__device__ __forceinline__ uint32_t lane_mask_lt() {
  uint32_t mask;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(mask));
  return mask;
}

// 16-bit shared-memory load at a shared-memory address. It reads what other lanes stored before
// a __syncwarp or __syncthreads: the memory clobber keeps it below them.
__device__ __forceinline__ uint32_t load_shared_u16(uint32_t address) {
  uint16_t value;
  asm volatile("ld.shared.u16 %0, [%1];" : "=h"(value) : "r"(address) : "memory");
  return value;
}

// FORMAT.md 2.3 step 1: every lane with shift > refill_above (avail < L) takes the word at
// next_word + 2 * (number of lower lanes taking one): buf += word << shift, shift -= 16. Returns
// the ballot of the lanes that took a word. In PTX so that one predicate serves the ballot and
// the predicated refill, and buf and shift are updated in place (from C++, ptxas emits a second
// compare and two register copies per step). Every lane loads a word, to keep the load
// unpredicated (a predicated load into a fresh register keeps that register live across the
// stage and caused spills); the word offset is at most 31 past the words already taken, inside
// the window.
__device__ __forceinline__ uint32_t refill(LaneBits& lane, uint32_t next_word, int32_t refill_above,
                                          uint32_t lower_lanes) {
  uint32_t requests;
  asm volatile(
      "{\n\t"
      ".reg .pred needs;\n\t"
      ".reg .b32 offset, word;\n\t"
      "setp.gt.s32 needs, %1, %3;\n\t"
      "vote.sync.ballot.b32 %2, needs, 0xffffffff;\n\t"
      "and.b32 offset, %2, %4;\n\t"
      "popc.b32 offset, offset;\n\t"
      "mad.lo.u32 offset, offset, 2, %5;\n\t"
      "ld.shared.u16 word, [offset];\n\t"
      "@needs shl.b32 word, word, %1;\n\t"
      "@needs add.u32 %0, %0, word;\n\t"
      "@needs sub.s32 %1, %1, 16;\n\t"
      "}"
      : "+r"(lane.buf), "+r"(lane.shift), "=r"(requests)
      : "r"(refill_above), "r"(lower_lanes), "r"(next_word)
      : "memory");
  return requests;
}

// One step: the refill, then FORMAT.md 2.3 step 2 (decode one code per lane). Returns the lane's
// table entry. `next_word` is the shared address of the stream's next word in the ring window and
// moves past the words taken. A lane with refill_above = INT32_MAX (past the chunk's end) takes
// no word; what it decodes is unused. A code that is not in the table (entry 0, only in a corrupt
// stream) consumes nothing; every address stays inside the table and the window whatever the input.
__device__ __forceinline__ uint32_t decode_step(LaneBits& lane, uint32_t& next_word, uint32_t table, CodeShape code,
                                                int32_t refill_above, uint32_t lower_lanes) {
  next_word += 2 * __popc(refill(lane, next_word, refill_above, lower_lanes));
  const uint32_t entry = load_shared_u16(table + 2 * __umulhi(lane.buf, code.table_size));
  const uint32_t len = lut_len(static_cast<uint16_t>(entry));
  lane.buf <<= len;
  lane.shift += static_cast<int32_t>(len);
  return entry;
}

}  // namespace unweight::cuda
