// Entry point of icakd_fast._C.
//
// The extension is a library of torch operators (namespace icakd_fast_C) registered with
// TORCH_LIBRARY_FRAGMENT in cam.cpp, bank.cpp and structure.cpp; the CPU and CUDA kernels are
// registered in cpu/ and cuda/. It carries no Python bindings: Python loads it with
// torch.ops.load_library. The empty module below only lets `import icakd_fast._C` succeed too.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef icakd_module = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "icakd_fast operator library (ops live in torch.ops.icakd_fast_C)",
      -1,
      nullptr,
  };
  return PyModule_Create(&icakd_module);
}
}
