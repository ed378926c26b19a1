"""The plan of LoRA on a quantized frozen base (``plan(..., quantize=...)``, ``lowcost plan --quantize``).

- weight bytes: the planner quantizes the meta-device model with the real ``lowcost.quantize``; its figures
  equal those of the same model quantized for real (``QuantReport.bytes`` and every parameter and buffer);
- the fake trace equals a real CPU step of the quantized model (saved bytes, gradients, FLOPs), every fusion
  taken (q/k/v as ``lowcost::qlora_grouped_linear``: the same workspace added at each of its calls);
- FLOPs: the dense step's plus one decode of each quantized weight in forward and one in the dgrad;
- the predicted peak against the measured RSS growth of a real quantized step: ``test_plan_peak_rss.py``;
- bad input: a scheme the plan does not model, quantize without LoRA.
"""
import gc
import json

import pytest
import torch

import lowcost
from lowcost.checkpoint import CheckpointConfig
import lowcost.plan.build as build
import lowcost.plan.trace as trace
from lowcost.plan import plan
from lowcost.plan.build import patch
from lowcost.plan.estimate import Setup, standard_setups, trace_setup
from lowcost.plan.quantized import dequantize_flops
from lowcost.plan.trace import trace_step
from plan_shapes import SHAPES, config_of, real_model

LORA = lowcost.LoRAConfig(r=8, alpha=16, dropout=0.05)
SCHEMES = ("nf4", "nf4-dq", "int8")


def _real_quantized(shape: str, scheme: str):
    from lowcost.plan.quantized import quantize_base
    config, _, _ = SHAPES[shape]
    model = real_model(config_of(config))
    report = quantize_base(model, scheme)
    return model, report


def _stored_bytes(model) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", ["llama-shaped", "qwen2-tied"])
def test_predicted_weight_bytes_equal_a_really_quantized_model(shape, scheme):
    config, batch, seq = SHAPES[shape]
    cfg = config_of(config)
    fake = trace_setup(cfg, Setup("q", LORA, None, scheme), batch, seq, torch.float32, cfg.num_hidden_layers)
    model, report = _real_quantized(shape, scheme)
    assert report.modules and fake.quantized_weights == report.bytes
    patch(model, LORA, None)
    assert fake.weights == _stored_bytes(model)
    assert fake.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    dense = trace_setup(cfg, Setup("d", LORA), batch, seq, torch.float32, cfg.num_hidden_layers)
    assert fake.weights - report.bytes == dense.weights - report.dense_bytes   # only the quantized layers differ


def test_weight_bytes_equal_load_pretrained_quantize(tmp_path):
    """The model ``load_pretrained(quantize="nf4")`` builds from a saved checkpoint holds what the plan says."""
    config, batch, seq = SHAPES["llama-shaped"]
    cfg = config_of(config)
    real_model(cfg).save_pretrained(tmp_path)
    loaded = lowcost.load_pretrained(tmp_path, quantize="nf4", verbose=False)
    fake = trace_setup(cfg, Setup("q", LORA, None, "nf4"), batch, seq, torch.float32, cfg.num_hidden_layers)
    patch(loaded, LORA, None)
    assert fake.weights == _stored_bytes(loaded)


def _record_fusions_and_grouped_workspace(monkeypatch) -> tuple[list, list]:
    """(the fusion reports of every ``lowcost.apply`` the plan and the test make, the (op, workspace) the trace
    adds at each call of the grouped projections on quantized weights), filled as they run."""
    reports, grouped = [], []
    real_apply, real_workspace = build.apply, trace.kernel_workspace

    def apply(*args, **kwargs):
        report = real_apply(*args, **kwargs)
        reports.append(report.fusion)
        return report

    def workspace(func, args, kwargs, out):
        nbytes = real_workspace(func, args, kwargs, out)
        name = getattr(getattr(func, "_schema", None), "name", "")
        if name.startswith("lowcost::qlora_grouped_linear"):
            grouped.append((name, nbytes))
        return nbytes

    monkeypatch.setattr(build, "apply", apply)
    monkeypatch.setattr(trace, "kernel_workspace", workspace)
    return reports, grouped


