// CPU XLA FFI handlers of the three Huffman decode ops. Sizes come from the buffers; the stream,
// the decoder table and the escape ids are checked by the codec before anything is written.
#include <cstdint>
#include <string>
#include <vector>

#include "ffi_support.h"
#include "handlers.h"
#include "unweight/format.h"
#include "unweight/huffman.h"
#include "unweight/palette.h"

namespace unweight::cpu {

namespace {

// The stream of `n` elements described by the three stream buffers.
Status make_stream(ffi::Buffer<ffi::U16> words, ffi::Buffer<ffi::U32> chunks, ffi::Buffer<ffi::U16> lut, int64_t n,
                   int32_t chunk_steps, HuffmanStream* stream) {
  int max_len = 0;
  if (Status st = check_decoder_table(lut.typed_data(), static_cast<int64_t>(lut.element_count()), &max_len); !st.ok())
    return st;
  *stream = HuffmanStream{words.typed_data(), static_cast<int64_t>(words.element_count()),
                          chunks.typed_data(), static_cast<int64_t>(chunks.element_count()),
                          lut.typed_data(),    max_len,
                          n,                   chunk_steps};
  return Status();
}

ffi::Error huffman_to_bf16(ffi::Buffer<ffi::U8> sm, ffi::Buffer<ffi::U16> words, ffi::Buffer<ffi::U32> chunks,
                           ffi::Buffer<ffi::U16> lut, int32_t chunk_steps, ffi::ResultBuffer<ffi::BF16> out) {
  return guarded("unweight_huffman_to_bf16", [&] {
    const int64_t n = static_cast<int64_t>(sm.element_count());
    if (static_cast<int64_t>(out->element_count()) != n)
      return Status::Error("output has " + std::to_string(out->element_count()) + " elements, sm has " +
                           std::to_string(n));
    HuffmanStream stream;
    if (Status st = make_stream(words, chunks, lut, n, chunk_steps, &stream); !st.ok()) return st;
    return decode_bf16(stream, sm.typed_data(), reinterpret_cast<uint16_t*>(out->untyped_data()), kAllThreads);
  });
}

ffi::Error huffman_to_exponent(ffi::Buffer<ffi::U16> words, ffi::Buffer<ffi::U32> chunks, ffi::Buffer<ffi::U16> lut,
                               int32_t chunk_steps, ffi::ResultBuffer<ffi::U8> out) {
  return guarded("unweight_huffman_to_exponent", [&] {
    HuffmanStream stream;
    const int64_t n = static_cast<int64_t>(out->element_count());
    if (Status st = make_stream(words, chunks, lut, n, chunk_steps, &stream); !st.ok()) return st;
    return decode_exponents(stream, out->typed_data(), kAllThreads);
  });
}

ffi::Error huffman_to_palette(ffi::Buffer<ffi::U16> words, ffi::Buffer<ffi::U32> chunks, ffi::Buffer<ffi::U16> lut,
                              ffi::Buffer<ffi::U8> sym_to_idx, ffi::Buffer<ffi::U32> esc_groups, int32_t chunk_steps,
                              int64_t cols, ffi::ResultBuffer<ffi::U8> idx) {
  return guarded("unweight_huffman_to_palette", [&] {
    const auto dims = idx->dimensions();
    if (cols < 0 || dims.size() != 2 || dims[1] != packed_cols(cols))
      return Status::Error("idx must be [R, ceil(cols / 2)] for cols = " + std::to_string(cols));
    if (sym_to_idx.element_count() != kSymbols)
      return Status::Error("sym_to_idx has " + std::to_string(sym_to_idx.element_count()) + " entries, not 256");
    const int64_t rows = dims[0];
    HuffmanStream stream;
    if (Status st = make_stream(words, chunks, lut, rows * cols, chunk_steps, &stream); !st.ok()) return st;
    std::vector<uint8_t> e(static_cast<size_t>(rows * cols));
    if (Status st = decode_exponents(stream, e.data(), kAllThreads); !st.ok()) return st;
    return pack_indices(e.data(), rows, cols, sym_to_idx.typed_data(), esc_groups.typed_data(),
                        static_cast<int64_t>(esc_groups.element_count()), idx->typed_data(), kAllThreads);
  });
}

}  // namespace

}  // namespace unweight::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(UwHuffmanToBf16Cpu, unweight::cpu::huffman_to_bf16,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()   // sm: sign+mantissa bytes, the tensor's shape
                                  .Arg<xla::ffi::Buffer<xla::ffi::U16>>()  // words: the interleaved stream
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()  // chunks: first word of each chunk
                                  .Arg<xla::ffi::Buffer<xla::ffi::U16>>()  // lut: 2^L decoder table
                                  .Attr<int32_t>("chunk_steps")            // S: a chunk is 32 * S elements
                                  .Ret<xla::ffi::Buffer<xla::ffi::BF16>>()  // the bf16 tensor, sm's shape
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(UwHuffmanToExponentCpu, unweight::cpu::huffman_to_exponent,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U16>>()  // words: the interleaved stream
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()  // chunks: first word of each chunk
                                  .Arg<xla::ffi::Buffer<xla::ffi::U16>>()  // lut: 2^L decoder table
                                  .Attr<int32_t>("chunk_steps")            // S: a chunk is 32 * S elements
                                  .Ret<xla::ffi::Buffer<xla::ffi::U8>>()   // exponent bytes; n = its size
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(UwHuffmanToPaletteCpu, unweight::cpu::huffman_to_palette,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U16>>()  // words: the interleaved stream
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()  // chunks: first word of each chunk
                                  .Arg<xla::ffi::Buffer<xla::ffi::U16>>()  // lut: 2^L decoder table
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()   // sym_to_idx: palette slot per exponent
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()  // esc_groups: flat ids of escape groups
                                  .Attr<int32_t>("chunk_steps")            // S: a chunk is 32 * S elements
                                  .Attr<int64_t>("cols")                   // C of the [R, C] view
                                  .Ret<xla::ffi::Buffer<xla::ffi::U8>>()   // idx [R, ceil(C / 2)]
);
