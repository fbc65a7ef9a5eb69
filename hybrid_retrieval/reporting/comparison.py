"""The cross-run comparison: runs grouped by what they change, mean ± std over seeds, paper-style tables.

Input: plain run records (``tracking.sweep_runs``: tags, params, metric histories), so nothing here touches
MLflow. Rules:

- Runs are grouped by the config values that differ between them, seeds excepted (any param named ``seed`` or
  ending in ``.seed``): runs that differ only by seed form one row, with the mean, the sample standard deviation
  (n − 1) and the number of seeds ``n``. A row is labelled with what differs: ``sampler=mono`` when a config
  group's ``name`` (or ``method``) differs, otherwise ``key=value`` (e.g. ``sampler.mono_ratio=0.25``).
- Each run is read at one step: ``best`` (the step of its best checkpoint, ``best/step``: what it exported) or
  ``last`` (its last validation). With ``before``, each row also gets its step-0 validation (the model before
  retrieval training); step-0 rows that are identical in every column collapse into one, and with
  ``train.evaluate_before=first_job`` the one job that validated step 0 gives the "before training" row.
- Columns per evaluation set (``val/<key>/...``; the main set is keyed by its dataset name): LAReQA sets give
  Mo / Cr / Mul mAP, Mul R@1, R@10, nDCG@10 and rank distance; Tatoeba accuracy@1 both ways over all and over
  the low-resource languages, and low-resource mAP and nDCG@10; MIRACL nDCG@10, R@100, MRR@10.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hybrid_retrieval.config_error import BadValue

PREFIX = "val"
# (column label, <setting>/<metric> under val/<key>/) per kind of evaluation set.
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "lareqa": [("Mo mAP", "mono/map"), ("Cr mAP", "cross/map"), ("Mul mAP", "multi/map"),
               ("Mul R@1", "multi/recall_at_1"), ("Mul R@10", "multi/recall_at_10"),
               ("Mul nDCG@10", "multi/ndcg_at_10"), ("rank distance", "multi/rank_distance"),
               ("Max@R", "multi/max_at_r"), ("own language first", "multi/own_language_first")],
    "tatoeba": [("acc@1", "both/accuracy_at_1"), ("LR acc@1", "low_resource/both/accuracy_at_1"),
                ("LR xx→en acc@1", "low_resource/xx_to_en/accuracy_at_1"), ("LR mAP", "low_resource/both/map"),
                ("LR nDCG@10", "low_resource/both/ndcg_at_10")],
    "miracl": [("nDCG@10", "mono/ndcg_at_10"), ("R@100", "mono/recall_at_100"), ("MRR@10", "mono/mrr_at_10")],
}
KIND = {"xquad_r": "lareqa", "mlqa_r": "lareqa", "tatoeba": "tatoeba", "miracl": "miracl"}
# Settings that have per-language (or per-pair) values, per kind, and the metric a per-language table shows.
PER_LANGUAGE = {"lareqa": [("mono", "map"), ("cross", "map"), ("multi", "map"), ("multi", "rank_distance")],
                "tatoeba": [("xx_to_en", "accuracy_at_1"), ("en_to_xx", "accuracy_at_1")],
                "miracl": [("mono", "ndcg_at_10")]}
IDENTITY_KEYS = ("name", "method")  # a config group's option is named by one of these
# Not a difference between the trained models: seeds (averaged over), bookkeeping, where data is read from.
IGNORED = re.compile(r"(^|\.)seed$|^run_name$|^logger\.|^train\.(resume|evaluate_before|log_batches|"
                     r"checkpoint_every_n_steps|sparse_embeddings)$|\.root$|^hardware\.num_threads$|"
                     r"^trainer\.enable_progress_bar$")


@dataclass
class Row:
    """One line of the table: a group of runs (same config but the seed) read at one step."""

    label: str
    run_ids: list[str]
    seeds: list[str]
    stage: str                                   # "trained" (at `best` or `last`) or "before" (step 0)
    values: dict[str, list[float]] = field(default_factory=dict)  # metric key -> one value per run
    folders: list[str] = field(default_factory=list)  # each run's folder (its output_dir tag), where known
    commits: list[str] = field(default_factory=list)  # each run's code (MLflow's git commit tag), where known

    @property
    def n(self) -> int:
        return len(self.run_ids)

    def mean(self, key: str) -> float:
        values = [v for v in self.values.get(key, []) if math.isfinite(v)]
        return float(np.mean(values)) if values else math.nan

    def std(self, key: str) -> float:
        values = [v for v in self.values.get(key, []) if math.isfinite(v)]
        return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


@dataclass
class Report:
    rows: list[Row]
    sets: list[tuple[str, str]]                  # (key, kind) of each evaluation set, the main one first
    swept: list[str]                             # the config keys that differ between rows
    at: str

    def columns(self) -> list[tuple[str, str, str]]:
        """(set key, column label, metric key) of every column."""
        return [(key, label, f"{PREFIX}/{key}/{name}") for key, kind in self.sets for label, name in COLUMNS[kind]]


def _identity(key: str, all_keys: set[str]) -> str | None:
    """The key naming the option of `key`'s top-level config group (``sampler.name`` for ``sampler.mono_ratio``,
    ``adapt.method`` for ``adapt.text.source``), if the group has one."""
    group = key.split(".", 1)[0]
    return next((f"{group}.{name}" for name in IDENTITY_KEYS if f"{group}.{name}" in all_keys), None)


def swept_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Config keys whose value differs between the runs (seeds and bookkeeping excepted), in config order."""
    keys: list[str] = []
    for record in records:
        keys += [k for k in record["params"] if k not in keys]
    return [k for k in keys if not IGNORED.search(k)
            and len({r["params"].get(k) for r in records}) > 1]


