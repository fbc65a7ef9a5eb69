"""docs/extending.md's examples, run as written: each code block goes to the file its first line names."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGE = REPO_ROOT / "docs" / "extending.md"


def write_examples(folder: Path) -> list[Path]:
    """Every fenced block of the page into ``folder``/<the file its first line names>; blocks naming the same file
    ("(continued)") are appended in order."""
    written: list[Path] = []
    for block in re.findall(r"```(?:python|yaml)\n(.*?)```", PAGE.read_text(), flags=re.S):
        first, _, body = block.partition("\n")
        match = re.fullmatch(r"# file: (\S+)( \(continued\))?", first.strip())
        assert match, f"a code block of {PAGE.name} does not name its file: {first!r}"
        path = folder / match.group(1)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a" if match.group(2) else "w") as file:
            file.write(body if match.group(2) else block)
        written.append(path)
    return written


@pytest.fixture()
def extensions(tmp_path: Path):
    files = write_examples(tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in files} == {
        "my_extensions.py", "conf/loss/hardest_margin.yaml", "conf/sampler/in_order.yaml"}
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("my_extensions"), tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_extensions", None)


def test_the_loss_of_the_page_computes_the_hardest_negative_margin(extensions) -> None:
    module, _ = extensions
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    # query 0: positive 0.9, hardest negative 0.6 -> 0.2 - 0.9 + 0.6 = -0.1 -> 0; query 1: 0.4, 0.1 -> 0 ...
    loss = module.HardestNegativeMarginLoss(margin=0.2)
    assert loss(q, p).item() == pytest.approx(0.0)
    # ... with a hard negative at 0.95 for query 0: 0.2 - 0.9 + 0.95 = 0.25, mean over two queries 0.125
    negatives = torch.tensor([[0.95, 0.0], [0.0, 0.0]])
    assert loss(q, p, negatives).item() == pytest.approx(0.125)
    q.requires_grad_(True)
    loss(q, p, negatives).backward()
    assert q.grad is not None and q.grad[0].abs().sum() > 0 and q.grad[1].abs().sum() == 0


def test_the_sampler_of_the_page_meets_the_contract_and_yields_rows_in_order(extensions) -> None:
    from hybrid_retrieval.training.sampler import BatchSampler, check_batch_sampler
    from tests.test_sampler import full_pairs

    module, _ = extensions
    dataset = full_pairs("toy", 10, 2)  # 10 parallel groups, each in 2 languages
    ranks = [module.InOrderSampler([dataset], batch_size=2, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    for sampler in ranks:
        assert isinstance(sampler, BatchSampler)
        check_batch_sampler(sampler)
    first, second = (list(s) for s in ranks)
    assert len(first) == len(second) == len(ranks[0]) == 2  # 10 groups, 4 rows a step over 2 ranks
    step = [row for batch in (first[0], second[0]) for _, row, passage in batch if row == passage]
    assert len(step) == 4 and step == sorted(step) and len(set(dataset.groups[step].tolist())) == 4
    ranks[0].skip_next(0, 1)
    assert list(ranks[0]) == first[1:]

    class NoResume(module.InOrderSampler):
        skip_next = None  # type: ignore[assignment]

    with pytest.raises(ValueError, match=r"NoResume is not a batch sampler: it lacks skip_next"):
        check_batch_sampler(NoResume([dataset], batch_size=2, seed=0))


@pytest.mark.slow
def test_run_py_trains_with_the_loss_and_the_sampler_of_the_page(tmp_path: Path, data_root: Path) -> None:
    from tests.test_cli import SMALL_TRAIN

    write_examples(tmp_path)
    run = tmp_path / "run"
    env = {**os.environ, "HYBRID_RETRIEVAL_DATA": str(data_root), "HYBRID_RETRIEVAL_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    env.pop("HYBRID_RETRIEVAL_MLFLOW_URI", None)
    proc = subprocess.run([sys.executable, "run.py", "--config-dir", str(tmp_path / "conf"), "loss=hardest_margin",
                           "sampler=in_order", *SMALL_TRAIN, "train.log_batches=true", "train.evaluate_before=false",
                           f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={run}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(line) for line in (run / "batches" / "rank0.jsonl").read_text().splitlines()]
    rows = [[query for _, query, _ in batch["rows"]] for batch in logged]
    assert len(rows) == 3 and all(r == sorted(r) for r in rows) and rows[0][-1] < rows[1][0] < rows[2][0]
    config = (run / ".hydra" / "config.yaml").read_text()
    assert "my_extensions.HardestNegativeMarginLoss" in config and "sampler in_order;" in proc.stdout
    assert json.loads((run / "metrics.json").read_text())  # validated and reported like any run
