"""Make a report from the MLflow store (tables, per-language tables, plots), log it to the sweep's parent run, and
print it at the end of every sweep (a Hydra callback)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback

from hybrid_retrieval import tracking
from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.reporting.claims import claims_markdown
from hybrid_retrieval.reporting.plots import write_plots
from hybrid_retrieval.reporting.comparison import Report, build_report, markdown, write_tables
from hybrid_retrieval.run_folder import RUN_INFO, read_run_info

log = logging.getLogger(__name__)
ARTIFACT_PATH = "report"


@dataclass
class MadeReport:
    report: Report
    files: list[Path]
    folder: Path
    parent_run_id: str
    records: list[dict[str, Any]]
    claims: str | None = None    # claims.md's table, when the report compares mono, cross and hybrid


def make_report(tracking_uri: str, experiment_name: str, out: str | Path | None = None,
                sweep: str | Sequence[str] | None = None,
                runs: Sequence[str] | None = None, all_runs: bool = False, at: str = "best", before: bool = False,
                heatmap_rows: Sequence[int] | None = None, diff: Sequence[int] | None = None) -> MadeReport:
    """Read the runs (see ``tracking.sweep_runs`` for the sources), write tables and plots into ``out`` (default:
    ``<sweep folder>/report``), and log them to the sweep's parent run under ``report/``."""
    records, parent = tracking.sweep_runs(tracking_uri, experiment_name, sweep=sweep, run_ids=runs,
                                          all_runs=all_runs)
    report = build_report(records, at=at, before=before)
    for index in [*(heatmap_rows or []), *(diff or [])]:
        if not -len(report.rows) <= int(index) < len(report.rows):
            raise BadValue(f"report row {index}: the report has rows 0..{len(report.rows) - 1}")
    if out is None:
        if not parent:
            raise BadValue("report.out: set an output folder when the report is not of one sweep")
        out = Path(parent["sweep_id"]) / ARTIFACT_PATH
    folder = Path(out)
    files = write_tables(report, folder)
    claims = claims_markdown(report)
    if claims:  # a mono / cross / hybrid comparison: the paper's claims in standard errors
        (folder / "claims.md").write_text(claims)
        files.append(folder / "claims.md")
    files += write_plots(report, records, folder, heatmap_rows, diff)
    (folder / "runs.json").write_text(json.dumps(
        [{"run_id": r["run_id"], "name": r["name"], "status": r["status"]} for r in records], indent=2) + "\n")
    if parent:
        tracking.log_artifacts_to(tracking_uri, parent["run_id"], folder, ARTIFACT_PATH)
    return MadeReport(report, files, folder, parent.get("run_id", ""), records, claims)


FAILURES = ".failed_jobs.jsonl"  # in a sweep's folder: one line a job that failed (cli.report_failed_job)


def record_failed_job(sweep_dir: str | Path, folder: str | Path, overrides: Sequence[str], error: str) -> None:
    """Note a failed job in its sweep's folder (appended: jobs of a parallel launcher write it too). A job refused
    before it ran (a changed command in a finished job's folder) is noted here, its folder left as it was."""
    import time

    record = {"folder": str(folder), "status": "failed", "overrides": list(overrides), "error": error,
              "ended": time.time()}
    with (Path(sweep_dir) / FAILURES).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def unfinished_jobs(sweep_dir: Path, since: float) -> list[dict[str, Any]]:
    """The jobs of a sweep that failed since ``since`` (a Unix time): folder, overrides and error of each, from the
    sweep folder's record (not the MLflow store: a job can fail before its MLflow run exists)."""
    path = Path(sweep_dir) / FAILURES
    if not path.is_file():
        return []
    jobs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted((job for job in jobs if job["ended"] >= since), key=lambda job: job["folder"])


def rerun_command(sweep_dir: Path) -> str:
    """This sweep's command with ``train.resume=auto`` and its folder fixed: it runs the jobs that did not finish
    and skips the finished ones."""
    command = tracking.command_line()
    for key, value in (("train.resume", "auto"), ("hydra.sweep.dir", str(sweep_dir))):
        if f" {key}=" in command:
            command = " ".join(f"{key}={value}" if part.startswith(f"{key}=") else part for part in command.split(" "))
        else:
            command += f" {key}={value}"
    return command


