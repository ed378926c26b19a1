"""The fused linear cross-entropy's cuda backend on CUDA tensors: the CUDA row kernel ``softmax_xent_rows`` against
its C++ CPU twin and float64 (the composition around it is the CPU-tested one, tests/ops).

Marked ``gpu``: skipped with a reason on machines without CUDA (conftest). Run by benchmarks/device/run.sh.
"""
from __future__ import annotations

import pytest
import torch

from lowcost.ops.backend import cuda_kernels_usable
from lowcost.reference.linear_cross_entropy import CrossEntropySpec, softmax_xent_rows
from helpers import TOLERANCE, assert_close_to_reference

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
ops = torch.ops.lowcost


def _cuda_backend_or_skip():
    if not torch.cuda.is_available() or not cuda_kernels_usable(CUDA):
        pytest.skip("the cuda backend's kernels are not built or no GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C,V", [(1, 1), (7, 1001), (300, 4096), (3, 128256)])
@pytest.mark.parametrize("smoothing,softcap", [(0.0, 0.0), (0.1, 0.0), (0.2, 30.0)])
def test_row_kernel_matches_cpu_twin_and_float64(dtype, C, V, smoothing, softcap):
    """Same lanes and tree as the CPU twin; only expf/logf differ by an ulp on the GPU: loss within fp32's
    tolerance of the twin and of float64, dz within the dtype's."""
    _cuda_backend_or_skip()
    gen = torch.Generator().manual_seed(C + V)
    z = (torch.randn(C, V, generator=gen, dtype=torch.float64) * 4).to(dtype)
    labels = torch.randint(0, V, (C,), generator=gen)
    labels[::3] = -100
    weight = torch.rand(C, generator=gen) + 0.5
    z_cpu, z_gpu, z64 = z.clone(), z.to(CUDA), z.double()
    loss_cpu = ops.softmax_xent_rows(z_cpu, labels, weight, -100, smoothing, softcap)
    loss_gpu = ops.softmax_xent_rows(z_gpu, labels.to(CUDA), weight.to(CUDA), -100, smoothing, softcap)
    loss64 = softmax_xent_rows(z64, labels, weight.double(), CrossEntropySpec(-100, smoothing, softcap))
    assert_close_to_reference("loss", loss_gpu.cpu(), loss64, torch.float32)
    assert_close_to_reference("dz", z_gpu.cpu(), z64, dtype)
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=TOLERANCE[torch.float32], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_kernel_bits_do_not_depend_on_the_split(dtype):
    """A chunk of 3 rows of 20007 logits runs split (launch_plan.h: 3 blocks per row, partials through a workspace),
    the same rows at the head of a 2000-row chunk run one block per row: a row's pieces and their fold are fixed by
    V (csrc/xent_rows.h), so loss and dz are the same bits."""
    _cuda_backend_or_skip()
    C, V = 2000, 20007
    gen = torch.Generator().manual_seed(7)
    z = (torch.randn(C, V, generator=gen) * 4).to(dtype).to(CUDA)
    labels = torch.randint(0, V, (C,), generator=gen).to(CUDA)
    weight = (torch.rand(C, generator=gen) + 0.5).to(CUDA)
    z_few, z_many = z[:3].clone(), z.clone()
    loss_few = ops.softmax_xent_rows(z_few, labels[:3], weight[:3], -100, 0.1, 30.0)
    loss_many = ops.softmax_xent_rows(z_many, labels, weight, -100, 0.1, 30.0)
    assert torch.equal(loss_few, loss_many[:3]) and torch.equal(z_few, z_many[:3])
