"""The README's benchmark tables, generated from the results files (figures in the README are never typed).

Each table sits between two marker comments in README.md:

    <!-- lowcost-bench:lora_linear -->
    ...generated, replaced on every run...
    <!-- /lowcost-bench:lora_linear -->

``update_readme(readme, results_dir)`` re-renders every marked table whose results file exists and leaves
everything outside the markers alone. ``lowcost bench`` calls it after a (non-quick) run;
``python benchmarks/readme_tables.py [--readme README.md] [--results benchmarks/results]`` does it alone.
A run is the set of rows appended at once (one ``date`` stamp); tables show the latest run (the warm-start
table: the latest run of each part and domain, which are appended separately).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def latest_run(rows: list[dict]) -> list[dict]:
    last = max(r["date"] for r in rows)
    return [r for r in rows if r["date"] == last]


def _stamp(rows: list[dict], name: str) -> str:
    r = rows[0]
    return (f"From [`{name}`](benchmarks/results/{name}), run of {r['date']} (git {r['git']}, {r['hardware']}, "
            f"torch {r['torch']}):")


def _table(head: list[str], body: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"] + \
        ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in body]


def _ms(row: dict) -> str:
    return f"{float(row['median_ms']):.1f} ms [{float(row['p20_ms']):.1f}, {float(row['p80_ms']):.1f}]"


def _mib(value) -> str:
    return f"{int(float(value)) / 2**20:.2f} MiB"


def render_lora_linear(rows: list[dict]) -> list[str]:
    run = latest_run(rows)
    configs = list(dict.fromkeys((r["M"], r["K"], r["N"], r["dropout"]) for r in run))
    body = []
    for M, K, N, p in configs:
        by = {r["provider"]: r for r in run if (r["M"], r["K"], r["N"], r["dropout"]) == (M, K, N, p)}
        ours = by.get("lowcost-torch") or next(r for n, r in by.items() if n.startswith("lowcost"))
        peft = by.get("peft")
        body.append([f"{M}×{K}×{N}, p={p}", _ms(by["linear (floor)"]), _ms(peft) if peft else "-", _ms(ours),
                     f"{float(ours['median_ms']) / float(peft['median_ms']):.2f}" if peft else "-",
                     f"{_mib(peft['saved_bytes'])} → {_mib(ours['saved_bytes'])}" if peft else _mib(ours["saved_bytes"])])
    r0 = run[0]
    head = [f"LoRA linear fwd+bwd, {r0['dtype']}, r={r0['r']} (M×K×N, dropout)", "floor", "PEFT",
            ours["provider"], "lowcost / PEFT", "saved: PEFT → lowcost"]
    return [_stamp(run, "lora_linear.csv"), ""] + _table(head, body)


def render_apply(rows: list[dict]) -> list[str]:
    run = latest_run(rows)
    r0 = run[0]
    body = [[r["dropout"], r["provider"], int(r["trainable"]), _ms(r), _mib(r["saved_bytes"]), r["time_vs_peft"] or "-",
             r["saved_vs_peft"] or "-"] for r in run]
    shape = f"Llama h{r0['hidden']} I{r0['intermediate']} L{r0['layers']}, batch {r0['batch']} × seq {r0['seq']}, " \
            f"vocab {r0['vocab']}, LoRA r={r0['r']} all-linear"
    return [_stamp(run, "apply.csv") + f" {shape}.", ""] + _table(
        ["dropout", "provider", "trainable", "step (median [p20, p80])", "saved activations", "time / PEFT",
         "saved / PEFT"], body)


def render_checkpoint(rows: list[dict]) -> list[str]:
    run = latest_run(rows)
    body = []
    for r in run:
        predicted = f"{_mib(r['predicted_bytes'])} (budget {_mib(r['budget_bytes'])})" if r.get("predicted_bytes") else ""
        body.append([r["provider"], r["decisions"], f"{float(r['saved_mib']):.2f} MiB", f"{float(r['ratio_vs_none']):.3f}×",
                     _ms(r), r["recomputed_matmuls"], predicted])
    return [_stamp(run, "checkpoint.csv") + f" shape {run[0]['shape']}, {run[0]['rounds']} rounds.", ""] + _table(
        ["provider", "decisions per block", "saved activations", "× no checkpointing", "step (median [p20, p80])",
         "matmuls recomputed", "budget planner's prediction"], body)


def render_offload(rows: list[dict]) -> list[str]:
    run = latest_run(rows)
    body = [[r["provider"], r["device"], r["dtype"], r["shape"], _mib(r["device_bytes"]), _mib(r["host_bytes"]),
             f"{float(r['ratio_vs_none']):.4f}×", f"{float(r['median_ms']):.2f} ms", f"{float(r['time_vs_full']):.3f}×"]
            for r in run]
    return [_stamp(run, "offload.csv"), ""] + _table(
        ["setup", "device", "dtype", "shape", "device bytes", "host bytes", "× none", "step", "× full"], body)


def render_warmstart(rows: list[dict]) -> list[str]:
    """The latest run of each group of cases: (part, the case up to its first comma), e.g. (new_tokens,
    "SmolLM2 +40 Wikipedia words"): parts and domains are run and appended separately."""
    group = lambda r: (r["part"], r["case"].split(",")[0])  # noqa: E731
    body = []
    for key in sorted(dict.fromkeys(map(group, rows)), key=lambda k: k[0] != "new_tokens"):
        for r in latest_run([r for r in rows if group(r) == key]):
            body.append([r["part"], r["case"], r["metric"], r["value"], r["target"], r["detail"],
                         f"{r['date'][:10]} {r['git']}"])
    return [f"From [`warmstart.csv`](benchmarks/results/warmstart.csv), the latest run of each part and domain "
            f"({rows[-1]['hardware']}, torch {rows[-1]['torch']}):", ""] + _table(
        ["part", "case", "metric", "value", "target", "detail", "run"], body)


RENDERERS: dict[str, tuple[str, Callable[[list[dict]], list[str]]]] = {
    "lora_linear": ("lora_linear.csv", render_lora_linear),
    "apply": ("apply.csv", render_apply),
    "checkpoint": ("checkpoint.csv", render_checkpoint),
    "offload": ("offload.csv", render_offload),
    "warmstart": ("warmstart.csv", render_warmstart),
}
_BLOCK = re.compile(r"(<!-- lowcost-bench:(\w+) -->\n)(.*?)(<!-- /lowcost-bench:\2 -->)", re.S)


def render(subject: str, results_dir: Path) -> Optional[str]:
    """The table of ``subject`` from its results file (None when the file is missing or empty)."""
    filename, renderer = RENDERERS[subject]
    path = results_dir / filename
    rows = read_rows(path) if path.exists() else []
    return "\n".join(renderer(rows)) + "\n" if rows else None


def update_readme(readme: Path, results_dir: Path) -> list[str]:
    """Re-renders every marked table; writes the README atomically; returns the subjects updated."""
    text = readme.read_text(encoding="utf-8")
    updated = []

    def replace(match):
        subject = match.group(2)
        table = render(subject, results_dir) if subject in RENDERERS else None
        if table is None:
            return match.group(0)
        updated.append(subject)
        return match.group(1) + table + match.group(4)

    new = _BLOCK.sub(replace, text)
    if new != text:
        tmp = readme.with_name(readme.name + ".tmp")
        tmp.write_text(new, encoding="utf-8")
        os.replace(tmp, readme)
    return updated


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    updated = update_readme(Path(args.readme), Path(args.results))
    print(f"README tables regenerated: {', '.join(updated) or 'none (no markers or no results)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
