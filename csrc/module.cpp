// The Python module deq_fast._C. Its only job is to be importable: loading the shared library runs
// the static TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL registrations of every csrc/*.cpp and
// csrc/*.cu, after which the ops are reachable as torch.ops.deq_fast.*. No pybind11 and no
// torch/extension.h (which costs ~25 s of compile), as in pytorch/extension-cpp.
#include <Python.h>

extern "C" {

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                             // name
      "deq_fast C++/CUDA ops, registered as torch.ops.deq_fast.* on import",  // doc
      -1,                                                               // no per-module state
      nullptr,                                                          // no methods
  };
  return PyModule_Create(&module_def);
}

}  // extern "C"
