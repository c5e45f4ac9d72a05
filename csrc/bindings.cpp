// Python bindings of the native engine (the only file that knows about Python).
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) { m.doc() = "sku-fast native task-vector engine"; }
