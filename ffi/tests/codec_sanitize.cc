// A fuzz/smoke driver for the C++ codec under AddressSanitizer and UBSan (.ci/sanitize).
//
// Round-trips random bf16 tensors through encode -> decode and -> palette -> unpack, then feeds
// mutated streams, chunk indices, tables and escape lists to the decoders: each must either
// decode or return an error Status. The sanitizers turn any out-of-bounds access or undefined
// behaviour into a failure; a wrong round trip or a thrown exception fails the run here.
//
// usage: codec_sanitize [seconds = 60] [seed = 1]

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "unweight/format.h"
#include "unweight/huffman.h"
#include "unweight/palette.h"

namespace {

using namespace unweight;

uint64_t mutated = 0, refused = 0;  // mutated inputs fed to the decoders, and those they refused

[[noreturn]] void fail(const std::string& what, uint64_t seed) {
  std::fprintf(stderr, "codec_sanitize: %s (case seed %llu)\n", what.c_str(), static_cast<unsigned long long>(seed));
  std::exit(1);
}

// bf16 bit patterns whose exponents spread over about 2 * spread + 1 values, as weights' do.
std::vector<uint16_t> random_bf16(std::mt19937_64& rng, int64_t n, int spread) {
  std::uniform_int_distribution<int> exponent(127 - spread, 127 + spread), low(0, 0xFF);
  std::vector<uint16_t> bits(n);
  for (auto& b : bits) b = static_cast<uint16_t>((low(rng) & 0x80) << 8 | exponent(rng) << 7 | (low(rng) & 0x7F));
  return bits;
}

struct Encoded {
  std::vector<uint8_t> sm, table;
  std::vector<uint16_t> words;
  std::vector<uint32_t> chunks;
};

Encoded encode(const std::vector<uint16_t>& bits, int chunk_steps, int threads, uint64_t seed) {
  const auto n = static_cast<int64_t>(bits.size());
  Encoded out;
  out.sm.resize(n);
  out.chunks.resize(num_chunks(n, chunk_steps));
  const CanonicalCode code =
      canonical_code(huffman_code_lengths(split_bf16(bits.data(), n, nullptr, out.sm.data(), threads)));
  int64_t n_words = 0;
  if (Status st = plan_chunks(bits.data(), n, chunk_steps, code, out.chunks.data(), &n_words, threads); !st.ok())
    fail("plan_chunks refused valid input: " + st.message(), seed);
  out.words.resize(n_words);
  encode_chunks(bits.data(), n, chunk_steps, code, out.chunks.data(), out.words.data(), threads);
  out.table.resize(2 * code.symbols);
  write_table(code, out.table.data());
  return out;
}

// Decodes the parts as the Python binding does: table -> code -> decoder table -> stream.
Status decode(const Encoded& p, int64_t n, int chunk_steps, int threads, std::vector<uint16_t>* bits) {
  CodeLengths lengths;
  if (Status st = read_table(p.table.data(), static_cast<int64_t>(p.table.size() / 2), &lengths); !st.ok()) return st;
  const CanonicalCode code = canonical_code(lengths);
  std::vector<uint16_t> lut(size_t{1} << code.max_len);
  build_decoder_table(code, lut.data());
  int max_len = 0;
  if (Status st = check_decoder_table(lut.data(), static_cast<int64_t>(lut.size()), &max_len); !st.ok()) return st;
  const HuffmanStream stream{p.words.data(), static_cast<int64_t>(p.words.size()),
                             p.chunks.data(), static_cast<int64_t>(p.chunks.size()),
                             lut.data(),      max_len,
                             n,               chunk_steps};
  bits->assign(n, 0);
  return decode_bf16(stream, p.sm.data(), bits->data(), threads);
}

// One mutation of the parts: a random byte of words, chunks or table, or words shortened/lengthened.
void mutate(std::mt19937_64& rng, Encoded* p) {
  std::uniform_int_distribution<int> byte(0, 255), pick(0, 4);
  auto poke = [&](uint8_t* data, size_t size) {
    if (size) data[std::uniform_int_distribution<size_t>(0, size - 1)(rng)] = static_cast<uint8_t>(byte(rng));
  };
  switch (pick(rng)) {
    case 0: poke(reinterpret_cast<uint8_t*>(p->words.data()), 2 * p->words.size()); break;
    case 1: poke(reinterpret_cast<uint8_t*>(p->chunks.data()), 4 * p->chunks.size()); break;
    case 2: poke(p->table.data(), p->table.size()); break;
    case 3: if (!p->words.empty()) p->words.pop_back(); break;
    default: p->words.push_back(static_cast<uint16_t>(byte(rng) << 8 | byte(rng))); break;
  }
}

// A decoder table of random entries: check_decoder_table must refuse any entry longer than L,
// and a stream decoded with one it accepts must stay in bounds.
void fuzz_decoder_table(std::mt19937_64& rng, const Encoded& p, int64_t n, int chunk_steps) {
  const int L = std::uniform_int_distribution<int>(0, kMaxCodeLen + 1)(rng);
  std::vector<uint16_t> lut(size_t{1} << L);
  std::uniform_int_distribution<int> entry(0, 0xFFFF), small(0, L + 1);
  for (auto& e : lut) e = static_cast<uint16_t>(small(rng) << 8 | (entry(rng) & 0xFF));
  int max_len = 0;
  if (!check_decoder_table(lut.data(), static_cast<int64_t>(lut.size()), &max_len).ok()) return;
  const HuffmanStream stream{p.words.data(), static_cast<int64_t>(p.words.size()),
                             p.chunks.data(), static_cast<int64_t>(p.chunks.size()),
                             lut.data(),      max_len,
                             n,               chunk_steps};
  std::vector<uint8_t> e(n);
  (void)decode_exponents(stream, e.data(), 2);  // either outcome is fine; the sanitizers watch the accesses
}

// Palette round trip of exponents e [rows, cols], then mutated escape lists to the unpacker.
void check_palette(std::mt19937_64& rng, const std::vector<uint16_t>& bits, const Encoded& p, int64_t rows,
                   int64_t cols, uint64_t seed) {
  const auto n = static_cast<int64_t>(bits.size());
  std::vector<uint8_t> e(n);
  for (int64_t i = 0; i < n; ++i) e[i] = exponent_of(bits[i]);
  const Palette palette = choose_palette(exponent_histogram(e.data(), n, 2));
  std::vector<uint8_t> idx(rows * packed_cols(cols));
  Escapes escapes;
  if (Status st = pack_palette(e.data(), rows, cols, palette, idx.data(), &escapes, 2); !st.ok())
    fail("pack_palette refused valid input: " + st.message(), seed);
  std::vector<uint16_t> back(n);
  const auto n_esc = static_cast<int64_t>(escapes.groups.size());
  if (Status st = unpack_palette(palette.values.data(), idx.data(), p.sm.data(), rows, cols, escapes.groups.data(),
                                 escapes.exponents.data(), n_esc, back.data(), 2);
      !st.ok())
    fail("unpack_palette refused its own output: " + st.message(), seed);
  if (back != bits) fail("palette round trip changed the bits", seed);
  if (n_esc == 0) return;
  std::vector<uint32_t> groups = escapes.groups;
  groups[std::uniform_int_distribution<int64_t>(0, n_esc - 1)(rng)] = static_cast<uint32_t>(rng());
  (void)unpack_palette(palette.values.data(), idx.data(), p.sm.data(), rows, cols, groups.data(),
                       escapes.exponents.data(), n_esc, back.data(), 2);
}

void run_case(uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t rows = std::uniform_int_distribution<int64_t>(0, 40)(rng);
  const int64_t cols = std::uniform_int_distribution<int64_t>(1, 300)(rng);
  const int chunk_steps = std::uniform_int_distribution<int>(1, 8)(rng);
  const int threads = std::uniform_int_distribution<int>(1, 3)(rng);
  const int64_t n = rows * cols;
  const std::vector<uint16_t> bits = random_bf16(rng, n, std::uniform_int_distribution<int>(0, 60)(rng));

  const Encoded parts = encode(bits, chunk_steps, threads, seed);
  std::vector<uint16_t> back;
  if (Status st = decode(parts, n, chunk_steps, threads, &back); !st.ok())
    fail("decode refused its own encoding: " + st.message(), seed);
  if (back != bits) fail("Huffman round trip changed the bits", seed);
  check_palette(rng, bits, parts, rows, cols, seed);

  for (int k = 0; k < 8; ++k) {
    Encoded bad = parts;
    for (int m = std::uniform_int_distribution<int>(1, 3)(rng); m > 0; --m) mutate(rng, &bad);
    ++mutated;
    refused += !decode(bad, n, chunk_steps, threads, &back).ok();
  }
  fuzz_decoder_table(rng, parts, n, chunk_steps);
}

}  // namespace

int main(int argc, char** argv) {
  const double seconds = argc > 1 ? std::atof(argv[1]) : 60.0;
  const uint64_t base = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1;
  const auto stop = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  uint64_t cases = 0;
  try {
    while (std::chrono::steady_clock::now() < stop) run_case(base * 1000003 + cases++);
  } catch (const std::exception& e) {
    fail(std::string("exception: ") + e.what(), base * 1000003 + cases - 1);
  }
  std::printf("codec_sanitize: %llu cases, %llu of %llu mutated streams refused, no faults\n",
              static_cast<unsigned long long>(cases), static_cast<unsigned long long>(refused),
              static_cast<unsigned long long>(mutated));
  return 0;
}
