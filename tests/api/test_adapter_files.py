"""save_adapter / load_adapter: PEFT layout both ways, logits within 1e-5; every bad directory is a clear
error naming the file or key, and leaves the model unchanged."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import lowcost
from lowcost.patch import lora_layers
from tiny_models import CASES, assert_unchanged, gpt2, llama, output, randomize_adapters, snapshot

TOL = 1e-5


def close(a, b):
    assert float((a - b).abs().max() / b.abs().max()) <= TOL


def saved(tmp_path, build=llama, **config):
    model = build()
    original = copy.deepcopy(model)
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, **config))
    randomize_adapters(lora_layers(model))
    lowcost.save_adapter(model, tmp_path / "adapter")
    return model, original, tmp_path / "adapter"


@pytest.mark.parametrize("case", ["llama", "gpt2", "bert"])
def test_lowcost_to_peft(tmp_path, case):
    build, batch_of, _ = CASES[case]
    model, original, path = saved(tmp_path, build, rank_pattern={"layers.0.*": 2}, alpha_pattern={".*dense": 3})
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = PeftModel.from_pretrained(original, str(path))
    batch = batch_of(model)
    model.eval()
    close(output(peft_model, batch), output(model, batch))


def test_peft_to_lowcost_fresh_and_patched(tmp_path):
    torch.manual_seed(0)
    peft_model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                                    rank_pattern={"down_proj": 2}, use_rslora=True,
                                                    modules_to_save=["model.norm"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            torch.nn.init.normal_(p, std=0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    batch = CASES["llama"][1](None)
    expected = output(peft_model.eval(), batch)
    fresh = llama()
    lowcost.load_adapter(fresh, tmp_path / "peft")          # patched from the file's config
    close(output(fresh.eval(), batch), expected)
    patched = llama()
    lowcost.apply(patched, lora=lowcost.LoRAConfig(r=4, alpha=16, targets=["q_proj", "down_proj"],
                                                    rank_pattern={"down_proj": 2}, use_rslora=True,
                                                    modules_to_save=["model.norm"]))
    lowcost.load_adapter(patched, tmp_path / "peft")
    close(output(patched.eval(), batch), expected)


def test_round_trip_lowcost_to_lowcost(tmp_path):
    model, _, path = saved(tmp_path, gpt2, modules_to_save=["ln_f"])
    other = gpt2()
    lowcost.load_adapter(other, path)
    batch = CASES["gpt2"][1](None)
    close(output(other.eval(), batch), output(model.eval(), batch))


def test_atomic_write_leaves_no_temp_files(tmp_path):
    model, _, path = saved(tmp_path)
    lowcost.save_adapter(model, path, overwrite=True)            # overwrite in place
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == 8


# ------------------------------------------------------------------------------------------ bad directories
def _expect_failure(model, path, exc, match):
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        lowcost.load_adapter(model, path)
    assert_unchanged(model, before)


def test_missing_directory_and_files(tmp_path):
    _, _, path = saved(tmp_path)
    _expect_failure(llama(), tmp_path / "nope", FileNotFoundError, "does not exist")
    (path / "adapter_config.json").unlink()
    _expect_failure(llama(), path, FileNotFoundError, "has no adapter_config.json")
    (path / "adapter_model.safetensors").unlink()
    _expect_failure(llama(), path, FileNotFoundError, "has no adapter_model.safetensors")


def test_pickle_file_is_refused(tmp_path):
    _, _, path = saved(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    (path / "adapter_model.safetensors").unlink()
    torch.save(tensors, path / "adapter_model.bin")
    _expect_failure(llama(), path, ValueError, "adapter_model.bin is a pickle file; lowcost loads safetensors only")


def test_truncated_safetensors(tmp_path):
    _, _, path = saved(tmp_path)
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_failure(llama(), path, ValueError, "adapter_model.safetensors is truncated or not a valid safetensors")


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    _, _, path = saved(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    gone = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    del tensors[gone]
    tensors["base_model.model.model.layers.9.extra.lora_A.weight"] = torch.zeros(4, 32)
    bad = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[bad] = torch.zeros(4, 31)
    save_file(tensors, path / "adapter_model.safetensors")
    for model in (llama(), _patched()):
        before = snapshot(model)
        with pytest.raises(ValueError) as info:
            lowcost.load_adapter(model, path)
        message = str(info.value)
        assert gone in message and "layers.9.extra.lora_A.weight" in message
        assert f"{bad}: file (4, 31) vs model (4, 32)" in message
        assert_unchanged_patched(model, before)


def _patched():
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8))
    return model


def assert_unchanged_patched(model, before):
    if "_lowcost_patch" in model.__dict__:
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in before["state"].items())
        assert [(n, type(m)) for n, m in model.named_modules()] == before["types"]
    else:
        assert_unchanged(model, before)


@pytest.mark.parametrize("patch_config,match", [
    (dict(r=8, alpha=8), r"module 'model.layers.0.self_attn.q_proj': model r=8 alpha=8 rslora=False, config r=4"),
    (dict(r=4, alpha=8, targets=["q_proj"]), r"config targets \[.*down_proj.*\] which the model does not adapt"),
    (dict(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                 "lm_head"]), r"the model adapts \['lm_head'\] which the config does not target"),
])
def test_config_that_disagrees_with_the_patched_model(tmp_path, patch_config, match):
    _, _, path = saved(tmp_path)
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(**patch_config))
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lowcost.load_adapter(model, path)
    assert_unchanged_patched(model, before)


def test_unsupported_peft_config(tmp_path):
    _, _, path = saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    _expect_failure(llama(), path, ValueError, "use_dora=True: DoRA .* is not implemented by lowcost")
    (path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["nonexistent_proj"]}))
    _expect_failure(llama(), path, ValueError, r"targets \['nonexistent_proj'\] match no module")


# ------------------------------------------------------------------------------------------ issue #11 items
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_honour_the_umask(tmp_path, umask, mode):
    import os
    old = os.umask(umask)
    try:
        saved(tmp_path)
    finally:
        os.umask(old)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "adapter" / name).stat().st_mode & 0o777 == mode


def test_base_model_name_is_the_path_the_user_gave(tmp_path, monkeypatch):
    from safetensors.torch import save_model
    original = llama()
    original.config.save_pretrained(tmp_path / "my-model")
    save_model(original, str(tmp_path / "my-model" / "model.safetensors"))
    monkeypatch.chdir(tmp_path)
    model = lowcost.load_pretrained("my-model", verbose=False)
    model.config._name_or_path = "/root/.cache/lowcost/gguf/my-model-0123"   # what a GGUF load leaves there
    lowcost.apply(model, lora=lowcost.LoRAConfig(targets=["q_proj"]))
    lowcost.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == "my-model"


def test_saving_twice_into_one_directory_needs_overwrite(tmp_path):
    model, _, path = saved(tmp_path)
    before = (path / "adapter_model.safetensors").read_bytes()
    randomize_adapters(lora_layers(model), seed=7)
    with pytest.raises(FileExistsError, match="already holds an adapter .* pass overwrite=True"):
        lowcost.save_adapter(model, path)
    assert (path / "adapter_model.safetensors").read_bytes() == before
    lowcost.save_adapter(model, path, overwrite=True)
    assert (path / "adapter_model.safetensors").read_bytes() != before


def test_saving_onto_a_file_is_a_clear_error(tmp_path):
    model = llama()
    lowcost.apply(model, lora=lowcost.LoRAConfig(targets=["q_proj"]))
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="'.*taken' is a file; pass a directory"):
        lowcost.save_adapter(model, tmp_path / "taken")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_cuda_backend_without_a_gpu_fails_in_apply():
    model = llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="backend='cuda' cannot run on this machine: torch sees no CUDA GPU"):
        lowcost.apply(model, lora=lowcost.LoRAConfig(targets=["q_proj"], backend="cuda"))
    assert_unchanged(model, before)


def test_report_opens_with_a_summary():
    model = llama()
    report = lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, modules_to_save=["model.norm"]),
                           checkpoint=lowcost.CheckpointConfig(policy="full"))
    lines = str(report).splitlines()
    assert lines[0] == "lowcost patch (llama), adapter 'default': 14 adapted (14 fused), 1 trained in full"
    assert lines[1].startswith(f"  trainable {report.trainable_params:,} / {report.total_params:,} parameters")
    assert lines[2].startswith("  checkpointing: policy=full") and "2 full" in lines[2]
    assert lines[3] == "modules:" and "model.layers.0.self_attn.q_proj" in lines[4]


def test_error_messages_stay_short(tmp_path):
    _, _, path = saved(tmp_path)
    tensors = {k: v for k, v in load_file(path / "adapter_model.safetensors").items() if "lora_B" not in k}
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(ValueError) as info:
        lowcost.load_adapter(llama(), path)
    message = str(info.value)
    assert "missing keys (14)" in message and "... and 6 more" in message and len(message) < 1200


# ------------------------------------------------------------------------------------------ embedding LoRA files
def _resized_llama(seed):
    model = llama()
    model.resize_token_embeddings(70, mean_resizing=False)
    with torch.no_grad():                                  # the new tokens' rows, warm-started somehow
        model.model.embed_tokens.weight[64:].copy_(torch.randn(6, 32, generator=torch.Generator().manual_seed(seed)))
    return model


def test_embedding_lora_with_new_tokens_travels_with_its_table(tmp_path):
    model = _resized_llama(seed=1)
    lowcost.apply(model, lora=lowcost.LoRAConfig(r=4, alpha=8, targets=["embed_tokens", "q_proj"]))
    randomize_adapters(lora_layers(model))
    lowcost.save_adapter(model, tmp_path / "a")
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert keys["base_model.model.model.embed_tokens.base_layer.weight"].shape == (70, 32)   # PEFT's layout
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 70)
    ids = torch.tensor([[1, 65, 69, 3, 64, 2]])
    expected = model.eval()(input_ids=ids).logits
    fresh = _resized_llama(seed=2)                         # other new rows: the file's table must win
    lowcost.load_adapter(fresh, tmp_path / "a")
    close(fresh.eval()(input_ids=ids).logits, expected)
    peft_model = PeftModel.from_pretrained(_resized_llama(seed=3), str(tmp_path / "a")).eval()
    close(peft_model(input_ids=ids).logits, expected)