@pytest.mark.parametrize("policy", [None, "selective", "full"])
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_fake_trace_matches_a_real_quantized_cpu_step(scheme, policy, monkeypatch):
    """With every fusion taken on the quantized base, q/k/v included (``lowcost::qlora_grouped_linear``): the fake
    trace meets the grouped ops where the real step does and adds the same workspace at each call
    (``decode_workspace.py``, checked against the measured one in test_plan_decode_workspace.py)."""
    config, batch, seq = SHAPES["llama-shaped"]
    cfg = config_of(config)
    checkpoint = CheckpointConfig(policy=policy) if policy else None
    reports, grouped = _record_fusions_and_grouped_workspace(monkeypatch)
    fake = trace_setup(cfg, Setup("q", LORA, checkpoint, scheme), batch, seq, torch.float32, cfg.num_hidden_layers)
    fake_grouped = grouped[:]
    grouped.clear()
    model, _ = _real_quantized("llama-shaped", scheme)
    patch(model, LORA, checkpoint)
    ids = torch.randint(0, config["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    gc.disable()
    try:
        real = trace_step(model, ids, count_flops=True)
    finally:
        gc.enable()
    qkv = [sum(f.kind == "qkv" for f in report.taken) for report in reports]
    assert qkv == [cfg.num_hidden_layers] * 2, [str(report) for report in reports]   # the plan's model, the real one
    calls = [name for name, _ in grouped]
    assert calls.count("lowcost::qlora_grouped_linear_backward") == cfg.num_hidden_layers
    assert calls.count("lowcost::qlora_grouped_linear") >= cfg.num_hidden_layers   # recomputed too with a policy
    assert fake_grouped == grouped and all(nbytes > 0 for _, nbytes in grouped)
    assert real.saved > 0 and fake.saved == real.saved and fake.saved_blocks == real.saved_blocks
    assert fake.grads == real.grads
    assert fake.flops == real.flops > 0
    assert fake.step_peak == pytest.approx(real.peak, rel=0.02)
    assert fake.peak_workspace > 0 or not fake.peak_op.startswith("lowcost.qlora_")


def test_flops_add_one_decode_per_weight_in_forward_and_dgrad():
    """Against unfused dense LoRA (the same GEMMs): each quantized weight is decoded once in forward and once
    more in backward where dx is formed, i.e. everywhere but block 0's q/k/v (their input, the embedding's
    normalized output, needs no gradient)."""
    config, batch, seq = SHAPES["tiny-llama"]
    cfg = config_of(config)
    model, report = _real_quantized("tiny-llama", "nf4-dq")
    patch(model, LORA, None)
    dense_model = real_model(cfg)
    lowcost.apply(dense_model, lora=LORA, fused=None)
    ids = torch.zeros(batch, seq, dtype=torch.long)
    dense = trace_step(dense_model, ids, count_flops=True).flops
    quant = trace_step(model, ids, count_flops=True).flops
    decodes = {m.name: dequantize_flops("nf4-dq", *m.shape, 64) for m in report.modules}
    no_dx = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert quant - dense == 2 * sum(decodes.values()) - sum(decodes[n] for n in no_dx) > 0


def test_plan_rows_with_quantize_and_the_selected_row():
    config, batch, seq = SHAPES["tiny-llama"]
    result = plan(config_of(config), "tiny", batch, seq, torch.float32, LORA, checkpoint="selective",
                  quantize="nf4")
    names = [r.estimate.setup.name for r in result.rows]
    assert names[:4] == ["full fine-tuning", "full fine-tuning + selective", "LoRA", "LoRA + selective"]
    assert "nf4 LoRA" in names and "nf4 LoRA + offload" in names
    selected = [r.estimate.setup.name for r in result.rows if r.selected]
    assert selected == ["nf4 LoRA + selective"]
    by_name = {r.estimate.setup.name: r.estimate for r in result.rows}
    assert by_name["nf4 LoRA + selective"].weights < by_name["LoRA + selective"].weights
    data = result.to_dict()
    row = next(s for s in data["setups"] if s["setup"] == "nf4 LoRA")
    assert row["quantize"] == "nf4" and row["quantized_weights_bytes"] > 0
    assert any("nf4 rows" in note for note in result.notes)


def test_bad_quantize_is_refused():
    with pytest.raises(ValueError, match="quantize must be one of nf4, nf4-dq, int8.*GGUF"):
        standard_setups(LORA, None, 2, "gguf")
    with pytest.raises(ValueError, match="needs LoRA"):
        Setup("x", None, None, "nf4")


def test_cli_quantize(tmp_path, capsys):
    from lowcost.cli import main
    config, _, _ = SHAPES["tiny-llama"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    argv = ["plan", "--model", str(path), "--seq-len", "16"]
    assert main(argv + ["--quantize", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowcost plan: error: --quantize 'gguf'") and "\n" not in err and "GGUF" in err
    assert main(argv + ["--quantize", "int8", "--checkpoint", "selective", "--json"]) == 0
    rows = {s["setup"]: s for s in json.loads(capsys.readouterr().out)["setups"]}
    assert rows["int8 LoRA + selective"]["selected"] and rows["int8 LoRA + selective"]["quantize"] == "int8"
    assert rows["int8 LoRA"]["weights_bytes"] < rows["LoRA"]["weights_bytes"]


@pytest.mark.parametrize("policy", [None, "selective"])
def test_depth_extension_holds_on_a_quantized_base(policy):
    """Two shallow traces extended to the depth equal one full-depth trace (every count, quantized bytes too)."""
    from lowcost.plan.estimate import _COUNTS, estimate
    config, batch, seq = SHAPES["tiny-llama"]
    cfg = config_of({**config, "num_hidden_layers": 5})
    setup = Setup("q", LORA, CheckpointConfig(policy=policy) if policy else None, "nf4")
    extended = estimate(cfg, setup, batch, seq, torch.float32)
    exact = estimate(cfg, setup, batch, seq, torch.float32, exact=True)
    assert len(extended.depths) == 3 and exact.depths == (5,)
    for name in _COUNTS:
        assert getattr(extended, name) == getattr(exact, name), name


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_kept_for_backward_is_the_dense_steps_not_the_codes(scheme):
    """The quantized ops save their stored codes and scales for backward (references to the weights, no new
    memory): 'kept for bwd' leaves them out, so with every fusion taken on both bases (the MLP's too) the
    quantized step keeps exactly the dense step's activations."""
    config, batch, seq = SHAPES["tiny-llama"]
    cfg = config_of(config)
    dense = trace_setup(cfg, Setup("dense", LORA), batch, seq, torch.float32, cfg.num_hidden_layers)
    quant = trace_setup(cfg, Setup("q", LORA, None, scheme), batch, seq, torch.float32, cfg.num_hidden_layers)
    assert quant.saved == dense.saved > 0 and quant.saved_blocks == dense.saved_blocks
