// Python module entry point of dcnv2_plugin._C. Importing the module loads
// the shared library, whose static initializers register the dcnv2::
// operators (see ops/*.cpp) with the dispatcher; it defines no Python
// functions of its own.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "dcnv2 compiled operators (torch.ops.dcnv2)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
