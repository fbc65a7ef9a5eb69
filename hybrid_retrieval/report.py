"""The comparison table from the command line: ``python -m hybrid_retrieval.report [sweep=...] [runs=[...]]``.

Reads finished training runs from the MLflow store (``hybrid_retrieval.reporting``), prints the Markdown table,
writes ``report.md``, ``report.csv``, ``per_language/*.csv`` and the plots, and logs them to the sweep's parent
run. Options: conf/report.yaml.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from hybrid_retrieval import tracking
from hybrid_retrieval.cli import hydra_main
from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.reporting.sweep import make_report, print_report


def check_report_config(cfg: DictConfig) -> None:
    sources = [name for name in ("sweep", "runs") if cfg.get(name)] + (["all_runs"] if cfg.all_runs else [])
    if len(sources) > 1:
        raise BadValue(f"{' and '.join(sources)}: choose one source of runs (sweep, runs or all_runs)")
    if OmegaConf.is_list(cfg.get("sweep")) and not cfg.get("output"):
        raise BadValue(f"sweep={list(cfg.sweep)}: several sweeps make one report; set output=<folder> for it")
    if cfg.at not in ("best", "last"):
        raise BadValue(f"at={cfg.at!r}: expected best or last")
    for name in ("heatmap_rows", "diff"):
        value = cfg.get(name)
        if value is not None and (not OmegaConf.is_list(value) or not all(isinstance(v, int) for v in value)):
            raise BadValue(f"{name}={value!r}: expected a list of row numbers, e.g. [0, 1]")
    if cfg.get("diff") is not None and len(cfg.diff) != 2:
        raise BadValue(f"diff={list(cfg.diff)!r}: expected two row numbers [a, b] (b minus a)")
    tracking.check_tracking_uri(cfg.logger.tracking_uri)


@hydra_main("report")
def main(cfg: DictConfig) -> None:
    check_report_config(cfg)
    out = cfg.output
    if out is None and (cfg.runs or cfg.all_runs):
        out = tracking.job_context()["output_dir"]
    sweep = list(cfg.sweep) if OmegaConf.is_list(cfg.sweep) else cfg.sweep
    made = make_report(cfg.logger.tracking_uri, cfg.logger.experiment_name, out=out, sweep=sweep,
                       runs=list(cfg.runs) if cfg.runs else None, all_runs=bool(cfg.all_runs), at=cfg.at,
                       before=bool(cfg.before), heatmap_rows=list(cfg.heatmap_rows) if cfg.heatmap_rows else None,
                       diff=list(cfg.diff) if cfg.diff else None)
    print_report(made, cfg.logger.tracking_uri)


if __name__ == "__main__":
    main()
