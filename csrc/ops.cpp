// The l2t_fast op library: schemas of the four channel-error ops (see
// l2t_fast/matching/backends/registration.py for their math) and of BatchNorm's double backward
// (batch_norm_cpu.cpp, used by l2t_fast/methods/l2tww/batchnorm.py), of 2x2 max pooling's
// backward and its derivative from the input alone (max_pool_cpu.cpp, used by
// l2t_fast/methods/l2tww/max_pool.py), of CKA's float64 Gram matrix
// (gram_cpu.cpp, used by l2t_fast/analysis/cka.py), and the Python module l2t_fast._C,
// whose import loads them. Kernels register per device: *_cpu.cpp, cuda/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(l2t_fast, m) {
  m.def(
      "channel_errors(Tensor[] source, Tensor[] target, Tensor[] weight, Tensor[] bias, "
      "int[] pair_source, int[] pair_target) -> Tensor");
  m.def(
      "channel_errors_backward(Tensor grad_errors, Tensor[] source, Tensor[] target, "
      "Tensor[] weight, Tensor[] bias, int[] pair_source, int[] pair_target, "
      "bool[] output_mask) -> (Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def(
      "channel_errors_double_backward(Tensor grad_errors, Tensor?[] tangent_source, "
      "Tensor?[] tangent_target, Tensor?[] tangent_weight, Tensor?[] tangent_bias, "
      "Tensor[] source, Tensor[] target, Tensor[] weight, Tensor[] bias, int[] pair_source, "
      "int[] pair_target, bool[] output_mask) "
      "-> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def(
      "channel_errors_with_grads(Tensor grad_errors, Tensor[] source, Tensor[] target, "
      "Tensor[] weight, Tensor[] bias, int[] pair_source, int[] pair_target, "
      "bool[] output_mask) -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def(
      "batch_norm_double_backward(Tensor input, Tensor weight, Tensor grad_out, Tensor mean, "
      "Tensor invstd, Tensor grad_grad_input, Tensor grad_grad_weight, "
      "Tensor grad_grad_bias) -> (Tensor grad_input, Tensor grad_weight, "
      "Tensor grad_grad_out)");
  m.def("max_pool2x2_backward(Tensor grad_output, Tensor input) -> Tensor");
  m.def("max_pool2x2_gather(Tensor grad_grad_input, Tensor input) -> Tensor");
  m.def("gram(Tensor features) -> Tensor");
}

#ifdef L2T_FAST_WITH_CUDA
static constexpr bool kWithCuda = true;
#else
static constexpr bool kWithCuda = false;
#endif

static PyObject* has_cuda(PyObject*, PyObject*) { return PyBool_FromLong(kWithCuda); }

static PyMethodDef methods[] = {
    {"has_cuda", has_cuda, METH_NOARGS, "Whether CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
