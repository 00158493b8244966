// The Python module deq_fast._C. Importing it runs the static TORCH_LIBRARY (ops.cpp) and
// TORCH_LIBRARY_IMPL (cpu/, cuda/) registrations (the ops are then reachable as
// torch.ops.deq_fast.*) and adds the module function backward_solve (backward/loop.cpp). No
// pybind11 and no torch/extension.h here (it costs ~25 s of compile), as in pytorch/extension-cpp.
#include <Python.h>

#include "deq_fast/module.h"  // register_backward_bindings

extern "C" {

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                             // name
      "deq_fast C++/CUDA ops, registered as torch.ops.deq_fast.* on import",  // doc
      -1,                                                               // no per-module state
      nullptr,                                                          // no methods
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (register_backward_bindings(module) != 0) {  // adds backward_solve (backward/loop.cpp)
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

}  // extern "C"
