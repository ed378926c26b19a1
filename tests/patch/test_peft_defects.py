"""The five PEFT-parity defects of issue #10 (Part B), each held against PEFT 0.21 itself:

1. every adapter_config.json field that changes the math is implemented or refused (field by field);
2. ``save_adapter`` writes a config that PEFT's matcher resolves to exactly the adapted modules;
3. a regex target that meets a non-Linear module adapts it (Embedding) or says so in the report;
4. ``load_adapter`` accepts a target list entry that matches nothing, as PEFT does (``apply`` warns);
5. ``merge(safe=True)`` checks in a copy and raises before a NaN/inf reaches a base weight.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lowcost
from lowcost.patch import lora_layers
from peft_cases import BUILDERS, INPUTS, fill_peft_adapters, peft_adapted_names, rel_err
from tiny_models import CASES, assert_unchanged, llama, output, randomize_adapters, snapshot

TOL = 1e-5


def _peft_saved(tmp_path, build, name="peft", **config):
    """A PEFT adapter on ``build()`` with non-zero factors, saved in ``tmp_path / name``."""
    peft_model = get_peft_model(build(), LoraConfig(**config))
    fill_peft_adapters(peft_model)
    peft_model.save_pretrained(tmp_path / name)
    return tmp_path / name


def _edit(path, **fields):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(fields)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _peft_output(build, path, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(build(), str(path)).eval()(x)


# ------------------------------------------------------------------------------------------------ defect 1
# Every LoraConfig field of the installed PEFT, with a non-default value and what lowcost must do with it:
# "same" = load it and give PEFT's outputs; "accept" = load it (metadata, or a setting PEFT ignores without
# its companion field); "refuse" = a ValueError naming the field, model untouched. Fields whose value decides
# the adapted modules or the shapes (r, target_modules, exclude_modules, modules_to_save, rank/alpha patterns,
# layers_to_transform/layers_pattern) are "tested": tests/patch/test_peft_parity.py runs them against PEFT.
FIELDS = {
    "task_type": ("FEATURE_EXTRACTION", "accept"), "peft_type": ("LOHA", "refuse"),
    "auto_mapping": ({"base_model_class": "MLP"}, "accept"), "peft_version": ("0.99.0", "accept"),
    "base_model_name_or_path": ("/elsewhere/model", "accept"), "revision": ("main", "accept"),
    "inference_mode": (False, "same"), "r": (None, "tested"), "target_modules": (None, "tested"),
    "exclude_modules": (None, "tested"), "lora_alpha": (3, "same"), "lora_dropout": (0.25, "same"),
    "fan_in_fan_out": (True, "same"), "bias": ("lora_only", "refuse"), "use_rslora": (True, "same"),
    "modules_to_save": (None, "tested"), "init_lora_weights": (None, "tested"),
    "layers_to_transform": (None, "tested"), "layers_pattern": (None, "tested"),
    "rank_pattern": (None, "tested"), "alpha_pattern": ({"lin1": 2}, "same"),
    "megatron_config": ({"num_layers": 2}, "refuse"), "megatron_core": ("other.core", "accept"),
    "trainable_token_indices": ([1, 2], "refuse"), "loftq_config": ({"loftq_bits": 4}, "accept"),
    "eva_config": ({"rho": 2.0}, "accept"), "corda_config": ({"corda_method": "kpm"}, "accept"),
    "lora_ga_config": ({"direction": "ArBr"}, "accept"), "use_dora": (True, "refuse"),
    "velora_config": ({"num_groups": 2}, "refuse"), "alora_invocation_tokens": ([5, 6], "refuse"),
    "use_qalora": (True, "refuse"), "qalora_group_size": (8, "accept"),
    "monteclora_config": ({"num_samples": 2}, "refuse"), "layer_replication": ([[0, 1]], "refuse"),
    "runtime_config": ({"ephemeral_gpu_offload": True}, "accept"), "lora_bias": (True, "refuse"),
    "target_parameters": (["lin0.weight"], "refuse"), "use_bdlora": ({"nblocks": 2}, "refuse"),
    "arrow_config": ({"top_k": 2}, "refuse"), "kasa_config": ({"beta": 1e-4}, "refuse"),
    "ensure_weight_tying": (True, "accept"),
}
INIT = {True: "same", False: "same", "gaussian": "same", "orthogonal": "same", "eva": "same",
        "pissa": "refuse", "pissa_niter_4": "refuse", "olora": "refuse", "corda": "refuse", "loftq": "refuse",
        "lora_ga": "refuse", "mica": "refuse", "some_future_init": "refuse"}


def test_every_peft_field_has_a_decision():
    installed = {f.name for f in dataclasses.fields(LoraConfig)}
    assert installed - set(FIELDS) == set(), "new PEFT LoraConfig fields: decide implement or refuse"


def _mlp_adapter(tmp_path):
    return _peft_saved(tmp_path, BUILDERS["MLP"], r=4, lora_alpha=8, target_modules=["lin0", "lin1"])


def _check_decision(tmp_path, field, value, decision):
    path = _mlp_adapter(tmp_path)
    _edit(path, **{field: value})
    model, x = BUILDERS["MLP"](), INPUTS["MLP"]()
    if decision == "refuse":
        before = snapshot(model)
        with pytest.raises(ValueError, match=field):
            lowcost.load_adapter(model, path)
        assert_unchanged(model, before)
        return
    lowcost.load_adapter(model, path)
    if decision == "same":
        assert rel_err(model.eval()(x), _peft_output(BUILDERS["MLP"], path, x)) <= TOL


@pytest.mark.parametrize("field", [f for f, (_, d) in FIELDS.items() if d != "tested"])
def test_field_decision(tmp_path, field):
    value, decision = FIELDS[field]
    _check_decision(tmp_path, field, value, decision)


@pytest.mark.parametrize("init", list(INIT), ids=str)
def test_init_lora_weights_decision(tmp_path, init):
    _check_decision(tmp_path, "init_lora_weights", init, INIT[init])


def test_unknown_fields_refused_unless_empty(tmp_path):
    path = _mlp_adapter(tmp_path)
    _edit(path, some_future_switch=None, another_future_list=[])
    lowcost.load_adapter(BUILDERS["MLP"](), path)
    _edit(path, some_future_switch=True)
    with pytest.raises(ValueError, match="some_future_switch"):
        lowcost.load_adapter(BUILDERS["MLP"](), path)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_real_pissa_and_olora_files_are_refused_with_the_way_out(tmp_path, init):
    """PEFT rewrites the base weights when it loads these (W - s·B₀A₀); lowcost says how to convert them."""
    path = _peft_saved(tmp_path, BUILDERS["MLP"], r=2, target_modules=["lin0"], init_lora_weights=init)
    model = BUILDERS["MLP"]()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"init_lora_weights={init!r}.*path_initial_model_for_weight_conversion"):
        lowcost.load_adapter(model, path)
    assert_unchanged(model, before)


def test_converted_pissa_adapter_loads_and_matches_peft(tmp_path):
    """PEFT's own conversion (save with path_initial_model_for_weight_conversion) gives a plain LoRA file."""
    build, x = BUILDERS["MLP"], INPUTS["MLP"]()
    peft_model = get_peft_model(build(), LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="pissa"))
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(tmp_path / "init")
    with torch.no_grad():
        peft_model.base_model.model.lin0.lora_B["default"].weight.add_(0.1)      # "training"
    peft_model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    model = build()
    lowcost.load_adapter(model, tmp_path / "out")
    assert rel_err(model.eval()(x), _peft_output(build, tmp_path / "out", x)) <= TOL
    assert rel_err(model(x), peft_model.eval()(x)) <= 1e-4


