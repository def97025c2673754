// Huffman decoding (FORMAT.md 2.3): the 32 lanes of a chunk advance step by step exactly as a
// GPU warp does, with a 2^L table lookup per code and no branch per element; chunks go to
// threads. Steps run in AVX2 where the CPU has it (avx2.cc), else and near the end of
// the stream in scalar code. Every corruption of FORMAT.md 2.3 is caught, after the chunk,
// by counting.
#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "avx2.h"
#include "parallel.h"
#include "unweight/format.h"
#include "unweight/huffman.h"

namespace unweight {

namespace {

constexpr int64_t kChunksPerBlock = 4;

class ChunkDecoder {
 public:
  explicit ChunkDecoder(const HuffmanStream& s)
      : s_(s), lut32_(s.lut, s.lut + (int64_t{1} << s.max_len)), simd_(have_avx2()) {}

  // Decodes chunk `c` of a checked stream into `symbols` (the chunk's exponents).
  Status decode(int64_t c, uint8_t* symbols) const {
    const int64_t begin = s_.chunks[c];
    const int64_t end = c + 1 < s_.n_chunks ? int64_t{s_.chunks[c + 1]} : s_.n_words;
    const int64_t m = chunk_size(s_.n, s_.chunk_steps, c);
    auto runs_past = [c] {
      return Status::Error("corrupt Huffman stream: chunk " + std::to_string(c) + " runs past its words");
    };
    // Every active lane takes a word at step 0; after this `end - 1` is a word of the chunk.
    if (end - begin < std::min<int64_t>(m, kLanes)) return runs_past();

    // Locals, not members: the byte stores below could alias anything reached by pointer.
    const uint16_t* const words = s_.words;
    const uint32_t* const lut = lut32_.data();
    const int64_t last = end - 1;
    const int L = s_.max_len;
    LaneState lanes[kLanes];
    int64_t pos = begin;  // may count past `end`; reads past it are clamped
    uint32_t bad = 0;     // top bit set once an entry is 0: a code not in the table
    const int64_t full_steps = m / kLanes;
    const int64_t fast_steps =
        simd_ ? decode_steps_avx2(words, s_.n_words, &pos, lut, L, lanes, symbols, full_steps, &bad) : 0;
    for (int64_t i = fast_steps * kLanes; i < m; ++i) {
      LaneState& lane = lanes[i & (kLanes - 1)];
      pos += lane_refill_if_needed(lane, words[std::min(pos, last)], L);
      const uint32_t entry = lut[lane_peek(lane, L)];
      bad |= entry - 1;
      symbols[i] = static_cast<uint8_t>(lut_symbol(entry));
      lane_consume(lane, lut_len(entry));
    }

    if (pos > end) return runs_past();
    if (bad >> 31)
      return Status::Error("corrupt Huffman stream: chunk " + std::to_string(c) + " holds a code not in the table");
    if (pos < end)
      return Status::Error("corrupt Huffman stream: chunk " + std::to_string(c) + " leaves " +
                           std::to_string(end - pos) + " words unread");
    return Status();
  }

 private:
  const HuffmanStream& s_;
  std::vector<uint32_t> lut32_;  // the table widened for the AVX2 gather
  bool simd_;
};

// Runs per_chunk(decoder, c, scratch) -> Status over the chunks of a stream, after checking it,
// and returns the failure of the lowest failing chunk; `scratch` is a worker's buffer of one
// chunk's elements.
template <class PerChunk>
Status for_each_chunk(const HuffmanStream& s, int threads, PerChunk per_chunk) {
  if (Status st = check_stream(s); !st.ok()) return st;
  if (s.n == 0) return Status();
  const ChunkDecoder decoder(s);
  const Blocks blocks(s.n_chunks, kChunksPerBlock, threads);
  std::vector<std::vector<uint8_t>> scratch(blocks.workers());
  std::vector<Status> faults(blocks.blocks());
  // Blocks are taken in order, so every block below the lowest failing one still runs.
  std::atomic<int64_t> first_failed{blocks.blocks()};
  blocks.run([&](int worker, int64_t b) {
    if (b > first_failed.load()) return;
    std::vector<uint8_t>& buffer = scratch[worker];
    buffer.resize(std::min(s.n, chunk_elems(s.chunk_steps)));
    for (int64_t c = blocks.begin(b); c < blocks.end(b) && faults[b].ok(); ++c)
      faults[b] = per_chunk(decoder, c, buffer.data());
    if (!faults[b].ok()) {
      int64_t seen = first_failed.load();
      while (b < seen && !first_failed.compare_exchange_weak(seen, b)) {
      }
    }
  });
  for (Status& st : faults)
    if (!st.ok()) return st;
  return Status();
}

}  // namespace

Status check_stream(const HuffmanStream& s) {
  if (s.chunk_steps < 1) return Status::Error("chunk_steps must be positive, got " + std::to_string(s.chunk_steps));
  const int64_t expected = num_chunks(s.n, s.chunk_steps);
  if (s.n_chunks != expected)
    return Status::Error("stream has " + std::to_string(s.n_chunks) + " chunks; " + std::to_string(s.n) +
                         " elements in chunks of " + std::to_string(chunk_elems(s.chunk_steps)) + " make " +
                         std::to_string(expected));
  if (s.n == 0) {
    if (s.n_words != 0) return Status::Error("an empty tensor's stream has " + std::to_string(s.n_words) + " words, not 0");
    return Status();
  }
  if (s.max_len < 1 || s.max_len > kMaxCodeLen)
    return Status::Error("longest code length " + std::to_string(s.max_len) + " is outside 1.." +
                         std::to_string(kMaxCodeLen));
  if (s.chunks[0] != 0) return Status::Error("chunks[0] is " + std::to_string(s.chunks[0]) + ", not 0");
  for (int64_t c = 0; c < s.n_chunks; ++c) {
    if (c > 0 && s.chunks[c] < s.chunks[c - 1])
      return Status::Error("chunk offsets decrease at chunk " + std::to_string(c) + " (" +
                           std::to_string(s.chunks[c - 1]) + " then " + std::to_string(s.chunks[c]) + ")");
    if (s.chunks[c] > s.n_words)
      return Status::Error("chunks[" + std::to_string(c) + "] = " + std::to_string(s.chunks[c]) + " is past the " +
                           std::to_string(s.n_words) + " words of the stream");
  }
  return Status();
}

Status decode_exponents(const HuffmanStream& s, uint8_t* e, int threads) {
  return for_each_chunk(s, threads, [&](const ChunkDecoder& decoder, int64_t c, uint8_t*) {
    return decoder.decode(c, e + c * chunk_elems(s.chunk_steps));
  });
}

// Exponents first, then the join in a separate loop that the compiler vectorises.
Status decode_bf16(const HuffmanStream& s, const uint8_t* sm, uint16_t* bits, int threads) {
  return for_each_chunk(s, threads, [&](const ChunkDecoder& decoder, int64_t c, uint8_t* e) {
    Status st = decoder.decode(c, e);
    const int64_t base = c * chunk_elems(s.chunk_steps), m = chunk_size(s.n, s.chunk_steps, c);
    for (int64_t i = 0; i < m; ++i) bits[base + i] = join_bf16(e[i], sm[base + i]);
    return st;
  });
}

}  // namespace unweight
