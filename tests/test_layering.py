"""Import direction between lowcost's layers (docs/architecture.md, "Layers"): a module imports lowcost modules
only from its own layer or a lower one.

Every ``.py`` under ``lowcost/`` and under the directory setup.py installs as ``lowcost.kernels`` is parsed
with ``ast`` (nothing is imported). Every import counts, wherever it is written: module level, inside
functions (lazy imports are still dependencies), under ``if TYPE_CHECKING``, relative imports, and
``importlib.import_module`` / ``__import__`` calls whose module name is a string constant or an f-string
with a constant prefix. ``from P import x`` depends on the module ``P.x`` when that module exists, else on
``P`` itself (x is a name defined or re-exported by P's ``__init__``); so ``from lowcost import apply``
depends on the top package, which only ``lowcost/__init__.py`` may do.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lowcost"

# Lowest first. Several modules on one row share a layer. Prefixes are dotted module names.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("lowcost.kernels", "lowcost._C")),
    ("reference", ("lowcost.reference",)),
    ("ops", ("lowcost.ops",)),
    ("nn", ("lowcost.nn",)),
    ("quant", ("lowcost.quant",)),
    ("checkpoint", ("lowcost.checkpoint",)),
    ("warmstart", ("lowcost.warmstart",)),
    ("models", ("lowcost.models",)),
    ("patch", ("lowcost.patch",)),
    ("api", ("lowcost.api", "lowcost.distributed")),
    ("plan", ("lowcost.plan",)),      # runs lowcost.apply on fake tensors to predict a step's memory
    ("cli", ("lowcost.cli", "lowcost.__main__")),   # python -m lowcost runs the command
]
# Dependency-free helpers below every layer: anyone may import them (except the kernels, see below).
HELPERS = ("lowcost._extension", "lowcost._families")
# What a helper itself may import from lowcost: the extension loader loads the compiled extension.
HELPER_MAY_IMPORT = {"lowcost._extension": ("lowcost._C",)}
TOP = "lowcost"  # lowcost/__init__.py: above everything, may import anything

HELPER_RANK, TOP_RANK = -1, len(LAYERS)


def kernels_dir() -> Path:
    """The directory setup.py maps to ``lowcost.kernels`` (``package_dir["lowcost.kernels"] = "<dir>"``)."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                    and target.value.id == "package_dir" and isinstance(target.slice, ast.Constant)
                    and target.slice.value == "lowcost.kernels" and isinstance(node.value, ast.Constant)):
                return ROOT / node.value.value
    raise AssertionError("setup.py has no package_dir['lowcost.kernels'] = '<dir>': where do the kernels live?")


