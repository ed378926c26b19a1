"""The lowcost command: fine-tune open-weight models cheaply (lowcost COMMAND --help for each command).

Each subcommand is one module of this package that defines

    add_arguments(parser: argparse.ArgumentParser) -> None    its options (the module docstring is its help)
    run(args: argparse.Namespace) -> int                       the work; returns the exit status

and imports heavy dependencies (torch, transformers, ...) inside ``run``, so ``lowcost --help`` stays fast.
Bad input is reported as one line on stderr with a non-zero exit, never a traceback: subcommands raise
``CLIError`` for what they detect themselves; any other exception is also shown as one line (with the
exception type) unless ``LOWCOST_DEBUG=1`` asks for the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType
from typing import NoReturn, Optional, Sequence

SUBCOMMANDS = ("finetune", "demo", "plan", "bench")
EXIT_USAGE = 2


class CLIError(Exception):
    """A problem with the user's input or environment, shown as one line (no traceback)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the message and where to get help), exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _subcommand_module(name: str) -> Optional[ModuleType]:
    """``lowcost.cli.<name>``, or None while that subcommand does not exist yet."""
    full = f"{__name__}.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name == full:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowcost", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = _subcommand_module(name)
        if module is None:
            continue
        doc = (module.__doc__ or name).strip()
        sub = commands.add_parser(name, help=doc.splitlines()[0], description=doc,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def _one_line(exc: BaseException, limit: int = 500) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    debug = os.environ.get("LOWCOST_DEBUG") == "1"
    try:
        return int(args.run(args) or 0)
    except CLIError as exc:
        print(f"lowcost {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lowcost {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  a library error is still shown as one line
        if debug:
            raise
        print(f"lowcost {args.command}: error: {type(exc).__name__}: {_one_line(exc)} "
              "(LOWCOST_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def program(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """The ``lowcost`` program (console script, ``python -m lowcost``): exits with ``main``'s code.

    Under torchrun with more than one process (WORLD_SIZE > 1), where ``lowcost finetune`` creates the
    process group and destroys it at the end, the interpreter's finalisation is skipped
    (``lowcost.distributed.exit_skipping_finalisation``): a gloo native thread that outlives the group could
    otherwise abort the finished process and torchrun would report the run as failed."""
    code = main(argv)
    if _several_processes():
        from lowcost.distributed import exit_skipping_finalisation
        exit_skipping_finalisation(code)
    sys.exit(code)


def _several_processes() -> bool:
    """torchrun started more than one process (WORLD_SIZE, set by torchrun, is above 1)."""
    text = os.environ.get("WORLD_SIZE", "1").strip()
    return text.isdigit() and int(text) > 1


if __name__ == "__main__":
    program()
