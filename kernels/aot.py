"""A kernel variant to compile ahead of time (was read by the old tools/triton_aot_check.py; tools/kernel_report.py does not compile these variants yet) without building tensors for it.

``Variant`` has what the compile check reads from a launch: the kernel, its Triton signature, constexprs,
launch options and a label. The fused loss and MLP kernels describe their variants with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton


@dataclass
class Variant:
    kernel: triton.JITFunction
    types: dict            # argument name → Triton type ("*fp16", "i32", "fp32"), constexprs excluded
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 2
    label: str = ""

    def signature(self) -> dict:
        return {name: "constexpr" if name in self.constexprs else self.types[name] for name in self.kernel.arg_names}


def pointer_and_scalar_types(kernel: triton.JITFunction, pointers: dict, floats: tuple = ()) -> dict:
    """Types of a kernel's runtime arguments: ``pointers`` maps each *_ptr name to its element type; names in
    ``floats`` are fp32; every other argument is i32."""
    types = {}
    for name in kernel.arg_names:
        if name.endswith("_ptr"):
            types[name] = "*" + pointers[name]
        else:
            types[name] = "fp32" if name in floats else "i32"
    return types
