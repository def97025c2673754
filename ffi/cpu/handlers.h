// The CPU XLA FFI handlers, as (FFI target name, handler symbol) pairs for the Python module to
// hand out as capsules. The CUDA handlers of the same names are listed in cuda_module.cc.
#pragma once

#include "xla/ffi/api/c_api.h"

#define UW_CPU_HANDLERS(X)                                        \
  X("unweight_huffman_to_bf16", UwHuffmanToBf16Cpu)              \
  X("unweight_huffman_to_exponent", UwHuffmanToExponentCpu)      \
  X("unweight_huffman_to_palette", UwHuffmanToPaletteCpu)        \
  X("unweight_palette_to_bf16", UwPaletteToBf16Cpu)

#define UW_DECLARE_CPU_HANDLER(name, symbol) extern "C" XLA_FFI_Error* symbol(XLA_FFI_CallFrame*);
UW_CPU_HANDLERS(UW_DECLARE_CPU_HANDLER)
#undef UW_DECLARE_CPU_HANDLER
