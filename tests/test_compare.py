"""experiment=compare: the sampler comparison sweep (one before-training row, a report at the end), and a rerun of
the same command continuing it (train.resume=auto: finished jobs skipped, a changed command refused)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.run_folder import RUN_INFO, RunPlan, finished_job, plan_run
from tests.test_cli import REPO_ROOT, mlflow_client, run_command

TINY = ["model=tiny", "train.seed=42", "trainer.limit_train_batches=2", "train.batch_size=8",
        "dataset.languages=[en,de,el]", "dataset.max_questions_per_language=10",
        "train_data.datasets.0.max_groups=60", "train_data.datasets.0.languages=[en,de,es]",
        "trainer.enable_progress_bar=false"]


def _train_runs(client) -> list:
    experiment = client.get_experiment_by_name("hybrid_retrieval")
    return [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("job") == "train"]


@pytest.mark.slow
def test_the_compare_sweep_runs_on_the_tiny_model_and_a_rerun_continues_it(tmp_path: Path, data_root: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep_dir = tmp_path / "compare"
    command = ["run.py", "-m", "experiment=compare", *TINY, f"logger.tracking_uri={uri}",
               f"hydra.sweep.dir={sweep_dir}"]
    proc = run_command(command, data_root, REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = mlflow_client(uri)
    runs = _train_runs(client)
    assert sorted(r.data.tags["sampler"] for r in runs) == ["cross", "hybrid", "mono"]  # the config's sweep, 1 seed
    assert all(r.info.status == "FINISHED" for r in runs)
    # Only job 0 validated the starting model; every job validated its fine-tuned model at step 2.
    with_step0 = [r for r in runs
                  if 0 in {m.step for m in client.get_metric_history(r.info.run_id, "val/multi/map")}]
    assert [r.data.tags["job_num"] for r in with_step0] == ["0"]
    for run in runs:
        assert 2 in {m.step for m in client.get_metric_history(run.info.run_id, "val/multi/map")}
    table = (sweep_dir / "report" / "report.md").read_text()
    for label in ("before training", "sampler=mono", "sampler=cross", "sampler=hybrid"):
        assert f"| {label} |" in table, (label, table)
    assert "sampler=mono · before training" not in table
    finished = {p.name: json.loads((p / RUN_INFO).read_text())["best"] for p in sweep_dir.iterdir()
                if (p / RUN_INFO).is_file()}
    assert sorted(finished) == ["0", "1", "2"]

    # The same command again: nothing is trained twice, the report is made again from the same runs.
    report_time = (sweep_dir / "report" / "report.md").stat().st_mtime
    first_report = (sweep_dir / "report" / "report.md").read_text()
    again = run_command(command, data_root, REPO_ROOT)
    assert again.returncode == 0, again.stderr[-4000:]
    output = again.stdout + again.stderr
    assert output.count("this job finished before") == 3, output[-3000:]
    assert sorted(r.info.run_id for r in _train_runs(client)) == sorted(r.info.run_id for r in runs)
    assert (sweep_dir / "report" / "report.md").stat().st_mtime > report_time
    assert (sweep_dir / "report" / "report.md").read_text() == first_report

    # A changed command in the same folder is refused, naming what differs; the finished runs stay as they were.
    changed = run_command([*command, "train.lr=0.001"], data_root, REPO_ROOT)
    assert changed.returncode != 0
    output = changed.stdout + changed.stderr
    assert "train.resume" in output and "train.lr" in output, output[-3000:]
    assert {r.info.run_id: r.info.status for r in _train_runs(client)} == {r.info.run_id: "FINISHED" for r in runs}
    assert {p.name: json.loads((p / RUN_INFO).read_text())["best"] for p in sweep_dir.iterdir()
            if (p / RUN_INFO).is_file()} == finished


def write_checkpoint(path: Path, model_name: str, format_version: int = 1, **meta) -> Path:
    """A checkpoint file as run.py writes it, as far as a resume checks it (format, model, encoder weights)."""
    import torch

    torch.save({"hybrid_retrieval": {"format": format_version, "model": {"name": model_name, "source": "random"},
                                     **meta},
                "state_dict": {"encoder.weight": torch.zeros(4)}, "global_step": 3}, path)
    return path


def _compose(*overrides: str):
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["experiment=compare", "model=tiny", *overrides])


def test_resume_auto_starts_fresh_resumes_a_stopped_job_and_skips_a_finished_one(tmp_path: Path,
                                                                                monkeypatch) -> None:
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)  # outside a Hydra job, a job's folder is the working directory
    cfg = _compose()
    assert cfg.train.resume == "auto" and cfg.train.evaluate_before == "first_job"
    assert plan_run(cfg) == RunPlan(tmp_path) and finished_job(cfg) is None  # an empty folder: a fresh start
    (tmp_path / "checkpoints").mkdir()
    write_checkpoint(tmp_path / "checkpoints" / "last.ckpt", cfg.model.name)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(_compose("train.lr=0.001")))
    info = {"mlflow_run_id": "r", "config": OmegaConf.to_container(cfg, resolve=False)}
    (tmp_path / RUN_INFO).write_text(json.dumps(info))
    # The run's starting config (run_info.json) decides, not .hydra/config.yaml (rewritten by every rerun).
    assert plan_run(cfg) == RunPlan(tmp_path, resumed=True, run_id="r")
    assert plan_run(cfg).last_checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    assert finished_job(cfg) is None  # no status.json: stopped, not finished
    (tmp_path / "status.json").write_text(json.dumps({"status": "killed"}))
    assert finished_job(cfg) is None
    (tmp_path / "status.json").write_text(json.dumps({"status": "finished"}))
    (tmp_path / RUN_INFO).write_text(json.dumps({**info, "monitor": "val/multi/map", "best": 0.25}))
    assert finished_job(cfg) == 0.25
    with pytest.raises(ConfigError, match=r"train\.resume.*train\.lr"):
        finished_job(_compose("train.lr=0.001"))
    with pytest.raises(ConfigError, match=r"train\.resume.*train\.seed"):
        plan_run(_compose("train.seed=7"))


def test_a_damaged_foreign_or_newer_last_checkpoint_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)
    cfg = _compose()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (tmp_path / RUN_INFO).write_text(json.dumps({"mlflow_run_id": "r", "config": OmegaConf.to_container(cfg)}))
    last = write_checkpoint(tmp_path / "checkpoints" / "last.ckpt", cfg.model.name)
    assert plan_run(cfg).resumed
    whole = last.read_bytes()
    last.write_bytes(whole[: len(whole) // 2])  # truncated, as by a full disk
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"train\.resume: .*last\.ckpt is damaged.*best\.ckpt.*start afresh"):
        plan_run(cfg)
    import io
    import struct
    import zipfile

    with zipfile.ZipFile(io.BytesIO(whole)) as archive:  # one flipped byte inside the weights (the stored tensor's data)
        entry = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    name_length, extra_length = struct.unpack("<HH", whole[entry.header_offset + 26:entry.header_offset + 30])
    corrupt = bytearray(whole)
    corrupt[entry.header_offset + 30 + name_length + extra_length] ^= 0xFF
    last.write_bytes(bytes(corrupt))
    with pytest.raises(ConfigError, match=r"last\.ckpt is damaged"):
        plan_run(cfg)
    write_checkpoint(last, "labse")
    with pytest.raises(ConfigError, match=r"holds a 'labse' model, this run trains 'tiny'"):
        plan_run(cfg)
    write_checkpoint(last, cfg.model.name, format_version=2)
    with pytest.raises(ConfigError, match=r"format=2 is not supported"):
        plan_run(cfg)
    last.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigError):
        plan_run(cfg)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing was written


def test_a_second_process_is_refused_a_folder_in_use_until_its_holder_dies(tmp_path: Path, monkeypatch) -> None:
    import socket
    import subprocess
    import sys

    from hybrid_retrieval import run_folder

    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from hybrid_retrieval.run_folder import lock_run_folder; "
         f"lock_run_folder(Path({str(folder)!r})); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.chdir(folder)
        with pytest.raises(ConfigError, match=rf"run folder .* is in use by pid {holder.pid} on host "
                                               rf"{socket.gethostname()} since .*resume again"):
            plan_run(_compose())
        # a DDP rank > 0 runs in its rank 0's folder: it takes no lock
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert run_folder.lock_run_folder(folder) == folder
        monkeypatch.delenv("LOCAL_RANK")
    finally:
        holder.kill()
        holder.wait()
    assert plan_run(_compose()) == RunPlan(folder)  # the dead holder kept nothing
    assert f"pid {__import__('os').getpid()} " in (folder / run_folder.LOCK_FILE).read_text()
    assert plan_run(_compose()) == RunPlan(folder)  # this process holds it already


def test_evaluate_before_takes_true_false_or_first_job() -> None:
    from hybrid_retrieval.training.config import check_train_config

    with pytest.raises(ConfigError, match=r"train\.evaluate_before.*first_job"):
        check_train_config(_compose("train.evaluate_before=sometimes"))
