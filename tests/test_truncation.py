"""benchmarks/truncation.py: metrics of truncated, re-normalised embeddings, seeds aggregated, index cost."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybrid_retrieval.data.lareqa import load_split
from hybrid_retrieval.evaluation.lareqa_protocol import evaluate_split

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
LANGUAGES = ["de", "en", "es"]


@pytest.fixture(scope="module")
def truncation() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling machine.py
    spec = importlib.util.spec_from_file_location("truncation_benchmark", BENCHMARKS / "truncation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _embeddings(folder: Path, split, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random embeddings with a signal in every dimension: a group shares a direction, plus per-item noise."""
    rng = np.random.default_rng(seed)
    groups = {}
    def vector(key):
        groups.setdefault(key, rng.normal(size=dim))
        return groups[key] + 0.8 * rng.normal(size=dim)
    relevant = split.relevant
    queries = np.stack([vector(int(np.flatnonzero(relevant[i])[0])) for i in range(len(split.queries))])
    candidates = np.stack([vector(j) for j in range(len(split.candidates))])
    folder.mkdir(parents=True)
    np.save(folder / "query_emb.npy", queries.astype(np.float32))
    np.save(folder / "candidate_emb.npy", candidates.astype(np.float32))
    return queries.astype(np.float32), candidates.astype(np.float32)


def test_truncated_is_the_renormalised_prefix(truncation: ModuleType) -> None:
    x = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    expected = F.normalize(torch.from_numpy(x[:, :8]), dim=-1).numpy()
    np.testing.assert_allclose(truncation.truncated(x, 8), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(truncation.truncated(x, 8), axis=1), 1.0, rtol=1e-6)


def test_seeds_are_aggregated_and_each_size_equals_the_evaluator_on_the_prefix(truncation: ModuleType, data_root: Path,
                                                                                tmp_path: Path) -> None:
    split = load_split("xquad_r", root=data_root, languages=LANGUAGES, max_questions_per_language=40)
    runs = [_embeddings(tmp_path / f"seed{s}", split, 32, s) for s in (1, 2)]
    args = ["--dataset", "xquad_r", "--languages", *LANGUAGES, "--max-questions", "40", "--dims", "32", "8",
            "--out", str(tmp_path / "out")] + [f"--run=plain={tmp_path / f'seed{s}'}" for s in (1, 2)]
    results = truncation.main(args)
    rows = results["models"]["plain"]["dims"]
    assert list(rows) == [32, 8] and len(results["models"]["plain"]["folders"]) == 2
    for dim in (32, 8):
        maps = [evaluate_split(truncation.truncated(q, dim), truncation.truncated(c, dim), split).summary
                for q, c in runs]
        mono = np.array([m["mono"]["map"] for m in maps])
        assert rows[dim]["Mo mAP"]["mean"] == pytest.approx(mono.mean(), abs=1e-12)
        assert rows[dim]["Mo mAP"]["std"] == pytest.approx(mono.std(ddof=1), abs=1e-12)
        distance = np.mean([m["multi"]["rank_distance"] for m in maps])
        assert rows[dim]["rank distance"]["mean"] == pytest.approx(distance)
        # a flat float32 index holds 4 bytes a component per candidate (plus a small header)
        size = rows[dim]["index_bytes"]["mean"]
        assert 4 * dim * len(split.candidates) <= size < 4 * dim * len(split.candidates) + 1024
        assert rows[dim]["queries_per_s"]["mean"] > 0
    assert rows[32]["Mul mAP kept"]["mean"] == pytest.approx(1.0)
    assert rows[8]["Mo mAP"]["mean"] < rows[32]["Mo mAP"]["mean"]  # 8 noisy components keep less than 32
    written = json.loads((tmp_path / "out" / "truncation.json").read_text())
    assert written["models"]["plain"]["dims"]["8"]["Cr mAP"]["mean"] == pytest.approx(rows[8]["Cr mAP"]["mean"])
    table = (tmp_path / "out" / "truncation.md").read_text()
    assert "| plain | 2 | 8 |" in table


@pytest.mark.parametrize("argv, message", [
    (["--run", "no-equals-sign"], "expected LABEL=FOLDER"),
    (["--run", "a=/nonexistent/folder"], "query_emb.npy"),
    (["--run", "a=x", "--dims", "64", "128"], "largest first"),
    ([], "either --run"),
])
def test_bad_arguments_name_what_was_expected(truncation: ModuleType, data_root: Path, argv: list[str],
                                              message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        truncation.main(argv + ["--languages", "en", "--max-questions", "5"])
