"""The plan's workspace of the ops on a quantized weight (``lowcost/plan/decode_workspace.py``) equals, to the
byte, what the torch backend really allocates inside them.

Each op's implementation (the body of its ``torch.library.custom_op``) runs on real CPU tensors under
``LiveBytes``, which follows every storage the op's Python code creates until it is freed; the op's peak of
live bytes minus its outputs is what it allocates and frees internally, the figure ``kernel_workspace`` adds
at that op. Checked for every stored format (NF4 with a K the block does not divide, NF4 double-quantized,
int8, GGUF Q8_0/Q4_0/Q4_1/Q4_K/Q6_K), float32 / bfloat16 x (and float32 adapters on bfloat16 x; float64
x without dropout),
one block of rows and several (the block limit lowered: 37 rows take 4 blocks, the last one row),
dropout on and off, with and without dx and bias: the LoRA linear, the frozen layer and its dgrad, and the
fused gated MLP, forward and backward. A decoder change that allocates differently fails here.
"""
import sys

import pytest
import torch
from torch.utils._pytree import tree_flatten

import lowcost.ops  # noqa: F401  (registers torch.ops.lowcost.*)
from lowcost.plan.decode_workspace import WORKSPACE_MODELS
from lowcost.plan.fake import LiveBytes
from lowcost.reference import qlora_linear as reference
from lowcost.reference.quant import BLOCK_TYPES, QuantizedWeight, quantize_int8, quantize_nf4, row_bytes

