"""The planner's peak against the measured peak RSS growth of a real CPU step (target ±15%; ±5% on a
quantized base).

The step (forward, backward, AdamW update) runs in a fresh process (``rss_step.py`` explains the method:
fixed mmap threshold, one thread, a warm-up step, VmHWM reset through /proc/self/clear_refs). The
prediction compared is what the step adds on top of weights and optimizer state
(``Estimate.dynamic_peak``), for LoRA without checkpointing, with selective and full checkpointing, and
for full fine-tuning (and LoRA on an nf4 / int8 base), on a Llama-shaped model large enough (≈ 0.2 GiB of activations) that the process's
own noise (Python objects, page rounding) is small next to it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowcost
from lowcost.checkpoint import CheckpointConfig
from lowcost.plan.estimate import Setup, trace_setup
from plan_shapes import config_of

HERE = Path(__file__).resolve().parent
SHAPE = dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=3, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=4096)
BATCH, SEQ = 4, 256
LORA = lowcost.LoRAConfig(r=8, alpha=16, dropout=0.05)
CASES = {"LoRA": (True, None), "LoRA + selective": (True, "selective"), "LoRA + full": (True, "full"),
         "full fine-tuning": (False, None)}

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists() or sys.platform != "linux",
                                reason="needs Linux /proc/self/clear_refs to reset the peak RSS counter")


def _measure(lora: bool, policy, quantize=None) -> dict:
    spec = {"config": SHAPE, "batch": BATCH, "seq": SEQ, "lora": lora, "policy": policy, "quantize": quantize}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parents[1]), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, str(HERE / "rss_step.py"), json.dumps(spec)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_predicted_peak_matches_measured_rss_growth(name):
    lora, policy = CASES[name]
    setup = Setup(name, LORA if lora else None, CheckpointConfig(policy=policy) if policy else None)
    predicted = trace_setup(config_of(SHAPE), setup, BATCH, SEQ, torch.float32, SHAPE["num_hidden_layers"])
    measured = _measure(lora, policy)
    error = predicted.dynamic_peak / measured["delta"] - 1
    print(f"{name}: predicted {predicted.dynamic_peak / 2**20:.1f} MiB, measured {measured['delta'] / 2**20:.1f} MiB "
          f"({error:+.1%}); baseline RSS {measured['baseline'] / 2**20:.0f} MiB")
    assert abs(error) <= 0.15, (name, predicted.dynamic_peak, measured)


QUANTIZED = {"nf4 LoRA": ("nf4", None), "nf4 LoRA + selective": ("nf4", "selective"), "int8 LoRA": ("int8", None)}
# The quantized ops' workspace is modelled byte for byte (test_plan_decode_workspace.py), so what is left is the
# error the dense steps have too (aten kernels' internal buffers, allocator and page rounding: +1.6% to +2.5%
# on this shape), well inside 5%; the steps measured -0.1% to -0.2% when this bound was set.
QUANTIZED_BOUND = 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name", list(QUANTIZED))
def test_quantized_base_peak_matches_measured_rss_growth(name):
    """The same check on a quantized frozen base, to ±5%: the step's peak includes the torch path's
    dequantization workspace (one reused block of rows per op call, ``lowcost/plan/decode_workspace.py``),
    which no dispatch mode sees."""
    scheme, policy = QUANTIZED[name]
    setup = Setup(name, LORA, CheckpointConfig(policy=policy) if policy else None, scheme)
    predicted = trace_setup(config_of(SHAPE), setup, BATCH, SEQ, torch.float32, SHAPE["num_hidden_layers"])
    measured = _measure(True, policy, scheme)
    error = predicted.dynamic_peak / measured["delta"] - 1
    print(f"{name}: predicted {predicted.dynamic_peak / 2**20:.1f} MiB (workspace at peak "
          f"{predicted.peak_workspace / 2**20:.1f} MiB), measured {measured['delta'] / 2**20:.1f} MiB ({error:+.1%})")
    assert abs(error) <= QUANTIZED_BOUND, (name, predicted.dynamic_peak, measured)