def unfinished_markdown(jobs: Sequence[dict[str, Any]], command: str) -> str:
    lines = ["## Jobs that did not finish", "",
             f"Not in the tables above. `{command}` runs them again (finished jobs are skipped).", "",
             "| job folder | status | overrides | error |", "|---|---|---|---|"]
    for job in jobs:
        error = " ".join(str(job["error"]).split()).replace("|", "\\|")
        lines.append(f"| {Path(job['folder']).name} | {job['status']} | {' '.join(job['overrides'])} | {error} |")
    return "\n".join(lines) + "\n"


def failed_jobs(records: Sequence[dict[str, Any]]) -> list[str]:
    return [f"{r['name']} ({r['status']}{': ' + r['tags']['error'] if r['tags'].get('error') else ''})"
            for r in records if r["status"] != "FINISHED"]


def print_report(made: MadeReport, tracking_uri: str) -> None:
    print("\n" + markdown(made.report))
    if made.claims:
        print(made.claims)
    for line in failed_jobs(made.records):
        print(f"not in the table: {line}")
    print(f"report:    {made.folder} (report.md, report.csv, per_language/, PNG plots"
          f"{', claims.md' if made.claims else ''})")
    if made.parent_run_id:
        print(f"MLflow:    parent run {made.parent_run_id}, artifacts {ARTIFACT_PATH}/")
    print(f"MLflow UI: {tracking.ui_command(tracking_uri)}")


def sweep_tracking(sweep_dir: Path) -> tuple[str, str] | None:
    """(tracking URI, experiment name) that a sweep's jobs wrote to, from their run folders."""
    for info in sorted(sweep_dir.glob(f"*/{RUN_INFO}")):
        data = read_run_info(info.parent)
        if data.get("tracking_uri"):
            return data["tracking_uri"], data.get("experiment_name", "hybrid_retrieval")
    return None


class SweepReport(Callback):
    """At the end of a multirun: the report of that sweep, printed and logged to its parent run, and the jobs that
    did not finish. A failing job does not stop the others (``cli.hydra_main`` ends it with its error block, the
    next job starts); here the sweep lists it in ``report/report.md`` and ``report/unfinished_jobs.json``, prints
    the command that reruns only it, and exits with status 1. A report that cannot be made (every job failed, say)
    is a warning; ``enabled: false`` turns the report off, not the failure check."""

    def __init__(self, enabled: bool = True, at: str = "best", before: bool = True) -> None:
        self.enabled, self.at, self.before = enabled, at, before
        self.started = 0.0

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        import time

        self.started = time.time()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        unfinished = unfinished_jobs(sweep_dir, self.started)
        command = rerun_command(sweep_dir)
        if self.enabled:
            self.report(sweep_dir, unfinished, command)
        if unfinished:
            for job in unfinished:
                print(f"job {Path(job['folder']).name} {job['status']}: {' '.join(job['overrides'])}: {job['error']}")
            print(f"{len(unfinished)} job(s) of this sweep did not finish; the others' results are kept. "
                  f"To run only those again: {command}")
            raise SystemExit(1)

    def report(self, sweep_dir: Path, unfinished: list[dict[str, Any]], command: str) -> None:
        found = sweep_tracking(sweep_dir)
        made = None
        if found is None:
            log.warning("no report: no job of %s started an MLflow run", sweep_dir)
        else:
            tracking_uri, experiment = found
            try:
                made = make_report(tracking_uri, experiment, sweep=str(sweep_dir), at=self.at, before=self.before)
            except Exception as error:  # noqa: BLE001 - a report must not fail the sweep it describes
                log.warning("no report for %s: %s", sweep_dir, error)
        folder = made.folder if made is not None else sweep_dir / ARTIFACT_PATH
        folder.mkdir(parents=True, exist_ok=True)
        listed = folder / "unfinished_jobs.json"
        listed.write_text(json.dumps({"rerun": command, "jobs": unfinished}, indent=1) + "\n")
        if unfinished:
            with (folder / "report.md").open("a") as handle:
                handle.write("\n" + unfinished_markdown(unfinished, command))
        if made is not None:
            if made.parent_run_id and unfinished:  # make_report logged the folder before the list was added
                tracking.log_artifacts_to(found[0], made.parent_run_id, folder, ARTIFACT_PATH)
            print_report(made, found[0])
