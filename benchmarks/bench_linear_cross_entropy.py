"""Loss memory at a real vocabulary: lowcost's fused linear cross-entropy vs the unfused loss and its peers.

Shape (default): SmolLM2-135M's head, vocab 49,152, hidden 576, 2 × 512 tokens, float32; the head frozen
(LoRA elsewhere), hidden requires grad (the final norm's output). One step = loss forward + backward.

Providers:
- ``unfused``: ``F.cross_entropy(h @ W.T, y)`` (what HF's causal-LM loss does);
- ``torchtune``: torchtune's ``CEWithChunkedOutputLoss`` (8 chunks; the logits are still formed, chunk by
  chunk, and all kept for backward: its saving is the fp32 upcast of bf16 logits, none in fp32);
- ``liger``: Liger Kernel's ``LigerFusedLinearCrossEntropyLoss`` (chunked: each chunk's logits are turned
  into gradients in forward; keeps dh). Its kernels are Triton: on a CPU they run under the interpreter, so
  only its bytes are measured here, not its time;
- ``lowcost-torch`` / ``lowcost-triton``: ``lowcost.ops.linear_cross_entropy`` (triton: interpreter on CPU,
  bytes only).

Measured per provider: saved bytes (distinct storages packed by ``saved_tensors_hooks`` during forward,
the frozen head weight excluded) and the step's peak memory growth, in a fresh process per provider:
glibc is told to serve every allocation over 64 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``), so freed
buffers leave the process, and the peak resident size (``VmHWM``, reset through ``/proc/self/clear_refs``)
minus the resident size before the step is the step's peak. Time: median of round-robin steps (torch-run
providers only). Rows go to benchmarks/results/linear_cross_entropy.csv.

Peers are installed for the benchmark run only (not CI): ``pip install --no-deps torchtune==0.6.1
liger-kernel==0.8.5``. torchtune's package ``__init__`` needs torchao, so its loss module is loaded from
its file.

    .venv/bin/python benchmarks/bench_linear_cross_entropy.py [--tokens 1024] [--vocab 49152] [--hidden 576]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

PROVIDERS = ("unfused", "torchtune", "liger", "lowcost-torch", "lowcost-triton")
INTERPRETED = ("liger", "lowcost-triton")


def make_inputs(args):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.batch, args.tokens // args.batch, args.hidden, generator=gen).requires_grad_()
    weight = torch.randn(args.vocab, args.hidden, generator=gen) * args.hidden ** -0.5
    labels = torch.randint(0, args.vocab, (args.batch, args.tokens // args.batch), generator=gen)
    labels[:, -1] = -100                       # the last position of each sequence has no next token
    return hidden, weight, labels


def _torchtune_loss():
    spec = importlib.util.find_spec("torchtune")
    if spec is None:
        raise ImportError("torchtune is not installed (pip install --no-deps torchtune==0.6.1)")
    path = Path(spec.submodule_search_locations[0]) / "modules" / "loss" / "ce_chunked_output_loss.py"
    module_spec = importlib.util.spec_from_file_location("ce_chunked_output_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.CEWithChunkedOutputLoss(num_output_chunks=8)


def loss_fn(name: str):
    """name → f(hidden (B, T, K), weight (V, K), labels (B, T)) → scalar loss."""
    if name == "unfused":
        return lambda h, w, y: F.cross_entropy((h @ w.t()).flatten(0, 1), y.flatten())
    if name == "torchtune":
        ce = _torchtune_loss()
        return lambda h, w, y: ce([c @ w.t() for c in h.chunk(ce.num_output_chunks, dim=1)], y)
    if name == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        ce = LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, y: ce(w, h.flatten(0, 1), y.flatten())
    import lowcost
    backend = name.split("-", 1)[1]
    return lambda h, w, y: lowcost.ops.linear_cross_entropy(h, w, y, backend=backend)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_one(name: str, args) -> dict:
    """In this (fresh) process: saved bytes, peak growth of one step, and the loss for a sanity check."""
    hidden, weight, labels = make_inputs(args)
    fn = loss_fn(name)
    fn(hidden, weight, labels).backward()                       # warm-up: lazy initialisation, kernels
    hidden.grad = None
    saved = harness.saved_activation_bytes(lambda: fn(hidden, weight, labels), [weight])
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")               # resets VmHWM to the current RSS
    loss = fn(hidden, weight, labels)
    loss.backward()
    peak = _status("VmHWM") - before
    return {"saved_bytes": saved, "peak_bytes": peak, "loss": float(loss), "grad_norm": float(hidden.grad.norm())}


def run_child(name: str, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if name in INTERPRETED:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, __file__, "--child", name, "--tokens", str(args.tokens), "--batch", str(args.batch),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (("tokens", 1024), ("batch", 2), ("vocab", 49152), ("hidden", 576), ("repeats", 5)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--results", default="linear_cross_entropy.csv", help="file name under benchmarks/results/")
    parser.add_argument("--child", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_one(args.child, args)))
        return
    logits_bytes = args.tokens * args.vocab * 4
    print(f"hardware: {harness.hardware()}  git {harness.git_sha()}; one fp32 logits tensor = "
          f"{logits_bytes / 2**20:.1f} MiB", flush=True)
    hidden, weight, labels = make_inputs(args)
    timed = [n for n in args.providers if n not in INTERPRETED]
    steps = {}
    for name in timed:
        fn = loss_fn(name)
        steps[name] = (lambda f: lambda: f(hidden, weight, labels).backward())(fn)
    timings = harness.time_interleaved(steps, torch.device("cpu"), warmup=1, repeats=args.repeats)
    rows = []
    for name in args.providers:
        result = run_child(name, args)
        if "error" in result:
            print(f"  {name:15s} not measured: {result['error']}", flush=True)
            continue
        timing = timings.get(name, {})
        row = {"provider": name, "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden,
               "saved_bytes": result["saved_bytes"], "peak_bytes": result["peak_bytes"],
               "saved_vs_logits": round(result["saved_bytes"] / logits_bytes, 4),
               "peak_vs_logits": round(result["peak_bytes"] / logits_bytes, 3),
               **{key: round(timing[key], 1) if timing else "" for key in ("median_ms", "p20_ms", "p80_ms")},
               "loss": round(result["loss"], 6)}
        rows.append(row)
        time_text = (f"{row['median_ms']:8.1f} ms [{row['p20_ms']}, {row['p80_ms']}]" if timing
                     else "  (interpreter: bytes only)")
        print(f"  {name:15s} saved {result['saved_bytes'] / 2**20:8.2f} MiB ({row['saved_vs_logits']:.4f} logits)  "
              f"peak +{result['peak_bytes'] / 2**20:8.1f} MiB ({row['peak_vs_logits']:.2f} logits)  {time_text}  "
              f"loss {result['loss']:.5f}", flush=True)
    base = {r["provider"]: r for r in rows}.get("unfused")
    if base:
        for row in rows:
            row["peak_drop_vs_unfused_logits"] = round((base["peak_bytes"] - row["peak_bytes"]) / logits_bytes, 3)
    print(f"appended {len(rows)} rows to {harness.append_rows(args.results, rows)}")


if __name__ == "__main__":
    main()
