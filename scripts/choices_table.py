"""The recipe's remaining choices on the selection split, each against the base run of the same commit, with paired
tests over the held-out queries (reporting/significance.py). Reads ``<root>/<name>/metrics.json`` and
``per_query.npz`` of the runs that scripts/recipe_selection.sh choices trained.

Decision rule: a change is adopted when it raises Mo or Mul mAP with paired p < 0.05 by more than the base's own
spread over training seeds (max - min of ``<base>_s43``, ``<base>_s44`` and the base, when those runs exist), and
lowers none of Mo, Cr, Mul mAP with paired p < 0.05; otherwise the base stays. The paired test covers the query
sample, not the training seed: without the seed spread it calls most one-seed differences significant.

    python scripts/choices_table.py multirun/recipe_select c_base > docs/results/recipe/choices.md
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from hybrid_retrieval.hardware import cpu_description
from hybrid_retrieval.reporting.significance import paired_test

REPO = Path(__file__).resolve().parents[1]

METRICS = [("Mo mAP", "mono", "map"), ("Cr mAP", "cross", "map"), ("Mul mAP", "multi", "map"),
           ("Mul nDCG@10", "multi", "ndcg_at_10"), ("rank distance", "multi", "rank_distance")]
ALPHA = 0.05


def per_query(folder: Path, setting: str, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(folder / "per_query.npz") as data:
        return data[f"{setting}/query"], data[f"{setting}/group"], data[f"{setting}/{metric}"].astype(float)


def compare(base: Path, other: Path) -> dict[str, dict[str, float]]:
    out = {}
    for label, setting, metric in METRICS:
        q0, g0, v0 = per_query(base, setting, metric)
        q1, g1, v1 = per_query(other, setting, metric)
        if not (np.array_equal(q0, q1) and np.array_equal(g0, g1)):
            raise ValueError(f"{other} and {base} were evaluated on different queries")
        result = paired_test(v1, v0, g0, resamples=10_000)
        out[label] = {"difference": result.difference, "p": result.p, "ci": list(result.ci)}
    return out


def adopted(tests: dict[str, dict[str, float]], spread: dict[str, float]) -> bool:
    gains = any(tests[k]["difference"] > max(0.0, spread.get(k, 0.0)) and tests[k]["p"] < ALPHA
                for k in ("Mo mAP", "Mul mAP"))
    losses = any(tests[k]["difference"] < 0 and tests[k]["p"] < ALPHA for k in ("Mo mAP", "Cr mAP", "Mul mAP"))
    return gains and not losses


def main(root: str, base_name: str, prefix: str = "c_") -> None:
    folder = Path(root)
    base = folder / base_name
    runs = sorted((p for p in folder.iterdir() if p.name.startswith(prefix) and (p / "per_query.npz").is_file()),
                  key=lambda p: (p.name != base_name, p.stat().st_mtime))
    seeds = [base] + [p for p in runs if p.name.startswith(f"{base_name}_s")]
    runs = [p for p in runs if p not in seeds[1:]]
    seed_values = [json.loads((p / "metrics.json").read_text())["summary"] for p in seeds]
    spread = {label: max(v[s][m] for v in seed_values) - min(v[s][m] for v in seed_values)
              for label, s, m in METRICS} if len(seeds) > 1 else {}
    # the checkout the runs were trained in (a worktree at a fixed commit)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=folder).stdout.strip()
    record = {"command": f"python scripts/choices_table.py {root} {base_name}", "runs_commit": commit,
              "table_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                             cwd=REPO).stdout.strip(),
              "cpu": cpu_description(), "python": platform.python_version(), "rule": __doc__.split("\n\n")[1],
              "base_seeds": {p.name: v for p, v in zip(seeds, seed_values)}, "seed_spread": spread, "runs": {}}
    print("| run | overrides | " + " | ".join(m[0] for m in METRICS) + " | adopted |")
    print("|---|---|" + "---|" * (len(METRICS) + 1))
    for run in runs:
        summary = json.loads((run / "metrics.json").read_text())["summary"]
        values = {label: summary[setting][metric] for label, setting, metric in METRICS}
        tests = compare(base, run) if run != base else None
        record["runs"][run.name] = {"overrides": overrides(run), "values": values, "against_base": tests,
                                    "passes_paired_test": adopted(tests, {}) if tests else None,
                                    "adopted": adopted(tests, spread) if tests and spread else None}
        cells = []
        for label, _, metric in METRICS:
            digits = 1 if metric == "rank_distance" else 4
            cell = f"{values[label]:.{digits}f}"
            if tests:
                t = tests[label]
                cell += f" ({t['difference']:+.{digits}f}, p {t['p']:.3f})"
            cells.append(cell)
        if tests is None:
            verdict = "base"
        elif not spread:  # without the seed spread the rule cannot adopt anything
            verdict = "passes the paired test; seed spread not measured" if adopted(tests, spread) else "no"
        else:
            verdict = "yes" if adopted(tests, spread) else "no"
        print(f"| {run.name} | {overrides(run)} | " + " | ".join(cells) + f" | {verdict} |")
    print()
    queries = len(per_query(base, "multi", "map")[0])
    if spread:
        print("Seed spread of the base (max - min over " + ", ".join(p.name for p in seeds) + "): " + ", ".join(
            f"{label} {value:.4f}" if label != "rank distance" else f"{label} {value:.1f}"
            for label, value in spread.items()))
        print()
    print(f"Each cell: the value, then (difference to `{base_name}`, paired randomization p over the "
          f"{queries} selection split's queries: 10,000 sign flips; for rank distance a negative difference is less bias). "
          "One training seed per run: the test covers the query sample, not the seed. "
          f"Runs trained at commit {commit}; CPU: {record['cpu']}.")
    out = Path("docs/results/recipe/choices.json")
    out.write_text(json.dumps(record, indent=1) + "\n")


def overrides(folder: Path) -> str:
    file = folder / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return ""
    lines = [line.removeprefix("- ").strip() for line in file.read_text().splitlines() if line.startswith("- ")]
    return " ".join(f"`{line}`" for line in lines
                    if not line.startswith(("hydra.", "run_name", "experiment=", "loss.temperature",
                                            "train_data.datasets.0.hard_negative")))


if __name__ == "__main__":
    main(*sys.argv[1:])
