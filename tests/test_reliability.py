"""Reliability of training runs: resume after SIGKILL with identical metrics, SIGTERM, NaN loss, a new store shared
by processes that start together, and bad input that fails before any work."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli import REPO_ROOT, SMALL_TRAIN, mlflow_client, run_command

# Every test here starts run.py or other Python processes (kills, resumes, parallel writers): end-to-end.
pytestmark = pytest.mark.slow

# Two epochs of 14 batches (MLQA-R en/de/es, 60 groups, batch 8), a resumable checkpoint every 3 steps.
RESUMABLE = [arg for arg in SMALL_TRAIN if not arg.startswith("trainer.limit_train_batches")] + [
    "trainer.max_epochs=2", "trainer.deterministic=true", "train.checkpoint_every_n_steps=3", "train.log_batches=true",
    # A trainable vocabulary matrix: its row-sparse optimiser state (train.sparse_embeddings) must resume exactly too.
    "train.freeze_embeddings=false"]


def _env(data_root: Path) -> dict[str, str]:
    env = {**os.environ, "HYBRID_RETRIEVAL_DATA": str(data_root), "HYBRID_RETRIEVAL_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("HYBRID_RETRIEVAL_MLFLOW_URI", None)
    return env


def _start(args: list[str], data_root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run.py", *args], cwd=REPO_ROOT, env=_env(data_root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_batches(folder: Path, proc: subprocess.Popen, count: int, timeout: float = 180) -> None:
    log = folder / "batches" / "rank0.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not reach {count} batches (exit status {proc.poll()})")


def _only_run(uri: str) -> Any:
    client = mlflow_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
    return client, run


def _history(uri: str) -> tuple[Any, dict[str, list[tuple[int, float]]]]:
    client, run = _only_run(uri)
    history = {name: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
               for name in run.data.metrics if not name.startswith("time/")}
    return run, history


def test_sigkill_then_resume_logs_every_metric_once_and_ends_like_an_uninterrupted_run(tmp_path: Path,
                                                                                      data_root: Path) -> None:
    straight = _start([*RESUMABLE, f"logger.tracking_uri=sqlite:///{tmp_path}/a.db", f"hydra.run.dir={tmp_path}/a"],
                      data_root)
    killed_dir = tmp_path / "b"
    killed = _start([*RESUMABLE, f"logger.tracking_uri=sqlite:///{tmp_path}/b.db", f"hydra.run.dir={killed_dir}"],
                    data_root)
    kill_at = random.Random().randint(5, 24)  # anywhere inside either epoch
    try:
        _wait_for_batches(killed_dir, killed, kill_at)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
        assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]
    finally:
        straight.kill()
        killed.kill()
    _, run = _only_run(f"sqlite:///{tmp_path}/b.db")
    assert run.info.status == "RUNNING"  # nobody closed it: the resume reopens it
    resumed = run_command(["run.py", *RESUMABLE, f"train.resume={killed_dir}",
                           f"logger.tracking_uri=sqlite:///{tmp_path}/b.db", f"hydra.run.dir={tmp_path}/b2"],
                          data_root, REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    run_a, expected = _history(f"sqlite:///{tmp_path}/a.db")
    run_b, got = _history(f"sqlite:///{tmp_path}/b.db")
    assert run_b.info.status == "FINISHED" and run_b.info.run_id == run.info.run_id
    assert run_b.data.tags["resumed_from"].endswith("last.ckpt")
    assert got.keys() == expected.keys() and len(expected) > 50
    for name, values in expected.items():
        assert [s for s, _ in got[name]] == [s for s, _ in values], name  # no gap, no duplicate
        for (_, mine), (_, theirs) in zip(got[name], values):
            assert mine == pytest.approx(theirs, abs=1e-6), name
    assert [s for s, _ in expected["train/loss"]] == list(range(28))
    # Batches of the second epoch are not those of the first (the epoch enters the sampler's seed).
    batches = [json.loads(line) for line in (tmp_path / "a" / "batches" / "rank0.jsonl").read_text().splitlines()]
    assert batches[0]["rows"] != batches[14]["rows"]
    final = [json.loads((folder / "metrics.json").read_text()) for folder in (killed_dir, tmp_path / "a")]
    assert [{k: v for k, v in f.items() if k != "timings"} for f in final] == [
        {k: v for k, v in final[1].items() if k != "timings"}] * 2


def test_sigterm_saves_a_checkpoint_marks_the_run_and_exits_non_zero(tmp_path: Path, data_root: Path) -> None:
    folder = tmp_path / "run"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*RESUMABLE, "train.checkpoint_every_n_steps=null", f"logger.tracking_uri={uri}", f"hydra.run.dir={folder}"]
    proc = _start(args, data_root)
    try:
        _wait_for_batches(folder, proc, 4)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    _, run = _only_run(uri)
    assert run.info.status == "KILLED" and "Terminated" in run.data.tags["error"]
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((folder / "status.json").read_text())["status"] == "killed"
    resumed = run_command(["run.py", *args[:-1], "train.resume=last", f"hydra.run.dir={tmp_path}/again"],
                          data_root, REPO_ROOT)
    # "last" is looked up under the launch folder's outputs/train, which this test does not use: name the folder.
    assert resumed.returncode != 0 and "train.resume" in resumed.stderr
    resumed = run_command(["run.py", *args[:-1], f"train.resume={folder}", f"hydra.run.dir={tmp_path}/again"],
                          data_root, REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The loader resumes through Lightning's interface, and the run's own checkpoints/ is not news.
    assert "dataloader is not resumable" not in resumed.stderr and "exists and is not empty" not in resumed.stderr
    client, run = _only_run(uri)
    assert run.info.status == "FINISHED" and run.data.metrics["best/step"] in (14, 28)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/multi/map")]
    assert sorted(steps) == [0, 14, 28]  # each validation once, across the SIGTERM
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(28))


def test_a_nan_loss_stops_with_the_step_the_batch_and_a_finite_checkpoint(tmp_path: Path, data_root: Path) -> None:
    import torch

    folder = tmp_path / "run"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_command(["run.py", *SMALL_TRAIN, "train.lr=1e30", "train.warmup_ratio=0", "train.freeze_embeddings=false",
                        "trainer.gradient_clip_val=null", f"logger.tracking_uri={uri}", f"hydra.run.dir={folder}"],
                       data_root, REPO_ROOT)
    assert proc.returncode != 0
    assert "NonFiniteLossError" in proc.stderr and "at step" in proc.stderr and "query languages" in proc.stderr
    _, run = _only_run(uri)
    assert run.info.status == "FAILED" and "at step" in run.data.tags["error"]
    state = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())
    assert json.loads((folder / "status.json").read_text())["status"] == "failed"


def test_processes_starting_together_on_a_new_store_all_succeed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/new/mlflow.db"
    script = ("import sys; from hybrid_retrieval import tracking\n"
              "client, run_id = tracking.start_run(sys.argv[1], 'together')\n"
              "tracking.with_retry(lambda: client.log_metric(run_id, 'm', float(sys.argv[2])))\n"
              "client.set_terminated(run_id)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, uri, str(i)], cwd=REPO_ROOT, stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    client = mlflow_client(uri)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert sorted(r.data.metrics["m"] for r in runs) == [0.0, 1.0, 2.0, 3.0]


def test_a_dead_process_run_is_marked_killed_by_the_next_run(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from hybrid_retrieval import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    client, orphan = tracking.start_run(uri, "hybrid_retrieval")
    import socket

    client.set_tag(orphan, "host", socket.gethostname())
    client.set_tag(orphan, "pid", dead.stdout.strip())  # a process that has ended
    cfg = OmegaConf.create({"logger": {"tracking_uri": uri, "experiment_name": "hybrid_retrieval"}})
    with tracking.mlflow_run(cfg, job="unit"):
        pass
    marked = client.get_run(orphan)
    assert marked.info.status == "KILLED" and "killed" in marked.data.tags["error"]


@pytest.mark.parametrize("override,named", [
    ("logger.tracking_uri=sqlite:////proc/nope/mlflow.db", "logger.tracking_uri"),
    ("logger.tracking_uri=./mlruns", "logger.tracking_uri"),
    ("train.resume=/nonexistent/run", "train.resume"),
    ("train_data=jsonl train_data.path=/nonexistent.jsonl", "/nonexistent.jsonl"),
    ("sampler=mono train.batch_size=2000", "train.batch_size=2000"),
])
def test_bad_input_fails_before_any_work_and_writes_nothing(tmp_path: Path, data_root: Path, override: str,
                                                       named: str) -> None:
    uri = [] if override.startswith("logger.") else [f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    proc = run_command(["run.py", "model=tiny", *override.split(), *uri, f"hydra.run.dir={tmp_path / 'run'}"],
                       data_root, REPO_ROOT)
    assert proc.returncode != 0 and named in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()  # no half-created run
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"


def test_parallel_sweep_on_one_new_store_loses_nothing_and_a_failing_job_stops_no_other(tmp_path: Path,
                                                                                          data_root: Path) -> None:
    """4 jobs at once (joblib) on a SQLite store that does not exist yet; two of them diverge to a NaN loss."""
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    proc = run_command(["run.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "sampler=mono,cross",
                        "train.lr=5e-5,1e30", "train.warmup_ratio=0", "train.freeze_embeddings=false",
                        "trainer.gradient_clip_val=null", "hardware.num_threads=1", *SMALL_TRAIN,
                        f"logger.tracking_uri={uri}", f"hydra.sweep.dir={tmp_path / 'sweep'}"], data_root, REPO_ROOT)
    assert proc.returncode != 0  # the sweep reports its failed jobs
    client = mlflow_client(uri)
    runs = client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
    jobs = [r for r in runs if r.data.tags.get("job") == "train"]
    assert len(jobs) == 4, [r.data.tags for r in runs]
    finished = [r for r in jobs if r.info.status == "FINISHED"]
    failed = [r for r in jobs if r.info.status == "FAILED"]
    assert len(finished) == 2 and len(failed) == 2
    assert all(r.data.params["train.lr"] == "1e+30" and "NonFiniteLossError" in r.data.tags["error"] for r in failed)
    counted = 0
    for run in finished:
        for name in ("val/multi/map", "val/mono/map", "val/cross/map", "val/xquad_r/cross/en-el/map"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == [0, 3], name
            counted += 2
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1, 2]
        assert len(run.data.params) > 50 and "cross_lingual_map.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
        counted += len(run.data.metrics)
    assert counted > 200  # every metric of both finished jobs is in the store


def test_a_run_and_its_resume_resolve_train_resume_and_check_each_option_once(tmp_path: Path, data_root: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """run.py in this process (its real functions, counted): the config is checked once, ``train.resume`` is resolved
    once (a resume compares the config once) and the adapt options are checked once, across the heavy imports."""
    from collections import Counter

    import run
    from hybrid_retrieval import run_folder
    from hybrid_retrieval.adaptation import mlm
    from hybrid_retrieval.training import config as training_config
    from hybrid_retrieval.training import train as train_module

    calls: Counter[str] = Counter()

    def count(module: Any, name: str) -> None:
        real = getattr(module, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    for module, name in [(training_config, "check_train_config"), (train_module, "check_train_config"),
                         (run_folder, "plan_run"), (train_module, "plan_run"), (run_folder, "check_same_config"),
                         (mlm, "check_adapt_config")]:
        count(module, name)
    for key, value in _env(data_root).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HYBRID_RETRIEVAL_MLFLOW_URI", raising=False)
    monkeypatch.chdir(REPO_ROOT)
    # In this process Hydra finds conf/ by path (it looks for run.py's config next to the importing module).
    args = ["run.py", f"--config-path={REPO_ROOT / 'conf'}", *SMALL_TRAIN, "adapt=mlm", "adapt.steps=2",
            "adapt.head_warmup_steps=1", "adapt.heldout_size=8", "adapt.batch_size=4", "adapt.text.max_texts=24",
            "train.checkpoint_every_n_steps=1", "train.evaluate_before=false", f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]

    monkeypatch.setattr(sys, "argv", [*args, f"hydra.run.dir={tmp_path}/run"])
    run.main()
    assert calls == {"check_train_config": 1, "plan_run": 1, "check_adapt_config": 1}
    calls.clear()
    monkeypatch.setattr(sys, "argv", [*args, f"train.resume={tmp_path}/run", f"hydra.run.dir={tmp_path}/again"])
    run.main()
    assert calls == {"check_train_config": 1, "plan_run": 1, "check_same_config": 1, "check_adapt_config": 1}
    client, resumed = _only_run(f"sqlite:///{tmp_path}/mlflow.db")
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed_from"].endswith("last.ckpt")


def test_a_failing_sweep_job_keeps_the_others_is_reported_and_a_rerun_runs_only_it(tmp_path: Path,
                                                                                  data_root: Path) -> None:
    """Job 0 reads a training file that is not there yet (a data set still being copied, a mount not up): job 1
    still runs, the sweep's report lists job 0 with its error and the rerun command, the exit status is 1; once
    the file exists, that command trains job 0 alone."""
    from hybrid_retrieval.data.lareqa_pairs import from_lareqa

    pairs = from_lareqa("mlqa_r", data_root, languages=["en", "de", "es"], max_groups=60)
    present, missing = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    present.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "hard_negatives"}) + "\n"
                               for row in pairs.table.to_pylist()))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = tmp_path / "sweep"
    command = ["run.py", "-m", "train_data=jsonl", f"train_data.path={missing},{present}",
               *[a for a in SMALL_TRAIN if not a.startswith("train_data.")],
               f"logger.tracking_uri={uri}", f"hydra.sweep.dir={sweep}"]
    proc = run_command(command, data_root, REPO_ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert json.loads((sweep / "1" / "run_info.json").read_text())["best"] > 0  # the other job finished
    listed = json.loads((sweep / "report" / "unfinished_jobs.json").read_text())
    assert [Path(job["folder"]).name for job in listed["jobs"]] == ["0"]
    assert listed["jobs"][0]["error"].startswith("FileNotFoundError: training data file") and str(missing) in \
        listed["jobs"][0]["error"]
    assert "train.resume=auto" in listed["rerun"] and f"hydra.sweep.dir={sweep}" in listed["rerun"]
    report = (sweep / "report" / "report.md").read_text()
    assert "## Jobs that did not finish" in report and f"train_data.path={missing}" in report
    assert "1 job(s) of this sweep did not finish" in output and listed["rerun"] in output
    client = mlflow_client(uri)
    first = [r for r in client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
             if r.data.tags.get("job") == "train"]
    assert [r.data.tags["job_num"] for r in first] == ["1"] and first[0].info.status == "FINISHED"

    missing.write_text(present.read_text())
    rerun = run_command(shlex.split(listed["rerun"])[1:], data_root, REPO_ROOT)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert output.count("this job finished before") == 1  # job 1 is not trained again
    runs = [r for r in client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
            if r.data.tags.get("job") == "train"]
    assert sorted(r.data.tags["job_num"] for r in runs) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert json.loads((sweep / "report" / "unfinished_jobs.json").read_text())["jobs"] == []
    assert "Jobs that did not finish" not in (sweep / "report" / "report.md").read_text()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 400 MB tmpfs of its own: a file system that really fills up (ENOSPC), without touching the machine's."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs CAP_SYS_ADMIN: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(disk: Path, leave: int) -> Path:
    """A file that leaves ``leave`` bytes free on ``disk``."""
    import shutil

    filler = disk / "filler"
    size = shutil.disk_usage(disk).free - leave
    with filler.open("wb") as handle:
        for _ in range(size // (1 << 20)):
            handle.write(b"\0" * (1 << 20))
        handle.write(b"\0" * (size % (1 << 20)))
    return filler


def test_a_full_disk_keeps_the_last_good_checkpoint_and_a_resume_after_freeing_space_finishes(
        tmp_path: Path, data_root: Path, small_disk: Path) -> None:
    """The run folder on a disk with room for one training state (65 MB) but not for the next one beside it: the
    second save is refused naming the folder and the bytes; the first stays loadable and no partial file is left;
    with the space freed, ``train.resume`` continues from it and every step is logged once."""
    import torch

    uri = f"sqlite:///{tmp_path}/mlflow.db"  # the store elsewhere: only the run folder's disk fills up
    run = small_disk / "run"
    args = [*RESUMABLE, f"logger.tracking_uri={uri}", f"hydra.run.dir={run}"]
    filler = _fill(small_disk, 100 << 20)
    proc = run_command(["run.py", *args], data_root, REPO_ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"disk full: checkpoint last.ckpt in {run / 'checkpoints'} did not fit (needs 6" in output, output[-3000:]
    assert f"train.resume={run}" in output and "Traceback" not in output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # nothing partial
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    client, failed = _only_run(uri)
    assert failed.info.status == "FAILED" and "disk full" in failed.data.tags["error"]
    assert json.loads((run / "status.json").read_text())["status"] == "failed"

    filler.unlink()
    resumed = run_command(["run.py", *args, f"train.resume={run}"], data_root, REPO_ROOT)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    client, finished = _only_run(uri)
    assert finished.info.status == "FINISHED" and finished.info.run_id == failed.info.run_id
    steps = [m.step for m in client.get_metric_history(finished.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(28))  # 2 epochs of 14 batches: each step once
    assert (run / "model" / "model.safetensors").is_file()


def test_a_full_disk_during_an_export_leaves_no_partial_model_and_keeps_the_previous_one(small_disk: Path) -> None:
    """Refused before writing when the weights alone do not fit; failing mid-way (weights fit, the tokenizer not)
    removes what it wrote. Either way the folder's earlier export stays, whole."""
    from hybrid_retrieval.models.encoder import load_encoder
    from hybrid_retrieval.models.model_folder import export_encoder
    from hybrid_retrieval.storage import DiskFullError

    encoder = load_encoder(name="tiny", source="random").eval()
    target = small_disk / "model"
    export_encoder(encoder, target)
    before = {p.name: p.stat().st_size for p in target.iterdir()}
    weights = before["model.safetensors"]
    for leave in (weights // 2, weights + (1 << 20)):  # refused up front; fails writing the tokenizer
        filler = _fill(small_disk, leave)
        with pytest.raises(DiskFullError, match=f"disk full: the model export in {small_disk} did not fit"):
            export_encoder(encoder, target, overwrite=True)
        assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "model"]  # no partial folder
        assert {p.name: p.stat().st_size for p in target.iterdir()} == before
        filler.unlink()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """A real ``mlflow server`` (SQLite backend, artifacts served) that a test stops and starts again."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.proc = folder, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import urllib.request

        mlflow = Path(sys.executable).parent / "mlflow"
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.folder}/server.db",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a crash: no goodbye to the clients
            self.proc.wait()
        self.proc = None


def _series(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = mlflow_client(uri)
    run = client.get_run(run_id)
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
            for name in run.data.metrics if not name.startswith("time/")}


def _batches(folder: Path) -> int:
    log = folder / "batches" / "rank0.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


def test_a_tracking_server_that_goes_away_holds_up_no_step_and_loses_nothing(tmp_path: Path, data_root: Path) -> None:
    """A real MLflow server killed mid-run: (a) back 20 s later (MLflow's own retries gave up long before): training
    ran on meanwhile and every series equals a run whose server never stopped; (b) never back before the run
    ends: the run ends normally with its folder complete and one line naming what was not delivered and the
    command that delivers it, which, once the server is up, leaves the store as in (a)."""
    server = _Server(tmp_path / "server")
    server.folder.mkdir()
    server.start()
    args = [arg for arg in RESUMABLE if not arg.startswith("trainer.max_epochs")] + [
        "trainer.max_epochs=20", f"logger.tracking_uri={server.uri}"]
    try:
        reference = run_command(["run.py", *args, f"hydra.run.dir={tmp_path / 'reference'}"], data_root, REPO_ROOT)
        assert reference.returncode == 0, reference.stderr[-3000:]
        expected = _series(server.uri, read_run_id(tmp_path / "reference"))
        assert len(expected["train/loss"]) == 280 and len(expected) > 100

        # (a) down for 20 s in the middle: as many steps a second as in the 10 s before
        folder = tmp_path / "outage"
        proc = _start([*args, f"hydra.run.dir={folder}"], data_root)
        _wait_for_batches(folder, proc, 5)
        before = _batches(folder)
        time.sleep(10)
        at_stop = _batches(folder)
        server.stop()
        time.sleep(20)
        during = _batches(folder) - at_stop
        server.start()
        back = time.monotonic()
        done = _batches(folder)
        client = mlflow_client(server.uri)
        run_id = read_run_id(folder)
        while len(client.get_metric_history(run_id, "train/loss")) < done and proc.poll() is None:
            time.sleep(0.2)
        print(f"TIMING tracking outage: {during} steps in the 20 s down ({at_stop - before} in the 10 s before); "
              f"the {done} steps' losses were in the store {time.monotonic() - back:.1f} s after it was back")
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert during / 20 >= 0.7 * (at_stop - before) / 10, (at_stop - before, during)  # no stall
        run_id = read_run_id(folder)
        assert _series(server.uri, run_id) == expected
        client = mlflow_client(server.uri)
        assert client.get_run(run_id).info.status == "FINISHED"
        assert "not delivered" not in out
        assert client.get_run(read_run_id(tmp_path / "reference")).info.status == "FINISHED"

        # (b) down until the run ends
        folder = tmp_path / "gone"
        proc = _start([*args, "logger.delivery_timeout=5", f"hydra.run.dir={folder}"], data_root)
        _wait_for_batches(folder, proc, 5)
        server.stop()
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        line = [text for text in out.splitlines() if text.startswith("MLflow: not delivered")]
        assert len(line) == 1 and f"python -m hybrid_retrieval.deliver {folder}" in line[0], out[-3000:]
        assert "metric writes" in line[0] and "the run's status" in line[0]
        for name in ("metrics.json", "checkpoints/best.ckpt", "model/model.safetensors"):
            assert (folder / name).is_file(), name
        server.start()
        delivered = subprocess.run([sys.executable, "-m", "hybrid_retrieval.deliver", str(folder)], cwd=REPO_ROOT,
                                   env=_env(data_root), capture_output=True, text=True, timeout=600)
        assert delivered.returncode == 0, delivered.stderr[-3000:]
        run_id = read_run_id(folder)
        assert _series(server.uri, run_id) == expected
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["model_uri"].startswith("models:/")
        assert "metrics.json" in {a.path for a in client.list_artifacts(run_id)}
    finally:
        server.stop()


def read_run_id(folder: Path) -> str:
    return json.loads((folder / "run_info.json").read_text())["mlflow_run_id"]


def _child_pids(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def _signal_rank1(args: list[str], folder: Path, data_root: Path,
                  signum: int) -> tuple[subprocess.Popen, int, str, str, float]:
    """Start a 2-process DDP run, send ``signum`` to rank 1 after 8 steps, wait for the job: (process, rank 1's
    pid, stdout, stderr, seconds from the signal to the job's end)."""
    proc = _start(args, data_root)
    _wait_for_batches(folder, proc, 8)
    (rank1,) = _child_pids(proc.pid)
    os.kill(rank1, signum)
    signalled = time.monotonic()
    out, err = proc.communicate(timeout=120)
    return proc, rank1, out, err, time.monotonic() - signalled


def test_a_dead_or_preempted_ddp_rank_stops_the_job_resumably_and_a_resume_ends_like_an_uninterrupted_run(
        tmp_path: Path, data_root: Path) -> None:
    """``hardware=ddp_cpu`` (2 processes). SIGKILL to rank 1 mid-training: the job ends in seconds with one block
    naming rank 1, its pid, the signal and the resume command (no transport traceback), the MLflow run KILLED.
    SIGTERM to rank 1 alone: both ranks write the same step's checkpoint and stop with status 143. Either way
    ``train.resume`` of the folder continues, logs every step once and ends with the metrics of a run that was
    never interrupted."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["hardware=ddp_cpu", "hardware.devices=2", *RESUMABLE, f"logger.tracking_uri={uri}"]
    reference = run_command(["run.py", *args, f"hydra.run.dir={tmp_path / 'reference'}"], data_root, REPO_ROOT)
    assert reference.returncode == 0, reference.stderr[-3000:]

    folder = tmp_path / "run"
    proc, rank1, out, err, took = _signal_rank1([*args, f"hydra.run.dir={folder}"], folder, data_root, signal.SIGKILL)
    print(f"TIMING dead rank: the job ended {took:.1f} s after SIGKILL to rank 1")
    assert proc.returncode != 0 and took < 15, took
    assert f"RankDiedError: rank 1 of 2 (pid {rank1}) died at step" in err and "killed by SIGKILL" in err, err[-3000:]
    assert f"train.resume={folder}" in err and "Traceback" not in err and "Connection reset" not in err
    client = mlflow_client(uri)
    runs = {r.data.tags["output_dir"]: r for r in client.search_runs(
        [client.get_experiment_by_name("hybrid_retrieval").experiment_id])}
    stopped = runs[str(folder)]
    assert stopped.info.status == "KILLED" and "rank 1 of 2" in stopped.data.tags["error"]
    assert json.loads((folder / "status.json").read_text())["status"] == "killed"

    expected = _series(uri, runs[str(tmp_path / "reference")].info.run_id)
    _resume_and_compare(args, folder, stopped.info.run_id, expected, uri, data_root)

    # SIGTERM to rank 1 alone (a scheduler preempting its node): both ranks save the same step and stop.
    folder = tmp_path / "preempted"
    proc, _, out, err, took = _signal_rank1([*args, f"hydra.run.dir={folder}"], folder, data_root, signal.SIGTERM)
    print(f"TIMING preempted rank: the job ended {took:.1f} s after SIGTERM to rank 1")
    assert proc.returncode == 143, err[-3000:]
    import torch

    step = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    ran = [len((folder / "batches" / f"rank{r}.jsonl").read_text().splitlines()) for r in range(2)]
    assert ran == [step, step], (ran, step)  # every rank stopped after the step the checkpoint holds
    assert f"SIGTERM at step {step}" in out + err
    client = mlflow_client(uri)
    preempted = next(r for r in client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
                     if r.data.tags["output_dir"] == str(folder))
    assert preempted.info.status == "KILLED"
    # A resume in the second epoch, where the ranks' RNG states differ: each rank must restore its own.
    assert step > 7, step
    _resume_and_compare(args, folder, preempted.info.run_id, expected, uri, data_root)


def test_a_hung_ddp_rank_stops_the_job_after_the_collective_timeout_naming_the_rank_and_its_state(
        tmp_path: Path, data_root: Path) -> None:
    """SIGSTOP to rank 1 (alive, never answering: a hung file system looks the same to the other ranks): rank 0's
    next collective gives up after ``hardware.collective_timeout_s`` and the job ends with one block naming the
    timeout, rank 1's pid and state, and the resume; no rank is left behind."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    folder = tmp_path / "run"
    args = ["hardware=ddp_cpu", "hardware.devices=2", *RESUMABLE, f"logger.tracking_uri={uri}",
            "hardware.collective_timeout_s=10", f"hydra.run.dir={folder}"]
    try:
        proc, rank1, out, err, took = _signal_rank1(args, folder, data_root, signal.SIGSTOP)
        left_behind = Path(f"/proc/{rank1}").exists()
    finally:  # a stopped rank keeps its pipes open: never leave one behind
        subprocess.run(["pkill", "-KILL", "-f", f"hydra.run.dir={folder}"], check=False)
    print(f"TIMING hung rank: the job ended {took:.1f} s after SIGSTOP to rank 1 (collective timeout 10 s)")
    assert proc.returncode == 1 and took < 40, (took, err[-3000:])
    assert re.search(rf"RankHungError: rank 0 of 2 waited 10 s \(hardware.collective_timeout_s\) in a collective "
                     rf"at step \d+ and gave up: rank 1 \(pid {rank1}\) was stopped \(SIGSTOP", err), err[-3000:]
    assert f"train.resume={folder}" in err and "Traceback" not in err
    assert not left_behind  # rank 0 stopped it
    _, run = _only_run(uri)
    assert run.info.status == "FAILED" and "rank 1" in run.data.tags["error"]


def _resume_and_compare(args: list[str], folder: Path, run_id: str, expected: dict[str, list[tuple[int, float]]],
                        uri: str, data_root: Path) -> None:
    resumed = run_command(["run.py", *args, f"hydra.run.dir={folder}", f"train.resume={folder}"], data_root,
                          REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _series(uri, run_id)
    assert got.keys() == expected.keys()
    differences = {}
    for name, values in expected.items():
        assert [s for s, _ in got[name]] == [s for s, _ in values], name  # every step once
        gaps = [(s, abs(v - w)) for (s, v), (_, w) in zip(got[name], values) if abs(v - w) > 0]
        if gaps:
            differences[name] = max(gaps, key=lambda g: g[1])
    print(f"TIMING resume of {folder.name}: {len(differences)} series differ from the uninterrupted run, the most "
          f"{max((d[1] for d in differences.values()), default=0):.3g}")
    assert not {n: d for n, d in differences.items() if d[1] > 1e-6}, differences


def test_a_full_artifact_disk_ends_the_run_normally_and_deliver_sends_the_rest(tmp_path: Path, data_root: Path,
                                                                                small_disk: Path) -> None:
    """The MLflow store (SQLite and its artifacts) on a disk with 30 MB free: the configs and reports fit, the
    exported model (78 MB) does not. The run ends normally with its folder whole and one line naming the folder and
    the bytes; once space is freed, ``deliver`` sends the model and the run's status."""
    uri = f"sqlite:///{small_disk}/store/mlflow.db"
    run = tmp_path / "run"
    filler = _fill(small_disk, 30 << 20)
    proc = run_command(["run.py", *SMALL_TRAIN, f"logger.tracking_uri={uri}", "logger.delivery_timeout=5",
                        f"hydra.run.dir={run}"], data_root, REPO_ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    line = [text for text in proc.stdout.splitlines() if text.startswith("MLflow: not delivered")]
    assert len(line) == 1 and "disk full: the MLflow model sentence_transformer in" in line[0], output[-3000:]
    assert re.search(r"needs \d+\.\d MB, \d+\.\d MB free there", line[0])
    assert f"python -m hybrid_retrieval.deliver {run}" in line[0]
    assert (run / "model" / "model.safetensors").is_file() and (run / "metrics.json").is_file()
    client, stopped = _only_run(uri)
    assert stopped.info.status == "RUNNING" and "model_uri" not in stopped.data.tags
    assert "metrics.json" in {a.path for a in client.list_artifacts(stopped.info.run_id)}  # what fitted is there

    filler.unlink()
    delivered = subprocess.run([sys.executable, "-m", "hybrid_retrieval.deliver", str(run)], cwd=REPO_ROOT,
                               env=_env(data_root), capture_output=True, text=True, timeout=600)
    assert delivered.returncode == 0, delivered.stderr[-3000:]
    client, finished = _only_run(uri)
    assert finished.info.status == "FINISHED" and finished.data.tags["model_uri"].startswith("models:/")