# ------------------------------------------------------------------------------------------------ defect 2
SAVE_CASES = {
    "suffix+exclude": ("Nested", dict(targets=["lin0"], exclude=["block.lin0"])),
    "rank-pattern-suffix": ("Nested", dict(targets=["lin0"], rank_pattern={"^lin0": 2})),
    "alpha-pattern-suffix": ("Nested", dict(targets=["lin0", "lin1"], alpha_pattern={"^lin0": 3})),
    "regex+regex-exclude": ("DeepMLP", dict(targets=r"layers\.\d\.lin\d", exclude=r"layers\.[02]\.lin1")),
    "mha-out-proj-skipped": ("encoder", dict(targets=["out_proj", "linear1"])),
    "llama-list": ("llama", dict(targets=["q_proj", "v_proj"], exclude=["layers.1.self_attn.v_proj"])),
}


def _build(name):
    return BUILDERS[name]() if name in BUILDERS else CASES[name][0]()


def _input(name, model):
    if name in INPUTS:
        return INPUTS[name]()
    batch = CASES[name][1](model)
    return batch["x"] if "x" in batch else batch["input_ids"]


def _out(model, x):
    out = model(x) if x.is_floating_point() else model(input_ids=x)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_saved_config_resolves_to_exactly_the_adapted_modules(tmp_path, case):
    name, kwargs = SAVE_CASES[case]
    model = _build(name)
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, **kwargs))
    randomize_adapters(lora_layers(model))
    lowcost.save_adapter(model, tmp_path / "a")
    x = _input(name, model)
    expected = _out(model.eval(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(_build(name), str(tmp_path / "a")).eval()
    for layer in peft_model.modules():          # PEFT's frozen model would take the encoder's eval fast path,
        if isinstance(layer, torch.nn.TransformerEncoderLayer):     # which reads linear1.weight and skips LoRA
            layer.activation_relu_or_gelu = 0
    assert peft_adapted_names(peft_model) == set(report.names)
    assert rel_err(_out(peft_model, x), expected) <= TOL
    again = _build(name)
    lowcost.load_adapter(again, tmp_path / "a")                        # lowcost reloads its own file
    assert rel_err(_out(again.eval(), x), expected) <= TOL


# ------------------------------------------------------------------------------------------------ defect 3
def test_regex_meeting_an_embedding_adapts_it_like_peft():
    build, ids = BUILDERS["EmbLinear"], INPUTS["EmbLinear"]()
    model = build()
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, targets="emb|proj"))
    assert set(report.names) == {"emb", "proj"} and report.paths() == {"embedding": 1, "fused": 1}
    peft_model = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, target_modules="emb|proj"))
    assert peft_adapted_names(peft_model) == {"emb", "proj"}


