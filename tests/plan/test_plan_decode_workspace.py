"""The plan's workspace of the ops on a quantized weight (``lowcost/plan/decode_workspace.py``) equals, to the
byte, what the torch backend really allocates inside them.

Each op's implementation (the body of its ``torch.library.custom_op``) runs on real CPU tensors under
``LiveBytes``, which follows every storage the op's Python code creates until it is freed; the op's peak of
live bytes minus its outputs is what it allocates and frees internally, the figure ``kernel_workspace`` adds
at that op. Checked for every stored format (NF4 with a K the block does not divide, NF4 double-quantized,
int8, GGUF Q8_0/Q4_0/Q4_1/Q4_K/Q6_K), float32 / bfloat16 x (and float32 adapters on bfloat16 x; float64
x without dropout),
one block of rows and several (the block limit lowered: 37 rows take 4 blocks, the last one row),
dropout on and off, with and without dx and bias: the LoRA linear, the frozen layer and its dgrad, the
fused gated MLP and the grouped projections (P = 2 and 3, mixed formats, N_i and ranks), forward and backward. A decoder change that allocates differently fails here.
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
GROUPED = sys.modules["lowcost.ops.qlora_grouped_linear"]
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


def _check(name: str, op, args, empty: bool = False) -> None:
    """The model equals the measured workspace, which is positive (0 where ``empty``: an op that makes nothing
    but its outputs, checked all the same)."""
    measured, modelled = _measured(op, args), WORKSPACE_MODELS[f"lowcost::{name}"](args)
    settings = [a for a in args if not isinstance(a, (torch.Tensor, list, tuple))] + [args[-1]]
    assert modelled == measured and (measured == 0) == empty, (name, modelled, measured, settings)


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


# the grouped projections on quantized weights: three groups that together take every format (NF4 with a K its
# block does not divide next to the other formats' K), P = 3 and P = 2, different N_i (37, 20, 11 rows: 4, 2
# and 1 blocks of R rows when the limit is lowered) and ranks
GROUPS = {"nf4, nf4-dq, int8": (("nf4", "nf4-dq", "int8"), 300),
          "q8_0, q4_0": (("q8_0", "q4_0"), _k("q8_0", 300)),
          "q4_1, q4_k, q6_k": (("q4_1", "q4_k", "q6_k"), _k("q4_k", 300))}
GROUPED_NEEDS = ([True, True, True, True],      # every gradient (dbias of the projections with a bias)
                 [False, True, True, False],    # dA without dx: x̃_i made per projection, no scratch
                 [True, False, False, False],   # dx alone: the masked copy of the scratch
                 [False, False, True, True])    # no du at all (float32/64 x: no workspace, g_i is its own copy)


def _grouped_projections(schemes, K, adapter_dtype, gen):
    sizes, ranks = (37, 20, 11)[:len(schemes)], (5, 3, 7)[:len(schemes)]
    weights = [_weight(scheme, n, K, i) for i, (scheme, n) in enumerate(zip(schemes, sizes))]
    lora_as = [_rand(gen, r, K, dtype=adapter_dtype) for r in ranks]
    lora_bs = [_rand(gen, n, r, dtype=adapter_dtype) for n, r in zip(sizes, ranks)]
    return weights, lora_as, lora_bs


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("group", list(GROUPS))
def test_grouped_projections_workspace_is_the_measured_one(group, dtypes, blocks):
    """Each projection's row source keeps its workspace from its first decode to the end of the op call; in
    backward dx is one accumulator, the dropout scratch is made once and reused, and the previous projection's g_i,
    du_i and x̃_i live until the next one's exist."""
    x_dtype, adapter_dtype = DTYPES[dtypes]
    schemes, K = GROUPS[group]
    P = len(schemes)
    blocks(K, R)
    gen = torch.Generator().manual_seed(3)
    weights, lora_as, lora_bs = _grouped_projections(schemes, K, adapter_dtype, gen)
    stored = ([t for w in weights for t in w.packed], [len(w.packed) for w in weights], ",".join(schemes),
              [w.block_size for w in weights])
    seeds, scales = torch.tensor([3, 4, 5][:P]), [0.5, 2.0, 1.0][:P]
    # dropout on one projection but not the next (P = 3: the scratch is reused, x̃_1 freed by p_2 = 0; P = 2: the
    # scratch made by the second); float64 x drops out through the pure-torch Philox: without dropout only
    settings = [([0.0] * P, [False] * P), ([0.1, 0.0, 0.2] if P == 3 else [0.0, 0.1], [True, False, True][:P])]
    for M in (1, 13):
        x = _rand(gen, M, K, dtype=x_dtype)
        grads = [_rand(gen, M, b.shape[0], dtype=x_dtype) for b in lora_bs]
        for dropouts, has_bias in settings[:1 if x_dtype == torch.float64 else 2]:
            biases = [_rand(gen, b.shape[0], dtype=x_dtype) for b, on in zip(lora_bs, has_bias) if on]
            forward = (x, *stored, lora_as, lora_bs, biases, has_bias, scales, dropouts, seeds, "torch")
            _check("qlora_grouped_linear", GROUPED._qgrouped_op, forward)
            us = GROUPED._qgrouped_op._init_fn(*forward)[1]
            for needs in GROUPED_NEEDS:
                args = (grads, x, *stored, lora_as, lora_bs, us, has_bias, scales, dropouts, seeds,
                        [needs[3] and any(has_bias) if i == 3 else n for i, n in enumerate(needs)], "torch")
                none_inside = x_dtype in (torch.float32, torch.float64) and not (needs[0] or needs[1])
                _check("qlora_grouped_linear_backward", GROUPED._qgrouped_backward_op, args, empty=none_inside)