def group_label(params: Mapping[str, str], swept: Sequence[str],
                records: Sequence[Mapping[str, Any]] = ()) -> str:
    """What sets this run apart: ``group=<option>`` for a config group whose option differs, then ``key=value``
    for every other differing key, except a key of such a group whose value the option already fixes among
    `records` (``sampler=mono`` says what ``sampler.mono_ratio=1.0`` would; ``adapt=none`` has no ``adapt.text``)."""
    all_keys = set(params).union(*(r["params"] for r in records)) if records else set(params)
    parts: list[str] = []
    named: set[str] = set()
    for key in swept:
        identity = _identity(key, all_keys)
        if identity in swept and identity not in named:
            named.add(identity)
            parts.append(f"{identity.split('.', 1)[0]}={params.get(identity, '—')}")
    for key in swept:
        if key in named:
            continue
        identity = _identity(key, all_keys)
        if identity in named:
            same_option = [r["params"] for r in records if r["params"].get(identity) == params.get(identity)]
            if len({p.get(key) for p in same_option}) <= 1:
                continue
        parts.append(f"{key}={params.get(key, '—')}")
    return ", ".join(parts) or "(all runs alike)"


def evaluation_sets(params: Mapping[str, str]) -> list[tuple[str, str]]:
    """(key, kind) of the sets a run validated on, the main dataset first."""
    sets = []
    main = params.get("dataset.name")
    if main in KIND:
        sets.append((main, KIND[main]))
    extra = sorted({k.split(".")[1] for k in params if k.startswith("extra_datasets.") and k.endswith(".name")})
    for key in extra:
        name = params.get(f"extra_datasets.{key}.name")
        if name in KIND:
            sets.append((key, KIND[name]))
    return sets


def run_step(record: Mapping[str, Any], at: str) -> int | None:
    """The step a run is read at: its best checkpoint's (``best``) or its last validation (``last``)."""
    history = record["history"]
    steps = sorted({s for k, v in history.items() if k.startswith(f"{PREFIX}/") for s in v})
    if not steps:
        return None
    if at == "best" and "best/step" in history and history["best/step"]:
        best = int(list(history["best/step"].values())[-1])
        if best in steps:
            return best
    return steps[-1]


def values_at(record: Mapping[str, Any], step: int) -> dict[str, float]:
    return {k: v[step] for k, v in record["history"].items() if k.startswith(f"{PREFIX}/") and step in v}