def test_regex_meeting_an_unsupported_module_says_so_in_the_report():
    model = BUILDERS["EmbLinear"]()
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, targets="emb|proj|norm"))
    assert set(report.names) == {"emb", "proj"}
    skipped = {s.name: s.reason for s in report.skipped}
    assert "LayerNorm" in skipped["norm"] and "norm" in str(report)


# ------------------------------------------------------------------------------------------------ defect 4
def test_load_accepts_a_list_entry_that_matches_nothing(tmp_path):
    path = _peft_saved(tmp_path, llama, r=4, lora_alpha=8, target_modules=["not_in_this_model", "q_proj"])
    model = llama()
    lowcost.load_adapter(model, path)
    ids = CASES["llama"][1](None)["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(llama(), str(path)).eval()
    assert rel_err(_out(model.eval(), ids), _out(peft_model, ids)) <= TOL


def test_apply_warns_about_a_list_entry_that_matches_nothing():
    model = llama()
    with pytest.warns(UserWarning, match="'not_in_this_model' matches no module"):
        report = lowcost.apply(model, lora=lowcost.LoRAConfig(targets=["not_in_this_model", "q_proj"]))
    assert len(report.names) == 2 and any("not_in_this_model" in note for note in report.notes)


# ------------------------------------------------------------------------------------------------ defect 5
def test_safe_merge_raises_before_touching_the_base():
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8))
    layers = lora_layers(model)
    randomize_adapters(layers)
    bad = "model.layers.1.mlp.down_proj"
    with torch.no_grad():
        layers[bad].lora_B[3, 1] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"not finite.*in {bad}; nothing was merged"):
        lowcost.merge(model, safe=True)
    after = model.state_dict()
    assert all(torch.allclose(after[k], v, rtol=0, atol=0, equal_nan=True) for k, v in before.items())
    assert all(not layer.merged for layer in lora_layers(model).values())
    with torch.no_grad():
        layers[bad].lora_B[3, 1] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        lowcost.merge(model)                                                 # safe is the default
