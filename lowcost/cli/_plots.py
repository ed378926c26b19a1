"""PNG output (matplotlib, Agg backend), written atomically: the loss curve and the demo's table."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def loss_curve(path: Path, curves: dict, evals: dict, title: str) -> Path:
    """``curves``: label → (steps, training losses); ``evals``: label → (steps, held-out losses)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=f"{label} (train)", linewidth=1.2)
    for label, (steps, losses) in evals.items():
        if steps:
            ax.plot(steps, losses, "o--", label=f"{label} (held-out)", markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def table(path: Path, header: list[str], rows: list[list[str]], title: str) -> Path:
    """A table drawn as an image (the demo's result)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 0.42 * (len(rows) + 2)))
    ax.axis("off")
    drawn = ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="left", colLoc="left")
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(8.5)
    drawn.auto_set_column_width(list(range(len(header))))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
