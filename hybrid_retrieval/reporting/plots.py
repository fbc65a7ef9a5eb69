"""Figures of a report: mAP and rank distance against α, rank distance per language, cross-lingual heatmaps side by
side (or their difference), and training curves. PNG files, labelled axes, language codes on the ticks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hybrid_retrieval.evaluation.heatmap import draw_heatmap
from hybrid_retrieval.reporting.comparison import PREFIX, Report, Row, per_language

SETTING_LABELS = {"mono": "Mo", "cross": "Cr", "multi": "Mul"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def alpha_of(row: Row, params_by_run: Mapping[str, Mapping[str, str]]) -> float | None:
    values = {params_by_run[i].get("sampler.mono_ratio") for i in row.run_ids}
    if len(values) != 1:
        return None
    try:
        return float(values.pop())
    except (TypeError, ValueError):
        return None


def plot_alpha(report: Report, params_by_run: Mapping[str, Mapping[str, str]], key: str, path: Path) -> Path | None:
    """Mo / Cr / Mul mAP and rank distance against α (the monolingual batch ratio), mean ± std over seeds.

    Drawn when the trained rows differ in α and in nothing else."""
    rows = [r for r in report.rows if r.stage == "trained"]
    alphas = [alpha_of(r, params_by_run) for r in rows]
    if len(rows) < 2 or None in alphas or len(set(alphas)) != len(rows):
        return None
    if any(not k.startswith("sampler.") for k in report.swept):
        return None
    order = np.argsort(alphas)
    xs = np.asarray(alphas)[order]
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for setting in ("mono", "cross", "multi"):
        metric = f"{PREFIX}/{key}/{setting}/map"
        means = np.asarray([rows[i].mean(metric) for i in order])
        stds = np.nan_to_num(np.asarray([rows[i].std(metric) for i in order]))
        left.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=f"{SETTING_LABELS[setting]} mAP")
    left.set_xlabel("α (share of monolingual batches)")
    left.set_ylabel("mAP")
    left.set_title(f"{key}: mAP per setting")
    left.legend(fontsize=8)
    metric = f"{PREFIX}/{key}/multi/rank_distance"
    means = np.asarray([rows[i].mean(metric) for i in order])
    stds = np.nan_to_num(np.asarray([rows[i].std(metric) for i in order]))
    right.errorbar(xs, means, yerr=stds, marker="o", capsize=3, color="tab:red")
    right.set_xlabel("α (share of monolingual batches)")
    right.set_ylabel("rank distance (lower = less language bias)")
    right.set_title(f"{key}: language bias")
    for ax in (left, right):
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_rank_distance(report: Report, key: str, path: Path) -> Path | None:
    """Rank distance per query language (multilingual pool), one bar per row."""
    languages, values = per_language(report, key, "multi", "rank_distance")
    if not languages:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(languages) * max(1, len(report.rows)) / 2 + 3), 3.8))
    width = 0.8 / len(report.rows)
    for i, (row, row_values) in enumerate(zip(report.rows, values)):
        ax.bar(np.arange(len(languages)) + (i - (len(report.rows) - 1) / 2) * width, row_values, width,
               label=row.label)
    ax.set_xticks(range(len(languages)), languages)
    ax.set_xlabel("query language")
    ax.set_ylabel("rank distance (lower = less bias)")
    ax.set_title(f"{key}: language bias per query language (multilingual pool)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def cross_matrix(report: Report, row: Row, key: str, metric: str = "map") -> tuple[list[str], np.ndarray]:
    """(query language x candidate language) mean values of a row; the diagonal is the monolingual one."""
    languages, _ = per_language(report, key, "mono", metric)
    matrix = np.full((len(languages), len(languages)), np.nan)
    for i, x in enumerate(languages):
        for j, y in enumerate(languages):
            name = f"mono/{x}" if x == y else f"cross/{x}-{y}"
            matrix[i, j] = row.mean(f"{PREFIX}/{key}/{name}/{metric}")
    return languages, matrix


def plot_heatmaps(report: Report, key: str, path: Path, rows: Sequence[int] | None = None,
                  diff: Sequence[int] | None = None) -> Path | None:
    """Query-language x candidate-language mAP of chosen rows side by side (default: up to 4), or, with
    ``diff=(a, b)``, row b minus row a."""
    plt = _pyplot()
    chosen = list(rows) if rows is not None else list(range(min(4, len(report.rows))))
    if diff is not None:
        a, b = diff
        languages, first = cross_matrix(report, report.rows[a], key)
        _, second = cross_matrix(report, report.rows[b], key)
        panels = [(f"{report.rows[b].label} − {report.rows[a].label}", second - first)]
    else:
        panels = []
        for index in chosen:
            languages, matrix = cross_matrix(report, report.rows[index], key)
            panels.append((report.rows[index].label, matrix))
    if not languages:
        return None
    size = 1.0 + 0.45 * len(languages)
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels) + 1.2, size + 0.6), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], panels):
        image = draw_heatmap(ax, matrix, languages, title, difference=diff is not None, title_size=8, cell_size=6)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{key} mAP: query language x candidate language" + (" (difference)" if diff else ""), fontsize=9)
    return _save(fig, path)


def plot_training_curves(records: Sequence[Mapping[str, Any]], labels: Mapping[str, str], path: Path) -> Path | None:
    """Training loss and the monitored metric against step, one line per run (colour per row label)."""
    with_loss = [r for r in records if r["history"].get("train/loss")]
    if not with_loss:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    colours = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(labels[r["run_id"]] for r in with_loss))}
    shown: set[str] = set()
    monitors = set()
    for record in with_loss:
        label = labels[record["run_id"]]
        loss = sorted(record["history"]["train/loss"].items())
        kwargs = {"color": colours[label], "alpha": 0.8, "label": label if label not in shown else None}
        shown.add(label)
        left.plot([s for s, _ in loss], [v for _, v in loss], **kwargs)
        monitor = record["params"].get("train.monitor", f"{PREFIX}/multi/map")
        monitors.add(monitor)
        values = sorted(record["history"].get(monitor, {}).items())
        if values:
            right.plot([s for s, _ in values], [v for _, v in values], marker="o", color=colours[label], alpha=0.8)
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.set_title("training loss")
    left.legend(fontsize=7)
    right.set_xlabel("step")
    right.set_ylabel(", ".join(sorted(monitors)))
    right.set_title("monitored validation metric")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def write_plots(report: Report, records: Sequence[Mapping[str, Any]], folder: Path,
                heatmap_rows: Sequence[int] | None = None, diff: Sequence[int] | None = None) -> list[Path]:
    """Every figure that applies to this report, in `folder`."""
    params = {r["run_id"]: r["params"] for r in records}
    labels = {run_id: row.label for row in report.rows if row.stage == "trained" for run_id in row.run_ids}
    files: list[Path | None] = []
    for key, kind in report.sets:
        if kind != "lareqa":
            continue
        files.append(plot_alpha(report, params, key, folder / f"{key}_alpha.png"))
        files.append(plot_rank_distance(report, key, folder / f"{key}_rank_distance.png"))
        files.append(plot_heatmaps(report, key, folder / f"{key}_heatmaps.png", heatmap_rows))
        if diff is not None:
            files.append(plot_heatmaps(report, key, folder / f"{key}_heatmap_diff.png", diff=diff))
    files.append(plot_training_curves([r for r in records if r["run_id"] in labels], labels,
                                      folder / "training_curves.png"))
    return [f for f in files if f is not None]
