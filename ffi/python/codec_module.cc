// Python binding of the C++ codec (numpy in, numpy out, the GIL released while working) and the
// CPU XLA FFI handlers, handed out as capsules keyed by FFI target name.
// unweight_jax/codec.py is the public face; it normalises dtypes, this module checks sizes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cpu/handlers.h"
#include "unweight/format.h"
#include "unweight/huffman.h"
#include "unweight/palette.h"

namespace py = pybind11;

namespace unweight {

namespace {

template <class T>
using Array = py::array_t<T, py::array::c_style>;

// Raised to Python as unweight_jax.format.FormatError.
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

void raise_if_failed(const Status& status) {
  if (!status.ok()) throw FormatError(status.message());
}

std::vector<py::ssize_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

// The canonical code of a table part (k, 2); validated.
CanonicalCode code_of(const Array<uint8_t>& table) {
  if (table.ndim() != 2 || table.shape(1) != 2) throw FormatError("table must be [k, 2] (symbol, length) rows");
  CodeLengths lengths;
  raise_if_failed(read_table(table.data(), table.shape(0), &lengths));
  return canonical_code(lengths);
}

// A stream of `n` elements over numpy parts; `lut` receives the decoder table it points to.
HuffmanStream stream_of(const Array<uint16_t>& words, const Array<uint32_t>& chunks, const Array<uint8_t>& table,
                        int64_t n, int chunk_steps, std::vector<uint16_t>* lut) {
  const CanonicalCode code = code_of(table);
  lut->assign(size_t{1} << code.max_len, 0);
  build_decoder_table(code, lut->data());
  HuffmanStream stream{words.data(), words.size(), chunks.data(), chunks.size(), lut->data(),
                       code.max_len, n,            chunk_steps};
  raise_if_failed(check_stream(stream));
  return stream;
}

py::tuple encode(const Array<uint16_t>& bits, int chunk_steps, int threads) {
  if (chunk_steps < 1) throw std::invalid_argument("chunk_steps must be positive, got " + std::to_string(chunk_steps));
  const int64_t n = bits.size();
  Array<uint8_t> sm(shape_of(bits));
  Array<uint32_t> chunks(num_chunks(n, chunk_steps));
  CanonicalCode code;
  int64_t n_words = 0;
  {
    py::gil_scoped_release release;
    code = canonical_code(huffman_code_lengths(split_bf16(bits.data(), n, nullptr, sm.mutable_data(), threads)));
    raise_if_failed(plan_chunks(bits.data(), n, chunk_steps, code, chunks.mutable_data(), &n_words, threads));
  }
  Array<uint16_t> words(n_words);
  Array<uint8_t> table({py::ssize_t{code.symbols}, py::ssize_t{2}});
  {
    py::gil_scoped_release release;
    encode_chunks(bits.data(), n, chunk_steps, code, chunks.data(), words.mutable_data(), threads);
    write_table(code, table.mutable_data());
  }
  return py::make_tuple(sm, words, chunks, table);
}

void validate(const Array<uint16_t>& words, const Array<uint32_t>& chunks, const Array<uint8_t>& table, int64_t n,
              int chunk_steps) {
  std::vector<uint16_t> lut;
  stream_of(words, chunks, table, n, chunk_steps, &lut);
}

Array<uint16_t> decoder_table(const Array<uint8_t>& table) {
  const CanonicalCode code = code_of(table);
  Array<uint16_t> lut(py::ssize_t{1} << code.max_len);
  build_decoder_table(code, lut.mutable_data());
  return lut;
}

Array<uint16_t> decode_bf16_array(const Array<uint8_t>& sm, const Array<uint16_t>& words,
                                  const Array<uint32_t>& chunks, const Array<uint8_t>& table, int chunk_steps,
                                  int threads) {
  std::vector<uint16_t> lut;
  const HuffmanStream stream = stream_of(words, chunks, table, sm.size(), chunk_steps, &lut);
  Array<uint16_t> bits(shape_of(sm));
  Status status;
  {
    py::gil_scoped_release release;
    status = decode_bf16(stream, sm.data(), bits.mutable_data(), threads);
  }
  raise_if_failed(status);
  return bits;
}

Array<uint8_t> decode_exponent_array(const Array<uint16_t>& words, const Array<uint32_t>& chunks,
                                     const Array<uint8_t>& table, int64_t n, int chunk_steps, int threads) {
  std::vector<uint16_t> lut;
  const HuffmanStream stream = stream_of(words, chunks, table, n, chunk_steps, &lut);
  Array<uint8_t> e(n);
  Status status;
  {
    py::gil_scoped_release release;
    status = decode_exponents(stream, e.mutable_data(), threads);
  }
  raise_if_failed(status);
  return e;
}

struct PaletteArrays {
  Array<uint8_t> palette;
  Array<uint8_t> idx;
  Array<uint32_t> esc_groups;
  Array<uint8_t> esc_exp;
};

// The palette form of exponents e [R, C] whose histogram is `counts` (sm aside).
PaletteArrays palette_of(const uint8_t* e, int64_t rows, int64_t cols, const Histogram& counts, int threads) {
  const Palette palette = choose_palette(counts);
  PaletteArrays out{Array<uint8_t>(kPaletteSize), Array<uint8_t>({rows, int64_t{packed_cols(cols)}}), {}, {}};
  Escapes escapes;
  Status status;
  {
    py::gil_scoped_release release;
    status = pack_palette(e, rows, cols, palette, out.idx.mutable_data(), &escapes, threads);
  }
  raise_if_failed(status);
  std::copy(palette.values.begin(), palette.values.end(), out.palette.mutable_data());
  const auto n_esc = static_cast<py::ssize_t>(escapes.groups.size());
  out.esc_groups = Array<uint32_t>(n_esc);
  std::copy(escapes.groups.begin(), escapes.groups.end(), out.esc_groups.mutable_data());
  out.esc_exp = Array<uint8_t>({n_esc, py::ssize_t{kGroup}});
  std::copy(escapes.exponents.begin(), escapes.exponents.end(), out.esc_exp.mutable_data());
  return out;
}

void check_matrix(int64_t rows, int64_t cols, int64_t n, const char* what) {
  if (rows < 0 || cols < 0 || rows * cols != n)
    throw FormatError(std::string(what) + " has " + std::to_string(n) + " elements, not [" + std::to_string(rows) +
                      ", " + std::to_string(cols) + "]");
}

// -> (palette, idx, sm, esc_groups, esc_exp)
py::tuple to_palette(const Array<uint16_t>& bits, int64_t rows, int64_t cols, int threads) {
  check_matrix(rows, cols, bits.size(), "bits");
  std::vector<uint8_t> e(bits.size());
  Array<uint8_t> sm({rows, cols});
  Histogram counts;
  {
    py::gil_scoped_release release;
    counts = split_bf16(bits.data(), bits.size(), e.data(), sm.mutable_data(), threads);
  }
  const PaletteArrays p = palette_of(e.data(), rows, cols, counts, threads);
  return py::make_tuple(p.palette, p.idx, sm, p.esc_groups, p.esc_exp);
}

// -> (palette, idx, esc_groups, esc_exp); the sm part is the Huffman form's own.
py::tuple huffman_to_palette(const Array<uint16_t>& words, const Array<uint32_t>& chunks, const Array<uint8_t>& table,
                             int64_t rows, int64_t cols, int chunk_steps, int threads) {
  if (rows < 0 || cols < 0) throw FormatError("negative matrix shape");
  std::vector<uint16_t> lut;
  const HuffmanStream stream = stream_of(words, chunks, table, rows * cols, chunk_steps, &lut);
  std::vector<uint8_t> e(static_cast<size_t>(rows * cols));
  Status status;
  Histogram counts{};
  {
    py::gil_scoped_release release;
    status = decode_exponents(stream, e.data(), threads);
    if (status.ok()) counts = exponent_histogram(e.data(), rows * cols, threads);
  }
  raise_if_failed(status);
  const PaletteArrays p = palette_of(e.data(), rows, cols, counts, threads);
  return py::make_tuple(p.palette, p.idx, p.esc_groups, p.esc_exp);
}

Array<uint16_t> from_palette(const Array<uint8_t>& palette, const Array<uint8_t>& idx, const Array<uint8_t>& sm,
                             const Array<uint32_t>& esc_groups, const Array<uint8_t>& esc_exp, int64_t rows,
                             int64_t cols, int threads) {
  check_matrix(rows, cols, sm.size(), "sm");
  check_matrix(rows, packed_cols(cols), idx.size(), "idx");
  if (palette.size() != kPaletteSize) throw FormatError("palette has " + std::to_string(palette.size()) + " entries, not 16");
  if (esc_exp.size() != esc_groups.size() * kGroup)
    throw FormatError("esc_exp has " + std::to_string(esc_exp.size()) + " bytes; " +
                      std::to_string(esc_groups.size()) + " escape groups need " +
                      std::to_string(esc_groups.size() * kGroup));
  Array<uint16_t> bits({rows, cols});
  Status status;
  {
    py::gil_scoped_release release;
    status = unpack_palette(palette.data(), idx.data(), sm.data(), rows, cols, esc_groups.data(), esc_exp.data(),
                            esc_groups.size(), bits.mutable_data(), threads);
  }
  raise_if_failed(status);
  return bits;
}

py::dict registrations() {
  py::dict handlers;
#define UW_ADD(name, symbol) handlers[name] = py::capsule(reinterpret_cast<void*>(&symbol));
  UW_CPU_HANDLERS(UW_ADD)
#undef UW_ADD
  return handlers;
}

}  // namespace

}  // namespace unweight

