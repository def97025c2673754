// The Huffman (distribution) form of FORMAT.md section 2: building the code, encoding bf16 bit
// patterns into the interleaved word stream, and decoding it back, multi-threaded over chunks.
//
// Every function that reads compressed data checks it first and returns a Status naming the
// problem; none reads or writes outside the buffers whose sizes it is given.
#pragma once

#include <array>
#include <cstdint>

#include "unweight/status.h"

namespace unweight {

constexpr int kSymbols = 256;
using Histogram = std::array<uint64_t, kSymbols>;    // occurrences of each exponent byte
using CodeLengths = std::array<uint8_t, kSymbols>;   // 0 = symbol absent

// ---- the code (section 2.1)

// Length-limited Huffman code lengths, exactly as FORMAT.md 2.1 prescribes.
CodeLengths huffman_code_lengths(const Histogram& counts);

struct CanonicalCode {
  CodeLengths length{};
  std::array<uint16_t, kSymbols> code{};  // MSB-first, `length` bits
  int max_len = 0;                         // L; 0 for an empty code
  int symbols = 0;                         // k, rows of the table part
};
CanonicalCode canonical_code(const CodeLengths& lengths);

// The `table` part: k rows (symbol, length) sorted by symbol; `rows` holds 2 * code.symbols bytes.
void write_table(const CanonicalCode& code, uint8_t* rows);
// Reads and validates a table part (distinct ascending symbols, lengths 1..12, a complete code
// or a single symbol of length 1).
Status read_table(const uint8_t* rows, int64_t k, CodeLengths* lengths);

// The 2^L decoder table: entry = (len << 8) | symbol, 0 for a code not in the table.
void build_decoder_table(const CanonicalCode& code, uint16_t* lut);
// Checks a decoder table handed in from outside: 2^L entries with L in 0..12, no entry longer
// than L (a longer one would make a decoder consume bits it has not peeked). Sets *max_len = L.
Status check_decoder_table(const uint16_t* lut, int64_t size, int* max_len);

// ---- encoding (sections 2.2, 2.3): split, plan, write

// Writes the sign+mantissa bytes and, when `e` is not null, the exponent bytes; returns the
// exponent histogram.
Histogram split_bf16(const uint16_t* bits, int64_t n, uint8_t* e, uint8_t* sm, int threads);

// The first word of every chunk (`chunks`, num_chunks(n, chunk_steps) entries) and the total
// number of words, from the code lengths alone; fails if the stream outgrows u32 offsets.
Status plan_chunks(const uint16_t* bits, int64_t n, int chunk_steps, const CanonicalCode& code,
                   uint32_t* chunks, int64_t* n_words, int threads);

// Writes the interleaved word stream into `words`, each chunk at its planned offset.
void encode_chunks(const uint16_t* bits, int64_t n, int chunk_steps, const CanonicalCode& code,
                   const uint32_t* chunks, uint16_t* words, int threads);

// ---- decoding

// A Huffman stream as found in memory; sizes come from the buffers, not from the data.
struct HuffmanStream {
  const uint16_t* words;
  int64_t n_words;
  const uint32_t* chunks;
  int64_t n_chunks;
  const uint16_t* lut;  // 2^max_len entries
  int max_len;
  int64_t n;  // elements
  int chunk_steps;
};

// Chunk count and offsets (chunks[0] = 0, non-decreasing, within n_words) and code length.
Status check_stream(const HuffmanStream& s);

// Decoders check the stream, then every chunk: a code not in the table, a chunk running past
// its words or leaving words unread fails with the lowest such chunk named.
Status decode_exponents(const HuffmanStream& s, uint8_t* e, int threads);
Status decode_bf16(const HuffmanStream& s, const uint8_t* sm, uint16_t* bits, int threads);

}  // namespace unweight
