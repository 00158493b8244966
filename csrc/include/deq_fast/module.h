// Declarations shared by the Python module init (module.cpp) and the backward loop
// (backward/loop.cpp). Host code only.
#pragma once

typedef struct _object PyObject;  // same declaration as Python.h

// Adds the backward-solve entry point `backward_solve` (the C++ iteration loop) to the extension
// module `module` (deq_fast._C); to be called from its PyInit function, which uses the plain
// C API. Returns 0, or -1 with a Python exception set (C-API convention).
int register_backward_bindings(PyObject* module);
