"""Language-subspace removal results as Markdown and JSON: every evaluation under a folder that
scripts/language_projection.sh wrote, beside the same model without the projection.

    python scripts/projection_table.py multirun/projection_select > docs/results/projection/selection.md
    python scripts/projection_table.py multirun/projection multirun/recipe > docs/results/projection/xquad_r.md

Without a projection the value comes from ``<name>_none`` (select) or, for trained models, the run folder's own
final evaluation under the second folder (``<sampler>_seed<k>/metrics.json``); the zero-shot model's from
``zero_shot_none``. Rank distance: lower is better. The JSON beside the Markdown holds every value, the commit and
the command.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from hybrid_retrieval.hardware import cpu_description

REPO = Path(__file__).resolve().parents[1]

METRICS = [("Mo mAP", "mono", "map"), ("Cr mAP", "cross", "map"), ("Mul mAP", "multi", "map"),
           ("Mul nDCG@10", "multi", "ndcg_at_10"), ("rank distance", "multi", "rank_distance"),
           ("own language first", "multi", "own_language_first")]
NAME = re.compile(r"(?P<model>.+?)_(?P<rank>none|rank\d+)$")


def values(folder: Path) -> dict[str, float] | None:
    file = folder / "metrics.json"
    if not file.is_file():
        return None
    summary = json.loads(file.read_text())["summary"]
    return {label: summary[setting][metric] for label, setting, metric in METRICS}


def main(root: str, runs: str | None = None) -> None:
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for folder in sorted(Path(root).iterdir()):
        match = NAME.match(folder.name)
        found = values(folder)
        if match and found:
            rows.setdefault(match["model"], {})[match["rank"]] = found
    if runs:
        for model in rows:
            if "none" not in rows[model] and values(Path(runs) / model):
                rows[model]["none"] = values(Path(runs) / model)
    record = {"command": " ".join(["python scripts/projection_table.py", *sys.argv[1:]]),
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                       cwd=REPO).stdout.strip(),
              "cpu": cpu_description(), "rows": rows}
    print("| model | projection | " + " | ".join(m[0] for m in METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for model, by_rank in rows.items():
        for rank in sorted(by_rank, key=lambda r: -1 if r == "none" else int(r.removeprefix("rank"))):
            cells = [f"{by_rank[rank][m]:.1f}" if m == "rank distance" else f"{by_rank[rank][m]:.4f}"
                     for m, _, _ in METRICS]
            print(f"| {model} | {'none' if rank == 'none' else 'rank ' + rank.removeprefix('rank')} | "
                  + " | ".join(cells) + " |")
    # trained models over their seeds: <sampler>_seed<k> -> <sampler>, mean and sample std per projection
    import numpy as np

    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    for model, by_rank in rows.items():
        match = re.match(r"(?P<sampler>.+)_seed\d+$", model)
        if match:
            for rank, found in by_rank.items():
                groups.setdefault((match["sampler"], rank), []).append(found)
    if groups:
        record["means"] = {}
        print()
        print("| sampler | projection | seeds | " + " | ".join(m[0] for m in METRICS) + " |")
        print("|---|---|---|" + "---|" * len(METRICS))
        for (sampler, rank), members in sorted(groups.items()):
            stats = {m: (float(np.mean([x[m] for x in members])),
                         float(np.std([x[m] for x in members], ddof=1)) if len(members) > 1 else float("nan"))
                     for m, _, _ in METRICS}
            record["means"][f"{sampler} {rank}"] = {m: {"mean": v[0], "std": v[1], "n": len(members)}
                                                    for m, v in stats.items()}
            digits = {m: 1 if m == "rank distance" else 4 for m, _, _ in METRICS}
            cells = [f"{stats[m][0]:.{digits[m]}f} ± {stats[m][1]:.{digits[m]}f}" for m, _, _ in METRICS]
            label = "none" if rank == "none" else "rank " + rank.removeprefix("rank")
            print(f"| {sampler} | {label} | {len(members)} | " + " | ".join(cells) + " |")
    print()
    print(f"Commit {record['commit'][:7]}; CPU: {record['cpu']}; `{record['command']}`.")
    out = Path(root).name + ".json"
    (REPO / "docs" / "results" / "projection").mkdir(parents=True, exist_ok=True)
    (REPO / "docs" / "results" / "projection" / out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
