// The extension module pyvae._C. Importing it loads this library, whose static initialisers
// register pyvae's ops with PyTorch's dispatcher; it has no Python-level functions of its own.
#include <Python.h>
#include <torch/library.h>

// Each op adds its schemas to this namespace with TORCH_LIBRARY_FRAGMENT in csrc/ops/<op>.cpp.
TORCH_LIBRARY(pyvae, m) {}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pyvae's compiled kernels", -1,
                               nullptr};
  return PyModule_Create(&module);
}
