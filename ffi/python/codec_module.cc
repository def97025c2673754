// Python binding of the C++ codec and the CPU XLA FFI handlers.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_codec, m) { m.doc() = "unweight C++ codec and CPU XLA FFI handlers"; }