def build_report(records: Sequence[Mapping[str, Any]], at: str = "best", before: bool = False) -> Report:
    """Group `records` (finished training runs) into rows; see the module docstring for the rules."""
    if at not in ("best", "last"):
        raise BadValue(f"report.at={at!r}: expected best or last")
    usable = [r for r in records if r["status"] == "FINISHED" and run_step(r, at) is not None]
    if not usable:
        states = ", ".join(f"{r['name']}: {r['status']}" for r in records) or "none"
        raise BadValue(f"no finished training run with validation metrics to report (runs: {states})")
    swept = swept_keys(usable)
    sets: list[tuple[str, str]] = []
    for record in usable:
        sets += [s for s in evaluation_sets(record["params"]) if s not in sets]
    groups: dict[str, list[Mapping[str, Any]]] = {}
    keys: dict[tuple, str] = {}
    for record in usable:  # grouped by the values themselves; the label only names them
        values = tuple(record["params"].get(k) for k in swept)
        label = keys.setdefault(values, group_label(record["params"], swept, usable))
        groups.setdefault(label, []).append(record)
    if len(keys) != len(groups):
        raise AssertionError(f"two groups of runs got the same label: {sorted(keys.values())}")
    rows: list[Row] = []
    before_rows: list[Row] = []
    # train.evaluate_before=first_job: one job validated the sweep's common starting model
    first_job = all(str(r["params"].get("train.evaluate_before")) == "first_job" for r in usable)
    for label, members in groups.items():
        seeds = [m["params"].get("train.seed", "?") for m in members]
        ids = [m["run_id"] for m in members]
        trained = Row(label, ids, seeds, "trained",
                      folders=[m.get("tags", {}).get("output_dir", "") for m in members],
                      commits=[m.get("tags", {}).get("mlflow.source.git.commit", "") for m in members])
        common_start = first_job or label == "(all runs alike)"
        start = Row("before training" if common_start else f"{label} · before training", [], [], "before")
        for member in members:
            for row, step in ((trained, run_step(member, at)), (start, 0)):
                for key, value in values_at(member, step).items():
                    row.values.setdefault(key, []).append(value)
            if values_at(member, 0):
                start.run_ids.append(member["run_id"])
                start.seeds.append(member["params"].get("train.seed", "?"))
        rows.append(trained)
        if before and start.values:
            before_rows.append(start)
    if before_rows:
        reference = before_rows[0]
        alike = all(set(r.values) == set(reference.values)
                    and all(np.allclose(r.values[k], reference.values[k][:1] * len(r.values[k]), rtol=0, atol=1e-9)
                            for k in r.values) for r in before_rows)
        if alike and len(before_rows) > 1:
            merged = Row("before training", [i for r in before_rows for i in r.run_ids],
                         [s for r in before_rows for s in r.seeds], "before")
            merged.values = {k: [v for r in before_rows for v in r.values[k]] for k in reference.values}
            before_rows = [merged]
    return Report(before_rows + rows, sets, swept, at)


def _cell(row: Row, key: str, std: bool = True) -> str:
    mean = row.mean(key)
    if not math.isfinite(mean):
        return "—"
    digits = 1 if key.endswith(("rank_distance", "max_at_r")) else 3
    text = f"{mean:.{digits}f}"
    spread = row.std(key)
    if std and math.isfinite(spread) and (row.stage == "trained" or spread > 0):
        text += f" ± {spread:.{digits}f}"
    return text


