"""Drawing for comparing two networks: the layer × layer CKA matrix with a selected cell
(matplotlib and numpy only)."""
from __future__ import annotations

import numpy as np
from matplotlib.patches import Rectangle


def _short(name: str, n: int = 16) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def draw_cka(ax, cka: np.ndarray, layers_a, layers_b, name_a: str = "A", name_b: str = "B"):
    """The CKA matrix (rows: layers of A, columns: layers of B, 0–1 in grey to dark blue),
    each value written in its cell; returns ``(image, selection rectangle)``."""
    cka = np.asarray(cka, dtype=np.float64)
    image = ax.imshow(cka, cmap="Blues", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    rows, cols = cka.shape
    if rows * cols <= 100:
        for i in range(rows):
            for j in range(cols):
                v = cka[i, j]
                ax.text(j, i, "–" if not np.isfinite(v) else f"{v:.2f}", ha="center",
                        va="center", fontsize=7, color="white" if v > 0.6 else "black")
    ax.set_yticks(np.arange(rows), [_short(n) for n in layers_a], fontsize=7)
    ax.set_xticks(np.arange(cols), [_short(n) for n in layers_b], fontsize=7, rotation=60,
                  ha="right")
    ax.set_ylabel(name_a, fontsize=8)
    ax.set_xlabel(name_b, fontsize=8)
    ax.set_title("linear CKA (click a cell)", fontsize=9, loc="left", y=1.0)
    box = Rectangle((-0.5, -0.5), 1, 1, fill=False, edgecolor="#d9432f", linewidth=2.2)
    ax.add_patch(box)
    return image, box


def select_cell(box: Rectangle, row: int, col: int) -> None:
    box.set_xy((col - 0.5, row - 0.5))


def cell_at(x: float | None, y: float | None, shape) -> tuple[int, int] | None:
    """The (row, column) of the matrix cell under data coordinates (x, y), or ``None``."""
    if x is None or y is None:
        return None
    row, col = int(np.floor(y + 0.5)), int(np.floor(x + 0.5))
    if 0 <= row < shape[0] and 0 <= col < shape[1]:
        return row, col
    return None
