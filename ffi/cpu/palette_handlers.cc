// CPU XLA FFI handler of palette -> bf16. Sizes come from the buffers; escape ids are checked
// against the tensor's groups before anything is written.
#include <cstdint>
#include <string>

#include "ffi_support.h"
#include "handlers.h"
#include "unweight/format.h"
#include "unweight/palette.h"

namespace unweight::cpu {

namespace {

ffi::Error palette_to_bf16(ffi::Buffer<ffi::U8> palette, ffi::Buffer<ffi::U8> idx, ffi::Buffer<ffi::U8> sm,
                           ffi::Buffer<ffi::U32> esc_groups, ffi::Buffer<ffi::U8> esc_exp,
                           ffi::ResultBuffer<ffi::BF16> out) {
  return guarded("unweight_palette_to_bf16", [&] {
    const Matrix m = matrix_of(sm);
    const int64_t n_esc = static_cast<int64_t>(esc_groups.element_count());
    if (palette.element_count() != kPaletteSize)
      return Status::Error("palette has " + std::to_string(palette.element_count()) + " entries, not 16");
    if (static_cast<int64_t>(idx.element_count()) != m.rows * packed_cols(m.cols))
      return Status::Error("idx has " + std::to_string(idx.element_count()) + " bytes; an [" + std::to_string(m.rows) +
                           ", " + std::to_string(m.cols) + "] tensor needs " +
                           std::to_string(m.rows * packed_cols(m.cols)));
    if (static_cast<int64_t>(esc_exp.element_count()) != n_esc * kGroup)
      return Status::Error("esc_exp has " + std::to_string(esc_exp.element_count()) + " bytes; " +
                           std::to_string(n_esc) + " escape groups need " + std::to_string(n_esc * kGroup));
    if (out->element_count() != sm.element_count())
      return Status::Error("output has " + std::to_string(out->element_count()) + " elements, sm has " +
                           std::to_string(sm.element_count()));
    return unpack_palette(palette.typed_data(), idx.typed_data(), sm.typed_data(), m.rows, m.cols,
                          esc_groups.typed_data(), esc_exp.typed_data(), n_esc,
                          reinterpret_cast<uint16_t*>(out->untyped_data()), kAllThreads);
  });
}

}  // namespace

}  // namespace unweight::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(UwPaletteToBf16Cpu, unweight::cpu::palette_to_bf16,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()   // palette [16]: the exponent of each slot
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()   // idx [R, ceil(C / 2)]: 4-bit slots
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()   // sm [R, C]: sign+mantissa bytes
                                  .Arg<xla::ffi::Buffer<xla::ffi::U32>>()  // esc_groups [n_esc]: flat group ids
                                  .Arg<xla::ffi::Buffer<xla::ffi::U8>>()   // esc_exp [n_esc, 64]: verbatim exponents
                                  .Ret<xla::ffi::Buffer<xla::ffi::BF16>>()  // the bf16 tensor, sm's shape
);
