"""The report (tables, plots, the sweep-end print) and the MLflow UI, opened in headless Chromium, on one tiny sweep.

The sweep: sampler=mono,cross x train.seed=1,2 on the tiny model, 2 steps each. The report's numbers are checked
against MLflow's own metric histories with numpy; the UI test starts ``mlflow server`` on a loopback port, opens
the experiment page and a run's pages as a person does, and stops the server by its process id.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from hybrid_retrieval.reporting.comparison import build_report, group_label, markdown, swept_keys
from tests.test_cli import REPO_ROOT, SMALL_TRAIN, artifact_paths, mlflow_client, run_command

SCREENSHOTS_ENV = "HYBRID_RETRIEVAL_SCREENSHOTS"  # a folder to keep the UI screenshots in (docs/reports.md shows them)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict:
    folder = tmp_path_factory.mktemp("report_sweep")
    uri = f"sqlite:///{folder}/mlflow.db"
    small = [arg for arg in SMALL_TRAIN if not arg.startswith("trainer.limit_train_batches")]
    proc = run_command(["run.py", "-m", "sampler=mono,cross", "train.seed=1,2", "trainer.max_steps=2", *small,
                        f"logger.tracking_uri={uri}", f"hydra.sweep.dir={folder / 'sweep'}"], data_root, REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"folder": folder, "uri": uri, "stdout": proc.stdout, "sweep_dir": folder / "sweep"}


def _train_runs(client) -> list:
    experiment = client.get_experiment_by_name("hybrid_retrieval")
    return [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("job") == "train"]


def _value_at_best(client, run, key: str) -> float:
    best = int(run.data.metrics["best/step"])
    return next(m.value for m in client.get_metric_history(run.info.run_id, key) if m.step == best)


@pytest.mark.slow
def test_sweep_end_prints_and_logs_the_report_with_mean_and_std_over_seeds(sweep: dict) -> None:
    client = mlflow_client(sweep["uri"])
    runs = _train_runs(client)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    # Readable names and descriptions: what the run is, and the command that reruns it alone.
    for run in runs:
        sampler, seed = run.data.tags["sampler"], run.data.tags["seed"]
        assert run.info.run_name.startswith(f"tiny {sampler} α=")
        assert f"sampler={sampler}" in run.info.run_name and f"train.seed={seed}" in run.info.run_name
        note = run.data.tags["mlflow.note.content"]
        assert f"python run.py sampler={sampler} train.seed={seed}" in note and "Model: `" in note
    experiment = client.get_experiment_by_name("hybrid_retrieval")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == (sweep["folder"] / "artifacts").resolve().as_uri()  # beside the store

    # The table printed at the sweep's end, and the same files in the sweep folder.
    assert "| sampler=mono | 2 |" in sweep["stdout"] and "| sampler=cross | 2 |" in sweep["stdout"]
    folder = sweep["sweep_dir"] / "report"
    rows = {row["run"]: row for row in csv.DictReader((folder / "report.csv").open())}
    assert set(rows) == {"before training", "sampler=mono", "sampler=cross"}
    for sampler in ("mono", "cross"):
        members = [r for r in runs if r.data.tags["sampler"] == sampler]
        for column, key in (("Mul mAP", "val/xquad_r/multi/map"), ("rank distance", "val/xquad_r/multi/rank_distance"),
                            ("Mo mAP", "val/xquad_r/mono/map")):
            values = [_value_at_best(client, r, key) for r in members]
            row = rows[f"sampler={sampler}"]
            assert float(row[f"xquad_r:{column}:mean"]) == pytest.approx(np.mean(values), rel=1e-5)
            assert float(row[f"xquad_r:{column}:std"]) == pytest.approx(np.std(values, ddof=1), rel=1e-4, abs=1e-9)
        assert rows[f"sampler={sampler}"]["n"] == "2"
    # per_seed.csv: each run's own values, the ones the means above average
    per_seed = [r for r in csv.DictReader((folder / "per_seed.csv").open()) if r["stage"] == "trained"]
    assert {r["run_id"] for r in per_seed} == {r.info.run_id for r in runs}
    for entry in per_seed:
        run = next(r for r in runs if r.info.run_id == entry["run_id"])
        assert float(entry["xquad_r:Mul mAP"]) == pytest.approx(
            _value_at_best(client, run, "val/xquad_r/multi/map"), rel=1e-5)
        assert Path(entry["folder"]).is_dir() and entry["seed"] == run.data.tags["seed"]
        assert entry["commit"] == run.data.tags.get("mlflow.source.git.commit", "")
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["runs"] == len(runs) and "run.py" in provenance["command"] and "cores" in provenance["cpu"]
    # Step 0 is the same model in every job: one row.
    zero_shot = [next(m.value for m in client.get_metric_history(r.info.run_id, "val/xquad_r/multi/map") if m.step == 0)
                 for r in runs]
    assert float(rows["before training"]["xquad_r:Mul mAP:mean"]) == pytest.approx(zero_shot[0], rel=1e-6)

    per_language = list(csv.DictReader((folder / "per_language" / "xquad_r_multi_rank_distance.csv").open()))
    assert {"en", "de", "el"} <= set(per_language[0]) and len(per_language) == 3
    for name in ("report.md", "xquad_r_heatmaps.png", "xquad_r_rank_distance.png", "xquad_r_alpha.png",
                 "training_curves.png"):
        assert (folder / name).stat().st_size > 0, name
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("sweep_parent"))
    assert {"report/report.md", "report/report.csv", "report/xquad_r_heatmaps.png",
            "report/per_language/xquad_r_mono_map.csv"} <= artifact_paths(client, parent.info.run_id)


@pytest.mark.slow
def test_report_command_on_chosen_runs_and_its_bad_input(sweep: dict, data_root: Path, tmp_path: Path) -> None:
    client = mlflow_client(sweep["uri"])
    mono = [r.info.run_id for r in _train_runs(client) if r.data.tags["sampler"] == "mono"]
    out = tmp_path / "report"
    proc = run_command(["-m", "hybrid_retrieval.report", f"runs=[{','.join(mono)}]", "at=last", "before=false",
                        f"output={out}", f"logger.tracking_uri={sweep['uri']}", "diff=[0,0]"], data_root, REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [row["run"] for row in rows] == ["(all runs alike)"] and rows[0]["n"] == "2"  # differ only by seed
    assert (out / "xquad_r_heatmap_diff.png").is_file()

    # Several sweeps make one report (here the same sweep named by its folder and by its parent run: once).
    experiment = client.get_experiment_by_name("hybrid_retrieval")
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.sweep_parent = 'true'")[0]
    out = tmp_path / "combined"
    proc = run_command(["-m", "hybrid_retrieval.report", f"sweep=[{sweep['sweep_dir']},{parent.info.run_id}]",
                        f"output={out}", f"logger.tracking_uri={sweep['uri']}"], data_root, REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["run"]: row["n"] for row in csv.DictReader((out / "report.csv").open())}
    assert {rows["sampler=mono"], rows["sampler=cross"]} == {"2"}

    for args, named in ((["at=worst"], "at="), ([f"sweep={tmp_path}/nowhere"], "report.sweep="),
                        (["sweep=x", "runs=[y]"], "choose one source"), (["diff=[0]"], "diff=")):
        proc = run_command(["-m", "hybrid_retrieval.report", *args, f"logger.tracking_uri={sweep['uri']}",
                            f"output={tmp_path / 'bad'}"], data_root, REPO_ROOT)
        assert proc.returncode != 0 and named in proc.stderr, (args, proc.stderr[-2000:])
    proc = run_command(["-m", "hybrid_retrieval.report", "sweep=[a,b]", f"logger.tracking_uri={sweep['uri']}"],
                       data_root, REPO_ROOT)
    assert proc.returncode != 0 and "set out" in proc.stderr, proc.stderr[-2000:]


def test_rows_are_grouped_by_what_differs_and_labelled_by_option_name() -> None:
    def record(run_id: str, sampler: str, ratio: str, seed: str, value: float) -> dict:
        return {"run_id": run_id, "name": run_id, "status": "FINISHED", "tags": {},
                "params": {"sampler.name": sampler, "sampler.mono_ratio": ratio, "train.seed": seed,
                           "adapt.seed": seed, "dataset.name": "xquad_r", "train.lr": "5e-05"},
                "history": {"val/xquad_r/multi/map": {0: 0.5, 3: value}, "best/step": {3: 3.0}}}

    records = [record("a", "mono", "1.0", "1", 0.6), record("b", "mono", "1.0", "2", 0.7),
               record("c", "hybrid", "0.25", "1", 0.8), record("d", "hybrid", "0.75", "1", 0.9),
               {**record("e", "cross", "0.0", "1", 0.1), "status": "FAILED"}]
    assert swept_keys(records[:4]) == ["sampler.name", "sampler.mono_ratio"]  # seeds are not swept options
    assert group_label(records[2]["params"], ["sampler.mono_ratio"]) == "sampler.mono_ratio=0.25"
    report = build_report(records, before=True)
    labels = [row.label for row in report.rows]
    assert labels == ["before training", "sampler=mono", "sampler=hybrid, sampler.mono_ratio=0.25",
                      "sampler=hybrid, sampler.mono_ratio=0.75"]  # the failed run is left out
    mono = report.rows[1]
    assert mono.mean("val/xquad_r/multi/map") == pytest.approx(0.65)
    assert mono.std("val/xquad_r/multi/map") == pytest.approx(math.sqrt(0.005))  # sample std, n - 1
    assert "0.650 ± 0.071" in markdown(report)
    with pytest.raises(ValueError, match="no finished training run"):
        build_report(records[4:])
    # train.evaluate_before=first_job: only job 0 validated the common start; it is the one before row.
    first_job = [{**r, "params": {**r["params"], "train.evaluate_before": "first_job"}} for r in records[:4]]
    for r in first_job[1:]:
        r["history"] = {"val/xquad_r/multi/map": {3: r["history"]["val/xquad_r/multi/map"][3]},
                        "best/step": {3: 3.0}}
    rows = build_report(first_job, before=True).rows
    assert [row.label for row in rows][:2] == ["before training", "sampler=mono"]
    assert rows[0].run_ids == ["a"] and rows[0].n == 1 and len(rows) == 4


# --------------------------------------------------------------------------------------------------- the UI


REQUIRE_BROWSER_ENV = "HYBRID_RETRIEVAL_REQUIRE_BROWSER"  # set (CI does): a missing browser fails instead of skipping


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """Paths of the Chromium binary and its driver; the UI test skips without them, unless CI requires them."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        reason = ("the MLflow UI test needs Chromium and its driver: apt-get install chromium chromium-driver "
                  "(scripts/test installs them where it can)")
        if os.environ.get(REQUIRE_BROWSER_ENV, "") not in ("", "0"):
            pytest.fail(f"{reason}; {REQUIRE_BROWSER_ENV} is set, so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)
    return binary, driver


def _browser(binary: str, driver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,950"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def _close_assistant(browser) -> None:
    """MLflow 3.17 opens its Assistant side panel on the first visit; close it (the UI remembers) so the pages show
    the runs in full width."""
    for button in browser.find_elements("css selector", "button[data-component-id='mlflow.assistant.chat_panel.close']"):
        button.click()
    deadline = time.monotonic() + 10
    while browser.find_elements("css selector", "button[data-component-id='mlflow.assistant.chat_panel.close']"):
        assert time.monotonic() < deadline, "the MLflow Assistant panel did not close"
        time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_text(browser, texts: list[str], timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        body = browser.find_element("tag name", "body").text
        if all(text in body for text in texts):
            return body
        time.sleep(0.5)
    raise AssertionError(f"not on the page after {timeout:.0f} s: {[t for t in texts if t not in body]}\n{body[:3000]}")


@pytest.mark.slow
def test_mlflow_ui_lists_the_runs_and_shows_metrics_and_the_heatmap(chromium: tuple[str, str], sweep: dict,
                                                                   tmp_path: Path) -> None:
    client = mlflow_client(sweep["uri"])
    experiment = client.get_experiment_by_name("hybrid_retrieval")
    runs = _train_runs(client)
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", sweep["uri"],
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    browser = None
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow server did not answer within 120 s"
                time.sleep(0.5)
        browser = _browser(*chromium)
        # The experiment page, in the model-training view (the link every command prints).
        browser.get(f"{base}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning")
        _wait_for_text(browser, ["sweep ", "Run Name"])
        _close_assistant(browser)
        # The jobs are nested under the sweep's parent run: expand it, as a person would.
        expand = browser.find_element("css selector", "button[data-component-id*='runnamecellrenderer']")
        expand.click()
        names = [r.info.run_name for r in runs]
        # MLflow's own columns: Dataset (the training data logged as a dataset input) and Source (the entry point).
        data = {d.dataset.name for d in runs[0].inputs.dataset_inputs if d.tags[0].value == "training"}
        assert data == {"mlqa_r"}
        body = _wait_for_text(browser, [name.split(" · ")[0] for name in names] + ["sampler=mono", "sampler=cross",
                                                                                  "mlqa_r", "run.py"])
        assert sum(body.count(f"train.seed={seed}") for seed in (1, 2)) >= 4, body[:3000]
        assert body.count("mlqa_r") >= 4 and body.count("run.py") >= 4, body[:3000]  # every job's row
        screenshots = [tmp_path / "mlflow_ui_experiment.png"]
        browser.save_screenshot(str(screenshots[-1]))

        run = runs[0]
        browser.get(f"{base}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
                    "?workflowType=machine_learning")
        _wait_for_text(browser, [run.info.run_name.split(" · ")[0], "val/multi/map", "python run.py sampler="])
        screenshots.append(tmp_path / "mlflow_ui_run.png")
        browser.save_screenshot(str(screenshots[-1]))
        browser.get(f"{base}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}/artifacts"
                    "?workflowType=machine_learning")
        _wait_for_text(browser, ["cross_lingual_map.png", "metrics.json"])
        browser.find_element("xpath", "//*[text()='cross_lingual_map.png']").click()
        deadline = time.monotonic() + 30
        while not browser.find_elements("css selector", "img[src*='cross_lingual_map.png'], img[src^='blob:']"):
            assert time.monotonic() < deadline, "the heatmap image was not shown"
            time.sleep(0.5)
        screenshots.append(tmp_path / "mlflow_ui_artifact.png")
        browser.save_screenshot(str(screenshots[-1]))
        if os.environ.get(SCREENSHOTS_ENV):
            target = Path(os.environ[SCREENSHOTS_ENV])
            target.mkdir(parents=True, exist_ok=True)
            for path in screenshots:
                shutil.copy(path, target / path.name)
    finally:
        if browser is not None:
            browser.quit()
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers, by the process id it was started with
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert server.poll() is not None