def markdown(report: Report) -> str:
    """The main table (one block per evaluation set) and the per-language mAP tables, as Markdown."""
    lines: list[str] = []
    for key, kind in report.sets:
        columns = [(label, f"{PREFIX}/{key}/{name}") for label, name in COLUMNS[kind]]
        lines += [f"**{key}** (read at the {report.at} step; mean ± std over seeds)", "",
                  "| run | n | " + " | ".join(label for label, _ in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for row in report.rows:
            lines.append(f"| {row.label} | {row.n} | " + " | ".join(_cell(row, k) for _, k in columns) + " |")
        lines.append("")
    return "\n".join(lines)


def per_language(report: Report, key: str, setting: str, metric: str) -> tuple[list[str], list[list[float]]]:
    """Groups (languages or pairs) and, per row, the mean value of `setting`/`metric` for each."""
    pattern = re.compile(rf"^{PREFIX}/{re.escape(key)}/{re.escape(setting)}/([^/]+)/{re.escape(metric)}$")
    groups = sorted({m.group(1) for row in report.rows for k in row.values if (m := pattern.match(k))})
    return groups, [[row.mean(f"{PREFIX}/{key}/{setting}/{g}/{metric}") for g in groups] for row in report.rows]


def per_language_markdown(report: Report) -> str:
    lines: list[str] = []
    for key, kind in report.sets:
        for setting, metric in PER_LANGUAGE[kind]:
            if setting == "cross":
                continue  # pairs: CSV only (too wide for a page)
            groups, values = per_language(report, key, setting, metric)
            if not groups:
                continue
            digits = 1 if metric in ("rank_distance", "max_at_r") else 3
            lines += [f"**{key} {setting} {metric}** per language", "",
                      "| run | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
            for row, row_values in zip(report.rows, values):
                lines.append(f"| {row.label} | " + " | ".join(
                    f"{v:.{digits}f}" if math.isfinite(v) else "—" for v in row_values) + " |")
            lines.append("")
    return "\n".join(lines)


def write_tables(report: Report, folder: Path) -> list[Path]:
    """``report.md``, ``report.csv`` (mean, std, n per column), ``per_seed.csv`` (each run's values) and
    ``per_language/<set>_<setting>_<metric>.csv``."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    md = folder / "report.md"
    md.write_text(markdown(report) + "\n" + per_language_markdown(report))
    files.append(md)
    path = folder / "report.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "stage", "n", "seeds", "run_ids"]
                        + [f"{key}:{label}:{stat}" for key, label, _ in report.columns() for stat in ("mean", "std")])
        for row in report.rows:
            cells: list[Any] = [row.label, row.stage, row.n, " ".join(row.seeds), " ".join(row.run_ids)]
            for _, _, metric in report.columns():
                cells += [_number(row.mean(metric)), _number(row.std(metric))]
            writer.writerow(cells)
    files.append(path)
    path = folder / "per_seed.csv"  # every run's own values: what the means, stds and tests are computed from
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "stage", "seed", "run_id", "commit", "folder"]
                        + [f"{key}:{label}" for key, label, _ in report.columns()])
        for row in report.rows:
            for i, run_id in enumerate(row.run_ids):
                cells = [row.label, row.stage, row.seeds[i] if i < len(row.seeds) else "", run_id,
                         row.commits[i] if i < len(row.commits) else "",
                         row.folders[i] if i < len(row.folders) else ""]
                for _, _, metric in report.columns():
                    values = row.values.get(metric, [])
                    cells.append(_number(values[i]) if i < len(values) else "")
                writer.writerow(cells)
    files.append(path)
    files.append(write_provenance(report, folder))
    for key, kind in report.sets:
        for setting, metric in PER_LANGUAGE[kind]:
            groups, values = per_language(report, key, setting, metric)
            if not groups:
                continue
            path = folder / "per_language" / f"{key}_{setting}_{metric}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["run", *groups])
                for row, row_values in zip(report.rows, values):
                    writer.writerow([row.label, *(_number(v) for v in row_values)])
            files.append(path)
    return files


def write_provenance(report: Report, folder: Path) -> Path:
    """``provenance.json``: the commits the runs were trained at, the command that made the report and the machine
    it ran on (a sweep's own report runs where the sweep trained)."""
    import json
    import platform
    import subprocess
    import sys

    from hybrid_retrieval.hardware import cpu_description

    commits = sorted({c for row in report.rows for c in row.commits if c})
    try:
        report_commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                       timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        report_commit = ""
    program = Path(sys.argv[0])  # `python -m hybrid_retrieval.report` runs the module's file
    program_name = f"-m hybrid_retrieval.{program.stem}" if program.parent.name == "hybrid_retrieval" else program.name
    record = {"run_commits": commits, "report_commit": report_commit,
              "command": " ".join(["python", program_name, *sys.argv[1:]]), "cpu": cpu_description(),
              "python": platform.python_version(), "at": report.at,
              "runs": sum(row.n for row in report.rows if row.stage == "trained")}
    path = folder / "provenance.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def _number(value: float) -> str:
    return "" if not math.isfinite(value) else f"{value:.6g}"
