// The CUDA backend of the lowcost ops: one TORCH_LIBRARY_IMPL block. Registration is static and
// touches no device, so the library loads on a host without a GPU.
#include "ops_cuda.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(lowcost, CUDA, m) {
  m.impl("philox_dropout", &lowcost::cuda::philox_dropout);
  m.impl("lora_down", &lowcost::cuda::lora_down);
  m.impl("lora_down_grouped", &lowcost::cuda::lora_down_grouped);
  m.impl("lora_up", &lowcost::cuda::lora_up);
  m.impl("lora_grad_pass", &lowcost::cuda::lora_grad_pass);
  m.impl("lora_dx_da", &lowcost::cuda::lora_dx_da);
  m.impl("lora_dx_da_grouped", &lowcost::cuda::lora_dx_da_grouped);
  m.impl("dequant_gemm", &lowcost::cuda::dequant_gemm);
  m.impl("dequant_gemm_dgrad", &lowcost::cuda::dequant_gemm_dgrad);
  m.impl("gated_act_mul", &lowcost::cuda::gated_act_mul);
  m.impl("gated_act_mul_backward", &lowcost::cuda::gated_act_mul_backward);
  m.impl("softmax_xent_rows", &lowcost::cuda::softmax_xent_rows);
}
