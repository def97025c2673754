// The warp-per-chunk Huffman decoder of FORMAT.md section 2.3, shared by every Huffman kernel.
//
// One warp decodes one chunk; lane l owns elements l, l + 32, ... of it. A step
// (huffman_lane.cuh) hands the lanes that need a word consecutive words of the ring window
// (huffman_ring.cuh) and looks every lane's next code up in the 2^L decoder table held in shared
// memory. Decoded symbols of 16 steps (a stage) are staged in shared memory so that the output
// sink can turn them into wide coalesced stores of consecutive elements.
//
// A sink supplies the output side:
//   static constexpr bool kMapsSymbols      whether the table holds symbol_map(exponent), not exponent
//   uint32_t symbol_map(uint32_t exponent)  (if kMapsSymbols) the symbol stored for an exponent
//   void begin_chunk(const HuffmanStream&, const uint16_t* table, int64_t c, int64_t first, int64_t m)
//   void prefetch(int64_t first, int lane)  loads for a full stage, issued before decoding it
//   void write_full(int64_t first, const uint8_t* stage, int lane)         kStageElems symbols
//   void write_partial(int64_t first, int count, const uint8_t* stage, int lane)
// where `first` is the flat index of the stage's (or chunk's) first element.
#pragma once

#include <cstdint>

#include "huffman_lane.cuh"
#include "huffman_ring.cuh"
#include "unweight/format.h"