def source_files() -> dict[str, Path]:
    """Dotted module name → file, for lowcost/ and the kernels directory."""
    out: dict[str, Path] = {}
    for base, prefix in ((PACKAGE, "lowcost"), (kernels_dir(), "lowcost.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([prefix] + parts)] = path
    return out


def compiled_extension_exists() -> bool:
    """lowcost._C: built from csrc/ (its sources are the layer entry; a built .so may or may not be there)."""
    return any((ROOT / "csrc").rglob("*.cpp")) or any(PACKAGE.glob("_C*.so")) or any(PACKAGE.glob("_C*.pyd"))


@dataclass(frozen=True)
class Layer:
    name: str
    rank: int


def layer_of(module: str) -> Optional[Layer]:
    """The layer of a dotted lowcost module name; None for a lowcost module in no layer."""
    if module == TOP:
        return Layer("top: lowcost/__init__.py", TOP_RANK)
    for helper in HELPERS:
        if module == helper or module.startswith(helper + "."):
            return Layer(f"helper {helper}", HELPER_RANK)
    for rank, (name, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return Layer(name, rank)
    return None


def _is_package(module: str, files: dict[str, Path]) -> bool:
    return module in files and files[module].name == "__init__.py"


def _exists(module: str, files: dict[str, Path]) -> bool:
    return module in files or module == "lowcost._C"


def _from_target(package: str, name: str, files: dict[str, Path]) -> str:
    """``from package import name``: the submodule when it exists, else the package (a re-exported name)."""
    candidate = f"{package}.{name}"
    return candidate if _exists(candidate, files) else package


def _resolve_relative(importer: str, is_package: bool, level: int, module: Optional[str]) -> str:
    parts = importer.split(".")
    base = parts if is_package else parts[:-1]
    if level - 1 > 0:
        base = base[: len(base) - (level - 1)]
    if not base:
        raise AssertionError(f"relative import beyond the top package in {importer}")
    return ".".join(base + ([module] if module else []))


def _dynamic_name(call: ast.Call) -> Optional[str]:
    """Module named by ``importlib.import_module(...)`` / ``__import__(...)``: a constant, or the constant
    prefix of an f-string up to its last dot (``f"lowcost.ops._{x}"`` → ``lowcost.ops``)."""
    func = call.func
    is_import_module = (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))
    if not is_import_module or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        prefix = str(arg.values[0].value)
        return prefix.rsplit(".", 1)[0] if "." in prefix else None
    return None


def imported_modules(source: str, importer: str, is_package: bool, files: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, dotted module) for every lowcost module the source depends on."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            package = (_resolve_relative(importer, is_package, node.level, node.module) if node.level
                       else node.module)
            if package is None:
                continue
            for alias in node.names:
                target = package if alias.name == "*" else _from_target(package, alias.name, files)
                out.append((node.lineno, target))
        elif isinstance(node, ast.Call):
            name = _dynamic_name(node)
            if name is not None:
                out.append((node.lineno, name))
    return sorted({(line, m) for line, m in out if m == TOP or m.startswith(TOP + ".")})


def violation(importer: str, target: str) -> bool:
    """True when ``importer`` may not import ``target``."""
    if importer == target or target.startswith(importer + "."):
        return False  # a package importing its own submodules
    src, dst = layer_of(importer), layer_of(target)
    if src is None or dst is None:
        return True
    if importer == "lowcost.kernels" or importer.startswith("lowcost.kernels."):
        # the Triton kernels are installed on their own: nothing from lowcost but themselves
        return not (target == "lowcost.kernels" or target.startswith("lowcost.kernels."))
    if src.rank == HELPER_RANK:
        allowed = HELPER_MAY_IMPORT.get(importer, ())
        return not any(target == a or target.startswith(a + ".") for a in allowed)
    return dst.rank > src.rank


def find_violations(files: dict[str, Path]) -> list[str]:
    found = []
    for importer, path in sorted(files.items()):
        source = path.read_text(encoding="utf-8")
        for line, target in imported_modules(source, importer, _is_package(importer, files), files):
            if violation(importer, target):
                src, dst = layer_of(importer), layer_of(target)
                found.append(f"{path.relative_to(ROOT)}:{line} ({src.name if src else 'no layer'}) imports "
                             f"{target} ({dst.name if dst else 'no layer: unknown lowcost module'})")
    return found


# ----------------------------------------------------------------------------------------------- tests
def test_layer_entries_exist():
    """Each layer entry names a real package/module, so a rename cannot make the layering test vacuous."""
    files = source_files()
    missing = []
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if prefix == "lowcost._C":
                if not compiled_extension_exists():
                    missing.append(f"{prefix} (layer {name}): no csrc/*.cpp sources and no built lowcost/_C*.so")
            elif prefix not in files:
                missing.append(f"{prefix} (layer {name})")
            elif not any(m == prefix or m.startswith(prefix + ".") for m in files if m != prefix) \
                    and files[prefix].name == "__init__.py":
                missing.append(f"{prefix} (layer {name}): a package with no modules")
    for helper in HELPERS:
        if helper not in files:
            missing.append(f"{helper} (helper)")
    if TOP not in files:
        missing.append("lowcost/__init__.py (top)")
    assert kernels_dir().is_dir(), f"setup.py maps lowcost.kernels to {kernels_dir()}, which does not exist"
    assert not missing, "layer entries that do not exist:\n" + "\n".join(missing)


def test_every_module_has_a_layer():
    files = source_files()
    orphans = [f"{path.relative_to(ROOT)} ({module})" for module, path in files.items() if layer_of(module) is None]
    assert not orphans, ("modules in no layer (add them to LAYERS/HELPERS in tests/test_layering.py and to "
                         "docs/architecture.md):\n" + "\n".join(orphans))


def test_imports_point_down():
    found = find_violations(source_files())
    assert not found, (f"{len(found)} import(s) point up the layers (docs/architecture.md, 'Layers'):\n"
                       + "\n".join(found))


# ----------------------------------------------------------------------------------------------- the checker itself
_FAKE_FILES = {m: Path(f"/{m.replace('.', '/')}.py") for m in
               ("lowcost", "lowcost.api", "lowcost.ops", "lowcost.ops.backend", "lowcost.nn", "lowcost.nn.lora_linear",
                "lowcost.checkpoint", "lowcost.checkpoint.tracking", "lowcost.kernels", "lowcost.kernels.philox")}
for _pkg in ("lowcost", "lowcost.ops", "lowcost.nn", "lowcost.checkpoint", "lowcost.kernels"):
    _FAKE_FILES[_pkg] = Path(f"/{_pkg.replace('.', '/')}/__init__.py")


@pytest.mark.parametrize("importer, source, expected", [
    ("lowcost.nn.lora_linear", "def f():\n    import lowcost\n", [(2, "lowcost")]),                  # lazy
    ("lowcost.nn.lora_linear", "from lowcost import apply\n", [(1, "lowcost")]),                     # re-export
    ("lowcost.nn.lora_linear", "from lowcost import checkpoint\n", [(1, "lowcost.checkpoint")]),     # submodule
    ("lowcost.checkpoint.tracking", "from . import tracking\nfrom .. import ops\n",
     [(1, "lowcost.checkpoint.tracking"), (2, "lowcost.ops")]),                                      # relative
    ("lowcost.kernels.philox", "from .tiles import x\n", [(1, "lowcost.kernels.tiles")]),
    ("lowcost.ops.backend", "import importlib\nm = importlib.import_module(f'lowcost.api{x}')\n",
     [(2, "lowcost")]),                                                                              # dynamic
    ("lowcost.ops.backend", "import importlib\nimportlib.import_module('lowcost.nn')\nimport torch\n",
     [(2, "lowcost.nn")]),
])
def test_checker_finds_imports(importer, source, expected):
    assert imported_modules(source, importer, _FAKE_FILES[importer].name == "__init__.py", _FAKE_FILES) == expected


@pytest.mark.parametrize("importer, target, bad", [
    ("lowcost.nn.lora_linear", "lowcost.ops.backend", False),
    ("lowcost.ops.backend", "lowcost.nn", True),
    ("lowcost.checkpoint.selective", "lowcost.ops.lora_linear", False),
    ("lowcost.warmstart.schedule", "lowcost", True),
    ("lowcost.cli.demo", "lowcost", True),
    ("lowcost", "lowcost.cli", False),
    ("lowcost.ops._torch_backend", "lowcost._extension", False),
    ("lowcost._families", "lowcost.models", True),
    ("lowcost._extension", "lowcost._C", False),
    ("lowcost.kernels.lora_linear", "lowcost.kernels.philox", False),
    ("lowcost.kernels.lora_linear", "lowcost._extension", True),
    ("lowcost.ops", "lowcost.nosuchthing", True),
])
def test_checker_rule(importer, target, bad):
    assert violation(importer, target) is bad
