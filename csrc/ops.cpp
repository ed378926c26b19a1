// The lowcost operator schemas (defined once, here) and the Python module init of lowcost._C.
//
// Importing lowcost._C loads this library; the static registrars below and the per-backend
// TORCH_LIBRARY_IMPL blocks (csrc/cpu/, csrc/cuda/) make the ops available as torch.ops.lowcost.*.
// Nothing here touches CUDA, so the CUDA build imports on a host without a GPU.
#ifndef LOWCOST_NO_PYTHON_MODULE
#include <Python.h>
#endif

#include <torch/library.h>

TORCH_LIBRARY(lowcost, m) {
  // x (M, K), any strides -> contiguous (M, K) in x.dtype: the dropped-out x~ = D (.) x.
  m.def("philox_dropout(Tensor x, int seed, float p) -> Tensor");
  // x (M, K) any float dtype, z (M, K) contiguous float32 -> D (.) x, contiguous in x.dtype, and z <- D (.) z in
  // place, under one mask generated once (the torch backend's backward: x~ for dA and the low-rank dx term).
  m.def("philox_dropout_pair_(Tensor x, Tensor(a!) z, int seed, float p) -> Tensor");
  // u = (D (.) x) lora_a^T, float32 (M, r).
  m.def("lora_down(Tensor x, Tensor lora_a, int seed, float p) -> Tensor");
  // Projections i = 0 .. P-1 (1 <= P <= 8) sharing x: lora_a = [A_0; A_1; ...] (sum r_i, K), ranks[i] = r_i ->
  // u = [u_0 u_1 ...] (M, sum r_i) float32, u_i = (D_i (.) x) A_i^T with D_i the mask lora_down draws for
  // (seeds[i], p[i]): u equals the P lora_down calls concatenated, bit for bit (CUDA: every r_i <= 64).
  m.def("lora_down_grouped(Tensor x, Tensor lora_a, int[] ranks, int[] seeds, float[] p) -> Tensor");
  // c = scale * u lora_b^T + bias, (M, N) in dtype.
  m.def("lora_up(Tensor u, Tensor lora_b, Tensor? bias, float scale, ScalarType dtype) -> Tensor");
  // One read of grad_y: du = scale * g B (M, r), dB = scale * g^T u (N, r), dbias = sum_m g (N,)
  // (all float32; dbias is an empty (0,) tensor when need_dbias is false).
  m.def(
      "lora_grad_pass(Tensor grad_y, Tensor u, Tensor lora_b, float scale, bool need_dbias) "
      "-> (Tensor, Tensor, Tensor)");
  // dx_lora = D (.) (du A) in x.dtype (M, K) (an empty (0,) tensor when need_dx is false) and
  // dA = du^T (D (.) x), float32 (r, K); the mask is generated once per element.
  m.def(
      "lora_dx_da(Tensor x, Tensor du, Tensor lora_a, int seed, float p, bool need_dx) "
      "-> (Tensor, Tensor)");
  // Projections i = 0 .. P-1 (1 <= P <= 8, sum of the r_i rounded up to 16 at most 256) sharing x: du = [du_0 du_1
  // ...] (M, sum r_i) float32, lora_a = [A_0; A_1; ...] (sum r_i, K), ranks[i] = r_i -> t = sum_i D_i (.) (du_i A_i)
  // in x.dtype (M, K) (summed in float32 in projection order, rounded once) and dA = [dA_0; dA_1; ...] float32
  // (sum r_i, K), dA_i = du_i^T (D_i (.) x), D_i the mask lora_dx_da draws for (seeds[i], p[i]): dA_i equals
  // lora_dx_da's bit for bit (CUDA: every r_i <= 64).
  m.def(
      "lora_dx_da_grouped(Tensor x, Tensor du, Tensor lora_a, int[] ranks, int[] seeds, float[] p) "
      "-> (Tensor, Tensor)");
  // The frozen base GEMMs on a quantized weight W (N, K), dequantized tile by tile in the kernel (CUDA only;
  // lowcost/ops/_cuda_backend.py). packed: the format's stored tensors then its code books (see
  // csrc/checks.h); scheme nf4, nf4-dq, int8, q8_0, q4_0, q4_1, q4_k or q6_k; c: optional, added before the
  // one rounding.
  // x (M, K) -> c + x deq(W)^T, (M, N = n_rows) in x.dtype.
  m.def("dequant_gemm(Tensor x, Tensor[] packed, str scheme, int n_rows, int block_size, Tensor? c) -> Tensor");
  // grad_y (M, N) -> c + grad_y deq(W), (M, K = n_cols) in grad_y.dtype.
  m.def(
      "dequant_gemm_dgrad(Tensor grad_y, Tensor[] packed, str scheme, int n_cols, int block_size, Tensor? c) "
      "-> Tensor");
  // The fused gated MLP's elementwise steps (lowcost/ops/_cuda_gated_mlp.py; math in csrc/gated_act.h), float32
  // arithmetic, one rounding per output. gate, up, dh: (M, I), one dtype, any strides; activation silu,
  // gelu_tanh or gelu. h = act(gate) (.) up, contiguous (M, I) in gate.dtype.
  m.def("gated_act_mul(Tensor gate, Tensor up, str activation) -> Tensor");
  // (d_gate, d_up) = ((dh (.) up) (.) act'(gate), dh (.) act(gate)), contiguous (M, I) in gate.dtype.
  m.def("gated_act_mul_backward(Tensor dh, Tensor gate, Tensor up, str activation) -> (Tensor, Tensor)");
  // The fused linear cross-entropy's row pass (lowcost/ops/linear_cross_entropy.py; math in csrc/xent_rows.h):
  // z (C, V) logits chunk, float32/float16/bfloat16, unit column stride; labels (C,) int64 in [0, V) or
  // ignore_index. Returns the loss of each row, float32 (C,) (0 for an ignored row). With row_weight (C,) float32,
  // z <- dz in place: w (softmax(zc) - (1 - eps) onehot(y) - eps / V) (. (1 - (zc / c)^2) when softcap c > 0).
  m.def(
      "softmax_xent_rows(Tensor(a!) z, Tensor labels, Tensor? row_weight, int ignore_index, float label_smoothing, "
      "float softcap) -> Tensor");
}

#ifndef LOWCOST_NO_PYTHON_MODULE
extern "C" {
// A module without Python functions: the ops are reached through torch.ops.lowcost.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                  // m_name
      "lowcost compiled ops, registered as torch.ops.lowcost",  // m_doc
      -1,                                                    // m_size
      nullptr,                                               // m_methods
      nullptr,                                               // m_slots
      nullptr,                                               // m_traverse
      nullptr,                                               // m_clear
      nullptr,                                               // m_free
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef LOWCOST_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  // lowcost._C.WITH_CUDA: 1 when this build also registered the CUDA kernels.
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
#endif
