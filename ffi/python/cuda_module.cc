// The CUDA kernels' XLA FFI handlers, handed to Python as capsules keyed by FFI target name.
// Each kernel file in ffi/cuda/ defines its handlers with XLA_FFI_DEFINE_HANDLER_SYMBOL; add a
// line for each to UW_CUDA_HANDLERS and unweight_jax/ops registers them for platform "CUDA".
#include <pybind11/pybind11.h>

#include "xla/ffi/api/c_api.h"

namespace py = pybind11;

// X(target name, handler symbol)
#define UW_CUDA_HANDLERS(X)                                      \
  X("unweight_huffman_to_bf16", UwHuffmanToBf16Cuda)             \
  X("unweight_huffman_to_exponent", UwHuffmanToExponentCuda)     \
  X("unweight_huffman_to_palette", UwHuffmanToPaletteCuda)       \
  X("unweight_palette_to_bf16", UwPaletteToBf16Cuda)             \
  X("unweight_gemv_palette", UwGemvPaletteCuda)                  \
  X("unweight_gemv_exponent", UwGemvExponentCuda)                \
  X("unweight_gemv_bf16", UwGemvBf16Cuda)                        \
  X("unweight_gemm_palette", UwGemmPaletteCuda)                  \
  X("unweight_gemm_exponent", UwGemmExponentCuda)                \
  X("unweight_gemm_bf16", UwGemmBf16Cuda)

#define UW_DECLARE(name, symbol) extern "C" XLA_FFI_Error* symbol(XLA_FFI_CallFrame*);
UW_CUDA_HANDLERS(UW_DECLARE)
#undef UW_DECLARE

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "unweight CUDA kernels (XLA FFI handlers)";
  m.def("registrations", []() {
    py::dict handlers;
#define UW_ADD(name, symbol) handlers[name] = py::capsule(reinterpret_cast<void*>(&symbol));
    UW_CUDA_HANDLERS(UW_ADD)
#undef UW_ADD
    return handlers;
  });
}