LINEAR = sys.modules["lowcost.ops.qlora_linear"]
GATED = sys.modules["lowcost.ops.qlora_gated_mlp"]
SCHEMES = ("nf4", "nf4-dq", "int8", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k")
DTYPES = {"float32": (torch.float32, torch.float32), "bfloat16": (torch.bfloat16, torch.bfloat16),
          "bf16 x, fp32 adapters": (torch.bfloat16, torch.float32), "float64": (torch.float64, torch.float64)}
N, R = 37, 12          # rows of W; rows per block when the block limit is lowered (4 blocks, the last one row)


def _k(scheme: str, wanted: int) -> int:
    """A K near ``wanted`` the format takes: GGUF rows are whole blocks (NF4 pads any K to its block)."""
    block = BLOCK_TYPES[scheme].block if scheme in BLOCK_TYPES else 1
    return max(block, wanted // block * block)


def _weight(scheme: str, n: int, k: int, seed: int) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    if scheme in BLOCK_TYPES:     # the bytes' values do not change what a decode allocates
        data = torch.randint(0, 256, (n, row_bytes(scheme, k)), generator=gen, dtype=torch.uint8)
        return QuantizedWeight(scheme, (n, k), {"data": data}, BLOCK_TYPES[scheme].block)
    weight = torch.randn(n, k, generator=gen)
    if scheme == "int8":
        return QuantizedWeight("int8", (n, k), quantize_int8(weight))
    return QuantizedWeight(scheme, (n, k), quantize_nf4(weight, 64, scheme == "nf4-dq"), 64)


def _measured(op, args) -> int:
    """Peak live bytes of ``op``'s implementation on ``args`` minus its outputs' bytes."""
    op._init_fn(*args)   # first call: lazily built code books and tables are not the op's workspace
    with LiveBytes() as meter:
        out = op._init_fn(*args)
    outputs = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
    return meter.peak - sum(outputs.values())


def _check(name: str, op, args) -> None:
    measured, modelled = _measured(op, args), WORKSPACE_MODELS[f"lowcost::{name}"](args)
    settings = [a for a in args if not isinstance(a, (torch.Tensor, list, tuple))] + [args[-1]]
    assert modelled == measured > 0, (name, modelled, measured, tuple(args[0].shape), settings)


@pytest.fixture(params=["one block", "several blocks"])
def blocks(request, monkeypatch):
    """Returns ``limit(k, rows)``: for several blocks, it lowers the block limit to ``rows`` rows (and a half) of
    K = ``k`` (the plan reads the same module constant)."""
    def limit(k: int, rows: int) -> None:
        if request.param == "several blocks":
            monkeypatch.setattr(reference, "ROW_CHUNK_ELEMENTS", rows * k + k // 2)
    return limit


def _rand(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_lora_linear_and_frozen_layer_workspace_is_the_measured_one(scheme, dtypes, blocks):
    x_dtype, adapter_dtype = DTYPES[dtypes]
    K, r = _k(scheme, 300), 5
    blocks(K, R)
    w = _weight(scheme, N, K, 0)
    gen = torch.Generator().manual_seed(1)
    a, b, bias = (_rand(gen, r, K, dtype=adapter_dtype), _rand(gen, N, r, dtype=adapter_dtype),
                  _rand(gen, N, dtype=x_dtype))
    seed = torch.tensor(7)
    for M in (1, 13):
        x = _rand(gen, M, K, dtype=x_dtype)
        g = _rand(gen, M, N, dtype=x_dtype)
        # float64 x (a test dtype the plan never traces) drops out through the pure-torch Philox reference, whose
        # temporaries the model leaves out: checked without dropout only
        for p, with_bias in ((0.0, False), (0.1, True))[:1 if x_dtype == torch.float64 else 2]:
            forward = (x, w.packed, scheme, N, w.block_size, a, b, bias if with_bias else None, 0.5, p, seed, "torch")
            _check("qlora_linear", LINEAR._qlora_linear_op, forward)
            u = LINEAR._qlora_linear_op._init_fn(*forward)[1]
            for needs in ([True, True, True, with_bias], [False, True, True, False], [True, False, False, False]):
                _check("qlora_linear_backward", LINEAR._qlora_linear_backward_op,
                       (g, x, w.packed, scheme, w.block_size, a, b, u, 0.5, p, seed, "torch", needs))
            _check("quantized_linear", LINEAR._quantized_linear_op,
                   (x, w.packed, scheme, N, w.block_size, bias if with_bias else None, "torch"))
        _check("quantized_linear_dgrad", LINEAR._quantized_linear_dgrad_op, (g, w.packed, scheme, K, w.block_size,
                                                                             "torch"))


@pytest.mark.parametrize("dtypes", ["float32", "bf16 x, fp32 adapters"])
@pytest.mark.parametrize("scheme", ["nf4", "int8", "q4_0", "q6_k"])
def test_fused_gated_mlp_workspace_is_the_measured_one(scheme, dtypes, blocks):
    """The three projections' workspaces: each allocated at its first decode and held to the end of the op.
    (Each format's decode is checked above; here one of each kind: padded NF4, int8, 32- and 256-blocks.)"""
    x_dtype, adapter_dtype = DTYPES[dtypes]
    H, inter, r, M = _k(scheme, 300), _k(scheme, 520), 3, 11
    blocks(H, inter // 3 + 1)            # gate and up: 3 blocks; down (K = inter): 2 or 3
    weights = [_weight(scheme, inter, H, 1), _weight(scheme, inter, H, 2), _weight(scheme, H, inter, 3)]
    gen = torch.Generator().manual_seed(2)
    adapters = [_rand(gen, *shape, dtype=adapter_dtype) for shape in ((r, H), (inter, r), (r, H), (inter, r),
                                                                      (r, inter), (H, r))]
    x, g, seeds = _rand(gen, M, H, dtype=x_dtype), _rand(gen, M, H, dtype=x_dtype), torch.tensor([3, 4, 5])
    stored = (*(w.packed for w in weights), *(w.scheme for w in weights), [w.block_size for w in weights])
    for dropouts in ([0.0, 0.0, 0.0], [0.1, 0.0, 0.2]):
        forward = (x, *stored, *adapters, [0.5] * 3, dropouts, seeds, "silu", "torch")
        _check("qlora_gated_mlp", GATED._qgated_op, forward)
        saved = GATED._qgated_op._init_fn(*forward)[1:]
        for needs in ([True] * 7, [False, False, True, True, False, True, False]):
            _check("qlora_gated_mlp_backward", GATED._qgated_backward_op,
                   (g, x, *stored, *adapters, *saved, [0.5] * 3, dropouts, seeds, "silu", needs, "torch"))
