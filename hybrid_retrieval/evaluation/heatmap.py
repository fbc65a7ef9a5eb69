"""A picture of cross-lingual transfer: mAP for each (query language, candidate language) pair."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def plot_cross_lingual_heatmap(matrix: np.ndarray, languages: Sequence[str], path: str | Path,
                               title: str = "mAP: query language x candidate language") -> Path:
    """Save ``matrix`` (rows: query language, columns: candidate language; diagonal = monolingual) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    size = 1.2 + 0.55 * len(languages)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(languages)), languages)
    ax.set_yticks(range(len(languages)), languages)
    ax.set_xlabel("candidate language")
    ax.set_ylabel("query language")
    ax.set_title(title, fontsize=10)
    for i in range(len(languages)):
        for j in range(len(languages)):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] < 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
