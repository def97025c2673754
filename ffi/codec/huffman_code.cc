// The code of FORMAT.md section 2.1: lengths, canonical codes, the table part, the decoder table.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "unweight/format.h"
#include "unweight/huffman.h"

namespace unweight {

namespace {

// Per-depth leaf counts of the two-queue Huffman tree over `used` (sorted by (count, symbol)).
std::vector<int> huffman_depth_counts(const std::vector<std::pair<uint64_t, int>>& used) {
  const int k = static_cast<int>(used.size());
  // Nodes 0..k-1 are the leaves in queue order, k.. the merged nodes in creation order, so a
  // node's parent always has a larger index.
  std::vector<uint64_t> weight(2 * k - 1);
  std::vector<int> parent(2 * k - 1, -1);
  for (int i = 0; i < k; ++i) weight[i] = used[i].first;
  int leaf = 0, merged = k, next = k;
  auto take = [&]() {  // the smaller front; the leaf queue wins ties
    if (leaf < k && (merged >= next || weight[leaf] <= weight[merged])) return leaf++;
    return merged++;
  };
  for (; next < 2 * k - 1; ++next) {
    const int a = take(), b = take();
    weight[next] = weight[a] + weight[b];
    parent[a] = parent[b] = next;
  }
  std::vector<int> depth(2 * k - 1, 0);
  std::vector<int> per_depth(k, 0);  // a tree of k leaves is at most k - 1 deep
  for (int node = 2 * k - 3; node >= 0; --node) {
    depth[node] = depth[parent[node]] + 1;
    if (node < k) ++per_depth[depth[node]];
  }
  return per_depth;
}

// JPEG length limiting (ITU T.81 Annex K.3) on per-length counts `bits[1..]`.
void limit_lengths(std::vector<int>& bits) {
  for (int i = static_cast<int>(bits.size()) - 1; i > kMaxCodeLen; --i) {
    while (bits[i] > 0) {
      int j = i - 2;
      while (j > 0 && bits[j] == 0) --j;
      bits[i] -= 2;
      bits[i - 1] += 1;
      bits[j + 1] += 2;
      bits[j] -= 1;
    }
  }
}

}  // namespace

CodeLengths huffman_code_lengths(const Histogram& counts) {
  CodeLengths lengths{};
  std::vector<std::pair<uint64_t, int>> used;
  for (int s = 0; s < kSymbols; ++s)
    if (counts[s] > 0) used.emplace_back(counts[s], s);
  if (used.empty()) return lengths;
  if (used.size() == 1) {
    lengths[used[0].second] = 1;
    return lengths;
  }
  std::sort(used.begin(), used.end());
  std::vector<int> bits = huffman_depth_counts(used);
  bits.resize(std::max<size_t>(bits.size(), kMaxCodeLen + 1), 0);
  limit_lengths(bits);

  // The most frequent symbols take the shortest lengths.
  std::sort(used.begin(), used.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  size_t next = 0;
  for (int len = 1; len <= kMaxCodeLen; ++len)
    for (int c = 0; c < bits[len]; ++c) lengths[used[next++].second] = static_cast<uint8_t>(len);
  return lengths;
}

CanonicalCode canonical_code(const CodeLengths& lengths) {
  CanonicalCode code;
  code.length = lengths;
  std::vector<std::pair<int, int>> order;  // (length, symbol)
  for (int s = 0; s < kSymbols; ++s)
    if (lengths[s]) order.emplace_back(lengths[s], s);
  std::sort(order.begin(), order.end());
  uint32_t next = 0;
  int prev_len = order.empty() ? 0 : order[0].first;
  for (size_t i = 0; i < order.size(); ++i) {
    const auto [len, s] = order[i];
    if (i) next = (next + 1) << (len - prev_len);
    code.code[s] = static_cast<uint16_t>(next);
    prev_len = len;
  }
  code.max_len = order.empty() ? 0 : order.back().first;
  code.symbols = static_cast<int>(order.size());
  return code;
}

void write_table(const CanonicalCode& code, uint8_t* rows) {
  for (int s = 0; s < kSymbols; ++s) {
    if (!code.length[s]) continue;
    *rows++ = static_cast<uint8_t>(s);
    *rows++ = code.length[s];
  }
}

Status read_table(const uint8_t* rows, int64_t k, CodeLengths* lengths) {
  *lengths = {};
  if (k > kSymbols) return Status::Error("table has " + std::to_string(k) + " rows, more than 256 symbols");
  uint64_t kraft = 0;  // in units of 2^-kMaxCodeLen
  for (int64_t i = 0; i < k; ++i) {
    const int s = rows[2 * i], len = rows[2 * i + 1];
    if (i > 0 && s <= rows[2 * (i - 1)])
      return Status::Error("table symbols are not distinct and ascending (row " + std::to_string(i) + ", symbol " +
                           std::to_string(s) + ")");
    if (len < 1 || len > kMaxCodeLen)
      return Status::Error("table row " + std::to_string(i) + " (symbol " + std::to_string(s) + ") has length " +
                           std::to_string(len) + ", outside 1.." + std::to_string(kMaxCodeLen));
    (*lengths)[s] = static_cast<uint8_t>(len);
    kraft += uint64_t{1} << (kMaxCodeLen - len);
  }
  if (k == 1 && rows[1] != 1) return Status::Error("a single-symbol table must give its symbol length 1");
  if (k > 1 && kraft != (uint64_t{1} << kMaxCodeLen))
    return Status::Error(std::string("table lengths do not form a complete prefix code (Kraft sum ") +
                         (kraft > (uint64_t{1} << kMaxCodeLen) ? "above" : "below") + " 1)");
  return Status();
}

void build_decoder_table(const CanonicalCode& code, uint16_t* lut) {
  const int L = code.max_len;
  std::fill(lut, lut + (int64_t{1} << L), uint16_t{0});
  for (int s = 0; s < kSymbols; ++s) {
    const int len = code.length[s];
    if (!len) continue;
    const uint32_t first = uint32_t{code.code[s]} << (L - len);
    std::fill(lut + first, lut + first + (uint32_t{1} << (L - len)), static_cast<uint16_t>((len << 8) | s));
  }
}

Status check_decoder_table(const uint16_t* lut, int64_t size, int* max_len) {
  int L = 0;
  while (L <= kMaxCodeLen && (int64_t{1} << L) < size) ++L;
  if (L > kMaxCodeLen || (int64_t{1} << L) != size)
    return Status::Error("decoder table has " + std::to_string(size) + " entries; expected 2^L with L in 0.." +
                         std::to_string(kMaxCodeLen));
  for (int64_t i = 0; i < size; ++i)
    if (static_cast<int>(lut_len(lut[i])) > L)
      return Status::Error("decoder table entry " + std::to_string(i) + " has length " +
                           std::to_string(lut_len(lut[i])) + ", longer than L = " + std::to_string(L));
  *max_len = L;
  return Status();
}

}  // namespace unweight
