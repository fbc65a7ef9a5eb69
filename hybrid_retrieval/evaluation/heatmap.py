"""A picture of cross-lingual transfer: mAP for each (query language, candidate language) pair."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def draw_heatmap(ax: Any, matrix: np.ndarray, languages: Sequence[str], title: str, difference: bool = False,
                 title_size: float = 10, cell_size: float = 7) -> Any:
    """One (query language x candidate language) panel on `ax`, values written in the cells: mAP on 0..1
    (viridis), or with `difference` a signed change on a symmetric blue-red scale. Returns the image (for a
    colour bar)."""
    if difference:
        finite = np.isfinite(matrix).any()
        limit = max(0.05, float(np.nanmax(np.abs(matrix))) if finite else 0.05)
        image = ax.imshow(matrix, vmin=-limit, vmax=limit, cmap="RdBu")
    else:
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(languages)), languages)
    ax.set_yticks(range(len(languages)), languages)
    ax.set_xlabel("candidate language")
    ax.set_ylabel("query language")
    ax.set_title(title, fontsize=title_size)
    for i in range(len(languages)):
        for j in range(len(languages)):
            value = matrix[i, j]
            if np.isfinite(value):
                light = abs(value) > 0.5 * limit if difference else value < 0.5
                ax.text(j, i, f"{value:+.2f}" if difference else f"{value:.2f}", ha="center", va="center",
                        fontsize=cell_size, color="white" if light else "black")
    return image


def plot_cross_lingual_heatmap(matrix: np.ndarray, languages: Sequence[str], path: str | Path,
                               title: str = "mAP: query language x candidate language") -> Path:
    """Save ``matrix`` (rows: query language, columns: candidate language; diagonal = monolingual) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    size = 1.2 + 0.55 * len(languages)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = draw_heatmap(ax, matrix, languages, title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
