"""The plan's GPU-dependent term: the Triton fused loss takes chunks of at least 2 rows per SM."""
import pytest
import torch

from lowcost.ops.linear_cross_entropy import default_chunk
from lowcost.plan import gpus
from lowcost.plan.estimate import Estimate, Setup
from lowcost.plan.workspace import TRITON_LOSS_ROWS_PER_SM, triton_loss_extra


def test_rows_per_sm_matches_the_kernel_launch():
    triton_plan = pytest.importorskip("lowcost.kernels.lora_linear_plan")
    assert TRITON_LOSS_ROWS_PER_SM == triton_plan.PROGRAMS_PER_SM


def test_extra_is_the_chunk_difference_times_row_bytes():
    vocab = 128256                                           # Llama-3: the memory-sized chunk is 65 rows
    assert default_chunk(2048, vocab) == 65
    per_row = vocab * (2 + 4 + 4)                            # bf16 logits, their fp32 copy, logsumexp's temporary
    assert triton_loss_extra(2048, vocab, 2, 132) == (264 - 65) * per_row
    assert triton_loss_extra(2048, vocab, 4, 132) == (264 - 65) * vocab * 8    # fp32 hidden: no copy
    assert triton_loss_extra(100, vocab, 2, 132) == (100 - 65) * per_row       # never more rows than tokens
    assert triton_loss_extra(2048, 1000, 2, 132) == 0        # a small vocabulary's chunk is already larger


def _estimate(fused_loss):
    counts = dict.fromkeys(("parameters", "trainable", "weights", "grads", "optimizer", "saved_blocks",
                            "saved_outside", "host_offload", "step_peak", "peak_saved", "peak_grads",
                            "peak_transient", "peak_workspace", "update_peak", "flops"), 0)
    counts.update(weights=10 * 2**30, step_peak=9 * 2**30)
    return Estimate(setup=Setup("LoRA"), fused_loss=fused_loss, **counts)


def test_peak_on_and_the_fit_use_the_gpus_sm_count():
    with_loss, without = _estimate((2048, 128256, 2)), _estimate(())
    assert without.peak_on(132) == without.peak
    assert with_loss.peak_on(132) == with_loss.peak + triton_loss_extra(2048, 128256, 2, 132)
    assert with_loss.peak_on(142) > with_loss.peak_on(132) > with_loss.peak_on(58) > with_loss.peak
    small = gpus.GPU("24 GiB, few SMs", memory_gib=24, bf16_tflops=1, usd_per_hour=1, sms=58)
    exact = (with_loss.peak + 2**20) / (0.9 * 2**30)         # the torch-path peak fills it to the headroom
    tight_big = gpus.GPU("tight, many SMs", exact, 1, 0.5, sms=142)
    assert gpus.fits(tight_big, with_loss.peak, 0.1) and not gpus.fits(tight_big, with_loss.peak_on(142), 0.1)
    table = [tight_big, small]
    assert gpus.cheapest_fit(table, lambda g: with_loss.peak_on(g.sms), 0.1) is small
    assert gpus.cheapest_fit(table, with_loss.peak, 0.1) is tight_big        # a plain number still works


def test_table_sms_is_optional_and_checked(tmp_path):
    path = tmp_path / "gpus.json"
    path.write_text('{"gpus": [{"name": "X", "memory_gib": 8, "bf16_tflops": 10, "usd_per_hour": 1}]}')
    assert gpus.load_table(path)[0].sms == gpus.FALLBACK_SMS
    assert gpus.FALLBACK_SMS > max(g.sms for g in gpus.load_table())
    path.write_text('{"gpus": [{"name": "X", "memory_gib": 8, "bf16_tflops": 10, "usd_per_hour": 1, "sms": 0}]}')
    with pytest.raises(ValueError, match="'sms' 0; expected a whole number >= 1"):
        gpus.load_table(path)
    assert {g.name: g.sms for g in gpus.load_table()}["H100 80GB"] == 132
