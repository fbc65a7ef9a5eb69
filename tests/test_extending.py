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


def write_training_tsv(path: Path, data_root: Path, groups: int = 60) -> list[tuple[str, str, str, str]]:
    """MLQA-R rows (en, de, es) as the page's reader expects them."""
    from hybrid_retrieval.data.lareqa_pairs import from_lareqa

    pairs = from_lareqa("mlqa_r", root=str(data_root), languages=["en", "de", "es"], max_groups=groups)
    rows = [(f"g{int(g)}", pairs.language_names[int(lang)], q, p) for g, lang, q, p in
            zip(pairs.groups, pairs.languages, pairs.queries, pairs.passages)]
    path.write_text("group\tlanguage\tquery\tpassage\n" + "".join("\t".join(row) + "\n" for row in rows),
                    encoding="utf-8")
    return rows


def write_evaluation_pairs(path: Path, data_root: Path) -> int:
    """XQuAD-R questions (en, de) with their gold sentences, one JSON line each."""
    from hybrid_retrieval.data.lareqa import load_split

    split = load_split("xquad_r", data_root, ["en", "de"], 15)
    lines = [json.dumps({"language": q.language, "query": q.text,
                         "passage": next(split.candidates[i].sentence for i in relevant
                                         if split.candidates[i].language == q.language)})
             for q, relevant in zip(split.queries, split.relevant)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


@pytest.fixture()
def extensions(tmp_path: Path):
    files = write_examples(tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in files} == {
        "my_extensions.py", "conf/loss/hardest_margin.yaml", "conf/sampler/in_order.yaml", "conf/train_data/my_tsv.yaml",
        "conf/dataset/my_pairs.yaml"}
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


def test_the_reader_of_the_page_reads_the_file_once_into_the_store(extensions, tmp_path: Path, data_root: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import OmegaConf

    from hybrid_retrieval.data.pairs import build_datasets
    from hybrid_retrieval.schemas import load_node

    module, folder = extensions
    monkeypatch.setenv("HYBRID_RETRIEVAL_CACHE", str(tmp_path / "cache"))
    rows = write_training_tsv(tmp_path / "pairs.tsv", data_root)
    config = load_node(folder / "conf" / "train_data" / "my_tsv.yaml")
    config.datasets[0].path = str(tmp_path / "pairs.tsv")
    [pairs] = build_datasets(OmegaConf.create({"train_data": config}).train_data)
    assert len(pairs) == len(rows) and pairs.n_groups == len({r[0] for r in rows}) == 60
    assert list(pairs.queries) == [r[2] for r in rows] and list(pairs.passages) == [r[3] for r in rows]
    assert set(pairs.language_names) == {"en", "de", "es"}
    again = module.from_tsv(str(tmp_path / "pairs.tsv"))
    assert again.digest == pairs.digest and len(list((tmp_path / "cache").rglob("*.arrow"))) > 0


class TableEncoder:
    """Embeddings looked up by text: a fixed, hand-made geometry."""

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors

    def encode(self, texts, kind, batch_size=64, dtype=None):  # noqa: ANN001, ANN201
        import numpy as np

        return np.array([self.vectors[t] for t in texts], dtype=np.float32)


def test_the_evaluation_set_of_the_page_gives_hand_worked_ranks(extensions, tmp_path: Path) -> None:
    module, _ = extensions
    lines = [{"language": "en", "query": "q1", "passage": "p1"}, {"language": "en", "query": "q2", "passage": "p2"},
             {"language": "en", "query": "q3", "passage": "p3"}, {"language": "de", "query": "q4", "passage": "p4"},
             {"language": "de", "query": "q5", "passage": "p5"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    encoder = TableEncoder({"q1": [1, 0], "p1": [1, 0], "q2": [1, 0], "p2": [0.5, 0.5], "q3": [0, 1], "p3": [0, 1],
                            "q4": [1, 0], "p4": [0.7, 0.7], "p5": [0.7, 0.7], "q5": [0, 1]})
    result = module.PairFileSet("pairs", str(tmp_path / "pairs.jsonl")).evaluate(encoder)
    # en: q1 rank 1; q2 scores p1 1.0, p2 0.5, p3 0 -> rank 2; q3 rank 1. de: q4 ties p4 and p5 (0.7): rank 2;
    # q5 the same tie: rank 2.
    assert result.per_language["mono"]["en"] == pytest.approx({"mrr_10": (1 + 0.5 + 1) / 3, "recall_1": 2 / 3})
    assert result.per_language["mono"]["de"] == pytest.approx({"mrr_10": 0.5, "recall_1": 0.0})
    assert result.summary["mono"] == pytest.approx({"mrr_10": (2.5 / 3 + 0.5) / 2, "recall_1": 1 / 3})
    assert result.flat("val/pairs/")["val/pairs/mono/de/mrr_10"] == pytest.approx(0.5)
    texts = module.PairFileSet("pairs", str(tmp_path / "pairs.jsonl")).texts()
    assert ("passage", "de", ["p4", "p5"]) in texts.groups


def test_a_set_of_ones_own_is_checked_by_its_module(extensions, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from hybrid_retrieval.config_error import ConfigError
    from hybrid_retrieval.evaluation.config import check_dataset
    from hybrid_retrieval.evaluation.sets import KIND_OF_DATASET, monitor_keys

    check_dataset(OmegaConf.create({"name": "my_pairs", "module": "my_extensions", "path": "x"}))
    try:
        assert "val/pairs/mono/mrr_10" in monitor_keys("xquad_r", {"pairs": "my_pairs"})
        with pytest.raises(ConfigError, match=r"dataset\.module='no_such_module': not importable"):
            check_dataset(OmegaConf.create({"name": "other", "module": "no_such_module"}))
        with pytest.raises(ConfigError, match=r"dataset\.module='json' lacks SUMMARY_METRICS, load_set"):
            check_dataset(OmegaConf.create({"name": "other", "module": "json"}))
        with pytest.raises(ConfigError, match=r"dataset\.name='xquad_r' is one of the project's sets"):
            check_dataset(OmegaConf.create({"name": "xquad_r", "module": "my_extensions"}))
        with pytest.raises(ConfigError, match=r"dataset\.name='unknown'.*dataset\.module"):
            check_dataset(OmegaConf.create({"name": "unknown"}))
    finally:
        KIND_OF_DATASET.pop("my_pairs", None)


@pytest.mark.slow
def test_run_py_trains_with_the_four_extensions_of_the_page(tmp_path: Path, data_root: Path) -> None:
    from tests.test_cli import SMALL_TRAIN

    write_examples(tmp_path)
    run = tmp_path / "run"
    env = {**os.environ, "HYBRID_RETRIEVAL_DATA": str(data_root), "HYBRID_RETRIEVAL_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    env.pop("HYBRID_RETRIEVAL_MLFLOW_URI", None)
    write_training_tsv(tmp_path / "pairs.tsv", data_root)
    write_evaluation_pairs(tmp_path / "pairs.jsonl", data_root)
    small_train = [option for option in SMALL_TRAIN if not option.startswith("train_data.")]
    proc = subprocess.run([sys.executable, "run.py", "--config-dir", str(tmp_path / "conf"), "loss=hardest_margin",
                           "sampler=in_order", "train_data=my_tsv", f"train_data.datasets.0.path={tmp_path / 'pairs.tsv'}",
                           "+dataset@extra_datasets.pairs=my_pairs", f"extra_datasets.pairs.path={tmp_path / 'pairs.jsonl'}",
                           *small_train, "train.log_batches=true", "train.evaluate_before=false",
                           f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={run}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(line) for line in (run / "batches" / "rank0.jsonl").read_text().splitlines()]
    rows = [[query for _, query, _ in batch["rows"]] for batch in logged]
    assert len(rows) == 3 and all(r == sorted(r) for r in rows) and rows[0][-1] < rows[1][0] < rows[2][0]
    config = (run / ".hydra" / "config.yaml").read_text()
    assert "my_extensions.HardestNegativeMarginLoss" in config and "sampler in_order;" in proc.stdout
    assert json.loads((run / "metrics.json").read_text())  # validated and reported like any run
    own = json.loads((run / "pairs_metrics.json").read_text())
    assert set(own["summary"]["mono"]) == {"mrr_10", "recall_1"} and set(own["per_language"]["mono"]) == {"en", "de"}
    assert 0 < own["summary"]["mono"]["mrr_10"] <= 1
    assert "my_extensions.from_tsv" in config
