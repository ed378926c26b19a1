"""``import lowcost`` works without the compiled extension: one warning, then the pure paths."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_without_compiled_extension_warns_once_and_falls_back():
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["lowcost._C"] = None            # as if the extension had not been built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import lowcost
            import lowcost.ops, lowcost.nn          # further imports say nothing more
        messages = [str(w.message) for w in caught if "lowcost._C" in str(w.message)]
        assert len(messages) == 1, messages
        import torch
        from lowcost._extension import extension_loaded, has_kernel
        assert not extension_loaded() and not has_kernel("philox_dropout", "CPU")
        x, w = torch.randn(3, 8), torch.randn(4, 8)
        a, b = torch.randn(2, 8), torch.randn(4, 2)
        y = lowcost.lora_linear(x, w, a, b, 1.0, dropout=0.5, seed=1)
        print("ok", tuple(y.shape))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ok (3, 4)" in result.stdout
