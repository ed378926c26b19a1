"""LoRA linear forward+backward: lowcost (each usable backend) vs the PEFT LoRA layer vs the frozen
``nn.Linear`` floor (forward + input gradient only), in one run.

    python benchmarks/bench_lora_linear.py                        # CPU defaults
    python benchmarks/bench_lora_linear.py --device cuda --dtype bfloat16 \
        --shapes 8192x4096x4096 8192x4096x14336 --rank 16

Every step is y = layer(x); y.backward(g) with x requiring grad (a layer inside a network). Before timing, every
provider's y and gradients are checked against a float64 reference (``lowcost.reference``): the lowcost
backends with and without dropout (same seed, same Philox mask), PEFT's layer and the floor without dropout
(their masks are their own); a provider off by more than the dtype's tolerance is refused and nothing is
written. Providers are timed round-robin (one sample each per round). ``--quick``: one small shape, 3 repeats. Reports the median time with its 20th-80th percentile spread, the ratio to PEFT and to the floor, and the
saved-activation bytes (distinct non-parameter storages seen by saved_tensors_hooks). Appends rows to
benchmarks/results/lora_linear.csv and draws benchmarks/results/lora_linear_<device>.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import lowcost  # noqa: E402
from lowcost.ops.backend import cuda_kernels_usable, triton_usable  # noqa: E402


def make_layers(K: int, N: int, r: int, alpha: float, dropout: float, dtype, device):
    """A frozen base linear and the same adapter weights in lowcost's and PEFT's layers: (providers, the
    tensors whose storage is not an activation, the lowcost layer)."""
    torch.manual_seed(0)
    base = nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)
    ours = lowcost.LoRALinear.from_linear(base, r=r, alpha=alpha, dropout=dropout)
    nn.init.normal_(ours.lora_B, std=0.02)
    layers = {"linear (floor)": lambda x: F.linear(x, base.weight, base.bias)}
    peft_layer = _peft_layer(base, r, alpha, dropout, ours)
    if peft_layer is not None:
        layers["peft"] = peft_layer
    for backend in _lowcost_backends(device):
        layers[f"lowcost-{backend}"] = _with_backend(ours, backend)
    return layers, [base.weight, base.bias, ours.lora_A, ours.lora_B], ours


def _peft_layer(base, r, alpha, dropout, ours):
    try:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear
    except ImportError:
        print("peft not installed: skipping the PEFT provider", file=sys.stderr)
        return None
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)
    layer = PeftLinear(base, "default", config=config, r=r, lora_alpha=alpha, lora_dropout=dropout)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    return layer.train()


def _lowcost_backends(device) -> list[str]:
    backends = ["torch"]
    if device.type == "cuda" and triton_usable(device):
        backends.append("triton")
    if cuda_kernels_usable(device):
        backends.append("cuda")
    return backends


def _with_backend(layer: lowcost.LoRALinear, backend: str):
    def run(x):
        return lowcost.lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling, bias=layer.bias,
                                   dropout=layer.dropout, backend=backend)
    return run


TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}   # relative to max |reference|
CHECK_SEED = 1234


def _run(fn, x, grad, params: dict) -> dict:
    """y and the gradients of one forward + backward of ``fn`` (x and ``params`` as leaves)."""
    x = x.detach().requires_grad_(True)
    for p in params.values():
        p.grad = None
    y = fn(x)
    y.backward(grad)
    return {"y": y.detach(), "dx": x.grad, **{f"d{name}": p.grad.clone() for name, p in params.items()}}


def _reference(x, grad, ours, dropout, lora=True) -> dict:
    """The float64 reference (``lowcost.reference``, pure-torch Philox mask with ``CHECK_SEED``) for the
    layer ``ours`` (a ``lowcost.LoRALinear``: W, bias, A, B, s); ``lora=False``: the frozen linear alone."""
    from lowcost.reference.lora_linear import lora_linear_backward, lora_linear_forward
    X, G, W = x.double(), grad.double(), ours.weight.double()
    b = ours.bias.double() if ours.bias is not None else None
    if not lora:
        return {"y": X @ W.t() + (b if b is not None else 0), "dx": G @ W}
    A, B = ours.lora_A.detach().double(), ours.lora_B.detach().double()
    y, u = lora_linear_forward(X, W, A, B, b, ours.scaling, dropout, CHECK_SEED)
    dx, da, db, _ = lora_linear_backward(G, X, W, A, B, u, ours.scaling, dropout, CHECK_SEED, (True, True, True, False))
    return {"y": y, "dx": dx, "dA": da, "dB": db}


def check_layers(layers, ours, x, grad, dropout) -> None:
    """Every provider against the float64 reference before any timing (``harness.check_providers``)."""
    tol = TOLERANCE[x.dtype]
    where = f"M={x.shape[0]} K={x.shape[1]} N={grad.shape[1]} p={dropout}: "
    harness.check_providers(_reference(x, grad, ours, 0.0, lora=False),
                            {"linear (floor)": _run(layers["linear (floor)"], x, grad, {})}, tol, where)
    if "peft" in layers:
        peft = layers["peft"].eval()          # PEFT's own dropout mask cannot match: check its math at p=0
        try:
            got = _run(peft, x, grad, {"A": peft.lora_A["default"].weight, "B": peft.lora_B["default"].weight})
        finally:
            peft.train()
        harness.check_providers(_reference(x, grad, ours, 0.0), {"peft": got}, tol, where)
    for p in sorted({0.0, dropout}):
        outputs = {}
        for name in (n for n in layers if n.startswith("lowcost-")):
            backend = name.split("-", 1)[1]
            fn = lambda t, b=backend: lowcost.lora_linear(t, ours.weight, ours.lora_A, ours.lora_B, ours.scaling,  # noqa: E731
                                                           bias=ours.bias, dropout=p, seed=CHECK_SEED, backend=b)
            outputs[f"{name} (p={p})"] = _run(fn, x, grad, {"A": ours.lora_A, "B": ours.lora_B})
        harness.check_providers(_reference(x, grad, ours, p), outputs, tol, where)


def bench_shape(M, K, N, r, dropout, dtype, device, repeats) -> list[dict]:
    layers, params, ours = make_layers(K, N, r, 2.0 * r, dropout, dtype, device)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(M, N, device=device, dtype=dtype)
    check_layers(layers, ours, x.detach(), grad, dropout)
    def step_of(layer):
        def step():
            x.grad = None
            layer(x).backward(grad)
        return step

    timings = harness.time_interleaved({name: step_of(layer) for name, layer in layers.items()}, device,
                                       repeats=repeats)
    rows = []
    for name, layer in layers.items():
        timing = timings[name]
        saved = harness.saved_activation_bytes(lambda: layer(x), params + list(_parameters(layer)))
        rows.append({"provider": name, "M": M, "K": K, "N": N, "r": r, "dtype": str(dtype).split(".")[-1],
                     "dropout": dropout, **{k: round(v, 4) if isinstance(v, float) else v
                                            for k, v in timing.items()}, "saved_bytes": saved})
        print(f"  {name:16s} {timing['median_ms']:9.3f} ms  [{timing['p20_ms']:.3f}, {timing['p80_ms']:.3f}]"
              f"  saved {saved / 2**20:8.2f} MiB", flush=True)
    by_name = {row["provider"]: row["median_ms"] for row in rows}
    for row in rows:
        row["vs_floor"] = round(row["median_ms"] / by_name["linear (floor)"], 4)
        row["vs_peft"] = round(row["median_ms"] / by_name["peft"], 4) if "peft" in by_name else ""
    return rows


def _parameters(layer):
    return layer.parameters() if isinstance(layer, nn.Module) else []


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = sorted({(r["M"], r["K"], r["N"], r["dropout"]) for r in rows})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(configs), 4))
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        values = [next((r["vs_floor"] for r in rows if r["provider"] == provider
                        and (r["M"], r["K"], r["N"], r["dropout"]) == c), 0) for c in configs]
        ax.bar([j + i * width for j in range(len(configs))], values, width, label=provider)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))])
    ax.set_xticklabels([f"{M}x{K}x{N}\np={p}" for M, K, N, p in configs], fontsize=8)
    ax.set_ylabel("fwd+bwd time / frozen linear (lower is better)")
    ax.set_title(f"LoRA linear r={rows[0]['r']} {rows[0]['dtype']} — {harness.hardware()}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shapes", nargs="+", default=["2048x1024x1024", "1024x1024x2816"], help="MxKxN")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropouts", nargs="+", type=float, default=[0.0, 0.05])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--results", default="lora_linear.csv", help="file name under benchmarks/results/")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--quick", action="store_true", help="one small shape, 3 repeats (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.repeats = ["256x128x192"], 3
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"hardware: {harness.hardware()}  git {harness.git_sha()}", flush=True)
    rows = []
    for shape in args.shapes:
        M, K, N = (int(v) for v in shape.split("x"))
        for dropout in args.dropouts:
            print(f"M={M} K={K} N={N} r={args.rank} {args.dtype} dropout={dropout}", flush=True)
            rows += bench_shape(M, K, N, args.rank, dropout, dtype, device, args.repeats)
    path = harness.append_rows(args.results, rows)
    print(f"appended {len(rows)} rows to {path}")
    if not args.no_plot:
        png = path.with_name(f"{path.stem}_{device.type}.png")
        plot(rows, png)
        print(f"plot: {png}")


if __name__ == "__main__":
    harness.run_script(main)