namespace unweight::cuda {

constexpr int kDecodeWarps = 4;                    // warps per block, one chunk each
constexpr int kDecodeThreads = kDecodeWarps * kLanes;
constexpr int kStageSteps = 16;                    // steps decoded between two stores
constexpr int kStageElems = kStageSteps * kLanes;  // 512: 16 consecutive outputs per lane
constexpr int kTableLoads = (1 << kMaxCodeLen) / (8 * kDecodeThreads);  // 16-byte table loads per thread

static_assert(kWindowWords >= kStageElems, "a stage takes at most one word per element");
static_assert(kTableLoads * 8 * kDecodeThreads == (1 << kMaxCodeLen), "the largest table is whole loads");

// The inputs every Huffman kernel reads, with sizes taken from the buffers.
struct HuffmanStream {
  const uint16_t* words;
  const uint32_t* chunks;
  const uint16_t* table;  // decoder table, 2^max_len entries of (len << 8) | symbol
  uint32_t n_words;
  int64_t n;              // elements
  int64_t n_chunks;
  int32_t chunk_steps;
  int32_t max_len;        // L = log2(table size), 1..kMaxCodeLen
};

struct alignas(16) WarpBuffers {
  uint16_t ring[kRingSlots];   // stream words (huffman_ring.cuh)
  uint8_t stage[kStageElems];  // symbols of the current stage, in element order
};

// Decodes the steps of one stage into `stage` (symbol of element k * 32 + lane at that index).
// kFull: all 16 steps, every lane active. Otherwise `count` < kStageElems elements, and a lane
// past the chunk's end takes no word (FORMAT.md 2.3: only active lanes refill).
template <bool kFull>
__device__ __forceinline__ void decode_stage(WarpRing& ring, LaneBits& bits, uint32_t table, CodeShape code,
                                             int count, uint8_t* stage, int lane, uint32_t lower_lanes) {
  const uint32_t window = ring.window();
  uint32_t next_word = window;
#pragma unroll
  for (int k = 0; k < kStageSteps; ++k) {
    if (!kFull && k * kLanes >= count) break;
    const int32_t refill_above = kFull || k * kLanes + lane < count ? code.refill_above : INT32_MAX;
    stage[k * kLanes + lane] =
        static_cast<uint8_t>(decode_step(bits, next_word, table, code, refill_above, lower_lanes));
  }
  ring.advance((next_word - window) / 2);
}

// The symbol (as mapped into `table`) of chunk c's first element: lane 0's first code, taken
// from the chunk's first word. 0 for a chunk with no words.
__device__ __forceinline__ uint32_t first_symbol(const HuffmanStream& s, const uint16_t* table, int64_t c) {
  const uint32_t start = s.chunks[c];
  const uint32_t end = c + 1 < s.n_chunks ? min(s.chunks[c + 1], s.n_words) : s.n_words;
  const uint32_t word = start < end ? s.words[start] : 0u;
  return lut_symbol(table[word >> (kWordBits - s.max_len)]);
}

template <class Sink>
__device__ void decode_chunk(const HuffmanStream& s, const uint16_t* table, WarpBuffers& buffers, int64_t c,
                             int lane, Sink& sink) {
  const int64_t first = c * chunk_elems(s.chunk_steps);
  const int64_t m = chunk_size(s.n, s.chunk_steps, c);
  // Offsets come from the data: clamp them so that every read stays inside `words`.
  const uint32_t start = min(s.chunks[c], s.n_words);
  const uint32_t end = c + 1 < s.n_chunks ? max(start, min(s.chunks[c + 1], s.n_words)) : s.n_words;
  WarpRing ring(s.words, start, end, buffers.ring, lane);
  LaneBits bits;
  const CodeShape code(s.max_len);
  const uint32_t table_address = static_cast<uint32_t>(__cvta_generic_to_shared(table));
  const uint32_t lower_lanes = lane_mask_lt();
  sink.begin_chunk(s, table, c, first, m);
  // ring.window() synchronises the warp at the start of each stage, after the sink read the
  // previous stage's symbols and before they are overwritten.
  const int full_stages = static_cast<int>(m / kStageElems);
  for (int stage = 0; stage < full_stages; ++stage) {
    const int64_t done = int64_t(stage) * kStageElems;
    sink.prefetch(first + done, lane);
    decode_stage<true>(ring, bits, table_address, code, kStageElems, buffers.stage, lane, lower_lanes);
    __syncwarp();
    sink.write_full(first + done, buffers.stage, lane);
  }
  const int rest = static_cast<int>(m % kStageElems);
  if (rest > 0) {
    decode_stage<false>(ring, bits, table_address, code, rest, buffers.stage, lane, lower_lanes);
    __syncwarp();
    sink.write_partial(first + m - rest, rest, buffers.stage, lane);
  }
}

// Builds the block's shared decoder table from `lut`: symbols mapped by the sink, entries longer
// than L marked invalid (0). Each thread issues all its 16-byte loads before using any, so the
// table costs one trip to L2, not one per entry.
template <class Sink>
__device__ void build_table(const HuffmanStream& s, const Sink& sink, uint16_t* table, const uint8_t* symbol_map) {
  const int size = 1 << s.max_len;
  auto convert = [&](uint32_t entry) -> uint32_t {
    const uint32_t len = lut_len(entry) <= uint32_t(s.max_len) ? lut_len(entry) : 0u;
    const uint32_t symbol = lut_symbol(entry);
    return len << 8 | (Sink::kMapsSymbols ? symbol_map[symbol] : symbol);
  };
  auto convert_pair = [&](uint32_t pair) { return convert(pair & 0xFFFFu) | convert(pair >> 16) << 16; };
  uint4 raw[kTableLoads];
#pragma unroll
  for (int j = 0; j < kTableLoads; ++j) {
    const int i = 8 * (threadIdx.x + j * kDecodeThreads);
    if (i + 8 <= size) raw[j] = __ldg(reinterpret_cast<const uint4*>(s.table + i));
  }
#pragma unroll
  for (int j = 0; j < kTableLoads; ++j) {
    const int i = 8 * (threadIdx.x + j * kDecodeThreads);
    if (i + 8 <= size) {
      *reinterpret_cast<uint4*>(table + i) =
          make_uint4(convert_pair(raw[j].x), convert_pair(raw[j].y), convert_pair(raw[j].z), convert_pair(raw[j].w));
    }
  }
  if (size < 8 && int(threadIdx.x) < size) table[threadIdx.x] = static_cast<uint16_t>(convert(s.table[threadIdx.x]));
}

// One warp per chunk (looping while chunks remain), after the block builds its shared copy of the
// decoder table. 8 blocks per SM caps registers at 64 (no spills) and leaves room for 32 warps
// per SM, more than a 4096x14336 matrix has chunks per SM (3584 chunks of 16384 on 132 SMs: 28).
template <class Sink>
__global__ void __launch_bounds__(kDecodeThreads, 8) huffman_decode_kernel(HuffmanStream s, Sink sink) {
  extern __shared__ __align__(16) uint16_t table[];
  __shared__ WarpBuffers warp_buffers[kDecodeWarps];
  __shared__ uint8_t symbol_map[Sink::kMapsSymbols ? 256 : 1];
  if constexpr (Sink::kMapsSymbols) {
    for (int i = threadIdx.x; i < 256; i += kDecodeThreads) symbol_map[i] = static_cast<uint8_t>(sink.symbol_map(i));
    __syncthreads();
  }
  build_table(s, sink, table, symbol_map);
  __syncthreads();
  const int warp = threadIdx.x / kLanes;
  const int lane = threadIdx.x % kLanes;
  for (int64_t c = int64_t(blockIdx.x) * kDecodeWarps + warp; c < s.n_chunks; c += int64_t(gridDim.x) * kDecodeWarps) {
    decode_chunk(s, table, warp_buffers[warp], c, lane, sink);
  }
}

}  // namespace unweight::cuda
