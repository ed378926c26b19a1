"""Run the benchmarks by name, draw their plots, and regenerate the README's results tables.

    lowcost bench lora_linear checkpoint [--quick] [--results DIR]
    lowcost bench checkpoint --args '--rounds 3'         (arguments for the one script named)
    lowcost bench --list
    lowcost bench --tables-only

Each NAME runs benchmarks/bench_NAME.py in a fresh process. Every script checks each provider's outputs
against a reference before timing and refuses (exit status != 0, nothing written) a provider that
disagrees; rows are appended with hardware, versions and git sha, plots drawn next to them. After a full
run into the repository's benchmarks/results/, the README tables between the lowcost-bench markers are
regenerated from the results files. --quick runs small shapes into benchmarks/results/scratch/quick/
(git-ignored) and leaves the README alone. benchmarks/ is part of a source checkout, not of the installed
package: run from a clone (pip install -e .), or point --benchmarks at one.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lowcost.cli import CLIError


def _default_benchmarks() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmark subjects (see --list)")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats, into a scratch folder")
    parser.add_argument("--results", default=None, metavar="DIR",
                        help="where rows and plots go (default benchmarks/results/, or .../scratch/quick with --quick)")
    parser.add_argument("--benchmarks", default=None, metavar="DIR", help="the benchmarks/ folder of a checkout")
    parser.add_argument("--list", action="store_true", help="list the subjects and exit")
    parser.add_argument("--tables-only", action="store_true", help="only regenerate the README tables")
    parser.add_argument("--no-tables", action="store_true", help="do not touch the README")
    parser.add_argument("--args", default="", metavar="'ARGS'",
                        help="extra arguments for the one named script, e.g. --args '--rounds 3'")


def _benchmarks_dir(args) -> Path:
    folder = Path(args.benchmarks).expanduser() if args.benchmarks else _default_benchmarks()
    if not (folder / "harness.py").is_file():
        raise CLIError(f"no benchmarks/ folder with harness.py at {folder}: lowcost bench runs the scripts of a "
                       f"source checkout (git clone, then pip install -e .), or pass --benchmarks DIR")
    return folder


def subjects(folder: Path) -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in folder.glob("bench_*.py"))


def _readme_tables(folder: Path):
    spec = importlib.util.spec_from_file_location("lowcost_readme_tables", folder / "readme_tables.py")
    if spec is None or not (folder / "readme_tables.py").is_file():
        raise CLIError(f"{folder} has no readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_one(folder: Path, name: str, results: Path, quick: bool, extra: list[str]) -> float:
    command = [sys.executable, str(folder / f"bench_{name}.py")] + (["--quick"] if quick else []) + extra
    env = dict(os.environ, LOWCOST_BENCH_RESULTS=str(results))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder.parent), env.get("PYTHONPATH")]))
    print(f"lowcost bench: {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    code = subprocess.run(command, env=env, cwd=folder.parent).returncode
    if code != 0:
        raise CLIError(f"benchmark {name!r} failed (exit status {code}; a provider that disagrees with the "
                       f"reference is refused before timing): see its output above; nothing more was run")
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    folder = _benchmarks_dir(args)
    names = subjects(folder)
    if args.list:
        print("\n".join(names))
        return 0
    repo_results = folder / "results"
    results = Path(args.results).expanduser() if args.results else \
        (repo_results / "scratch" / "quick" if args.quick else repo_results)
    extra = shlex.split(args.args)
    if not args.tables_only:
        if not args.names:
            raise CLIError(f"name at least one benchmark: {', '.join(names)} (or --list, --tables-only)")
        unknown = [n for n in args.names if n not in names]
        if unknown:
            raise CLIError(f"unknown benchmark {', '.join(map(repr, unknown))}; expected some of {', '.join(names)}")
        if extra and len(args.names) != 1:
            raise CLIError("--args passes arguments to one script: name exactly one benchmark")
        results.mkdir(parents=True, exist_ok=True)
        for name in args.names:
            seconds = _run_one(folder, name, results, args.quick, extra)
            print(f"lowcost bench: {name} done in {seconds:.0f} s; rows and plots in {results}", file=sys.stderr)
    touch_readme = not args.no_tables and not args.quick and results.resolve() == repo_results.resolve()
    readme = folder.parent / "README.md"
    if touch_readme and readme.is_file():
        updated = _readme_tables(folder).update_readme(readme, results)
        print(f"lowcost bench: README tables regenerated: {', '.join(updated) or 'none'}", file=sys.stderr)
    elif args.tables_only:
        raise CLIError("--tables-only regenerates the README from benchmarks/results/; not with --quick, "
                       "--no-tables or another --results folder")
    return 0
