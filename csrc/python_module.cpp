// The Python extension module stdd_kernels._C. The ops register themselves
// with the dispatcher when this shared library loads (TORCH_LIBRARY in
// stca_ops.cpp), so the module itself only says how it was built. Plain
// CPython API instead of pybind11: nothing here needs it, and the file
// compiles in a second.
#include <Python.h>

#ifdef STDD_WITH_CUDA
#define STDD_CUDA_COMPILED 1
#else
#define STDD_CUDA_COMPILED 0
#endif

static struct PyModuleDef stdd_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled STCA operators (csrc/): torch.ops.stdd.mix_gather, pad_scatter, mix_factors, project_mixed and "
    "their backward ops.",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&stdd_c_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "CUDA_COMPILED", STDD_CUDA_COMPILED) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
