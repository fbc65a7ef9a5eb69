"""The selection table: every run under a selection folder (scripts/recipe_selection.sh), read from its
metrics.json, as Markdown. Usage: python scripts/selection_table.py multirun/recipe_select > selection.md"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [("Mo mAP", "mono", "map"), ("Cr mAP", "cross", "map"), ("Mul mAP", "multi", "map"),
           ("Mul nDCG@10", "multi", "ndcg_at_10"), ("rank distance", "multi", "rank_distance"),
           ("Max@R", "multi", "max_at_r"), ("own language first", "multi", "own_language_first")]


def overrides(folder: Path) -> str:
    """The run's command-line overrides (Hydra's .hydra/overrides.yaml), bookkeeping left out."""
    file = folder / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return ""
    lines = [line.removeprefix("- ").strip() for line in file.read_text().splitlines() if line.startswith("- ")]
    options = dict(line.split("=", 1) for line in lines if "=" in line)
    if options.get("merge_with") == "start":  # an evaluation of a WiSE-FT merge (scripts/recipe_selection.sh)
        run = Path(options["checkpoint"]).parent.parent.name
        return f"WiSE-FT of `{run}` with the start, ratio {options['merge_ratio']}"
    return " ".join(f"`{line}`" for line in lines if not line.startswith(("hydra.", "run_name", "experiment=")))


def main(root: str) -> None:
    print("| run | overrides | " + " | ".join(c[0] for c in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for folder in sorted(Path(root).iterdir(), key=lambda p: p.stat().st_mtime):
        metrics = folder / "metrics.json"
        if not metrics.is_file():
            continue
        summary = json.loads(metrics.read_text())["summary"]
        cells = []
        for _, setting, metric in COLUMNS:
            value = summary.get(setting, {}).get(metric)
            cells.append("" if value is None else f"{value:.1f}" if metric in ("rank_distance", "max_at_r")
                         else f"{value:.3f}")
        print(f"| {folder.name} | {overrides(folder)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "multirun/recipe_select")
