// Python module entry point of dcnv2_plugin._C. Importing the module loads
// the shared library, whose static initializers register the dcnv2::
// operators (see ops/*.cpp) with the dispatcher; it defines no Python
// functions of its own, only VECTOR_CLONES: the x86-64 levels the CPU
// sampling loops were compiled for (ops/cpu/vector_clones.h), comma-separated,
// empty when they were compiled for the build's target only.
#include <Python.h>

#include "ops/cpu/vector_clones.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "dcnv2 compiled operators (torch.ops.dcnv2)", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module && PyModule_AddStringConstant(module, "VECTOR_CLONES", DCNV2_VECTOR_CLONE_TARGETS) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