PYBIND11_MODULE(_codec, m) {
  using namespace unweight;
  m.doc() = "unweight C++ codec and CPU XLA FFI handlers";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const FormatError& e) {
      py::object cls = py::module_::import("unweight_jax.format").attr("FormatError");
      PyErr_SetString(cls.ptr(), e.what());
    }
  });
  m.def("encode", &encode, py::arg("bits").noconvert(), py::arg("chunk_steps"), py::arg("threads"),
        "bf16 bit patterns -> (sm, words, chunks, table)");
  m.def("validate", &validate, py::arg("words").noconvert(), py::arg("chunks").noconvert(),
        py::arg("table").noconvert(), py::arg("n"), py::arg("chunk_steps"),
        "Checks the table and the chunk offsets of a stream of n elements; raises FormatError");
  m.def("decoder_table", &decoder_table, py::arg("table").noconvert(), "table part -> u16[2^L] decoder table");
  m.def("decode_bf16", &decode_bf16_array, py::arg("sm").noconvert(), py::arg("words").noconvert(),
        py::arg("chunks").noconvert(), py::arg("table").noconvert(), py::arg("chunk_steps"), py::arg("threads"),
        "Huffman parts -> bf16 bit patterns in sm's shape");
  m.def("decode_exponents", &decode_exponent_array, py::arg("words").noconvert(), py::arg("chunks").noconvert(),
        py::arg("table").noconvert(), py::arg("n"), py::arg("chunk_steps"), py::arg("threads"),
        "Huffman stream -> u8[n] exponent bytes");
  m.def("to_palette", &to_palette, py::arg("bits").noconvert(), py::arg("rows"), py::arg("cols"), py::arg("threads"),
        "bf16 bit patterns [R, C] -> (palette, idx, sm, esc_groups, esc_exp)");
  m.def("huffman_to_palette", &huffman_to_palette, py::arg("words").noconvert(), py::arg("chunks").noconvert(),
        py::arg("table").noconvert(), py::arg("rows"), py::arg("cols"), py::arg("chunk_steps"), py::arg("threads"),
        "Huffman stream of an [R, C] tensor -> (palette, idx, esc_groups, esc_exp)");
  m.def("from_palette", &from_palette, py::arg("palette").noconvert(), py::arg("idx").noconvert(),
        py::arg("sm").noconvert(), py::arg("esc_groups").noconvert(), py::arg("esc_exp").noconvert(), py::arg("rows"),
        py::arg("cols"), py::arg("threads"), "palette parts -> bf16 bit patterns [R, C]");
  m.def("registrations", &registrations, "FFI target name -> capsule of its CPU handler");
}
