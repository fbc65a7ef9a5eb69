"""The recipe's pieces: the selection split (train_data.holdout), distillation from the starting model, WiSE-FT
weight interpolation, and the multilingual bias metrics Max@R and the own-language-first rate."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.data.lareqa import holdout_groups, load_language_files, load_split
from hybrid_retrieval.data.lareqa_pairs import from_lareqa
from hybrid_retrieval.data.pairs import build_datasets
from hybrid_retrieval.evaluation.config import check_dataset
from hybrid_retrieval.evaluation.lareqa_protocol import evaluate_embeddings
from hybrid_retrieval.evaluation.metrics import own_language_first, per_query_metrics
from hybrid_retrieval.losses.distill import InBatchDistillation
from hybrid_retrieval.losses.info_nce import InfoNCELoss
from hybrid_retrieval.models.merge import check_merge, merge_into, restore
from hybrid_retrieval.training.config import check_train_config
from hybrid_retrieval.training.module import HybridRetrievalModule, OptimizerSettings
from hybrid_retrieval.training.train import build_losses

CONF = str(Path(__file__).resolve().parents[1] / "conf")
HOLDOUT = {"dataset": "mlqa_r", "groups": 40, "seed": 3}


def composed(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# ---------------------------------------------------------------------------------------------------------------
# The selection split


def test_holdout_is_closed_over_paragraphs_and_deterministic(data_root: Path) -> None:
    held = holdout_groups(HOLDOUT, data_root)
    assert len(held) >= 40 and held == holdout_groups(dict(HOLDOUT), data_root)
    assert held != holdout_groups({**HOLDOUT, "seed": 4}, data_root)
    for lang, parsed in load_language_files("mlqa_r", data_root).items():
        by_paragraph: dict[int, set[str]] = {}
        for q in parsed.questions:
            by_paragraph.setdefault(q.paragraph, set()).add(q.id)
        for ids in by_paragraph.values():  # a paragraph is either wholly held out or wholly kept
            assert ids <= held or not ids & held, (lang, ids & held)


def test_training_leaves_out_exactly_the_held_out_groups_and_never_sees_their_sentences(data_root: Path) -> None:
    held = holdout_groups(HOLDOUT, data_root)
    full = from_lareqa("mlqa_r", data_root)
    train = from_lareqa("mlqa_r", data_root, holdout=HOLDOUT)
    selection = load_split("mlqa_r", data_root, holdout=HOLDOUT)
    assert {q.group for q in selection.queries} == held
    assert len(train) == len(full) - len(selection.queries)
    assert not {c.sentence for c in selection.candidates} & set(train.passages)
    # Every language of a held-out group goes with it: no translation of a selection query is trained on.
    assert not set(train.queries) & {q.text for q in selection.queries}
    # A holdout naming another dataset leaves this one whole; build_datasets applies train_data.holdout.
    assert len(from_lareqa("xquad_r", data_root, languages=["en"], holdout=HOLDOUT)) == 1190
    cfg = OmegaConf.create({"holdout": HOLDOUT, "datasets": [
        {"_target_": "hybrid_retrieval.data.lareqa_pairs.from_lareqa", "name": "mlqa_r", "root": str(data_root)}]})
    assert len(build_datasets(cfg)[0]) == len(train)


def test_selection_split_needs_a_holdout_and_bad_specs_name_the_option(data_root: Path) -> None:
    cfg = composed(["dataset=mlqa_r_selection", "dataset.languages=null", "dataset.max_questions_per_language=null"])
    with pytest.raises(ConfigError, match="train_data.holdout"):
        check_dataset(cfg.dataset)
    cfg = composed(["dataset=mlqa_r_selection", "dataset.languages=null", "dataset.max_questions_per_language=null",
                    "train_data.holdout={dataset: mlqa_r, groups: 10, seed: 0}", "model=tiny"])
    check_dataset(cfg.dataset)
    with pytest.raises(ConfigError, match="groups must be a positive int"):
        check_train_config(composed(["train_data.holdout={dataset: mlqa_r, groups: 0}", "model=tiny"]))
    with pytest.raises(ConfigError, match="train_data.holdout must be null or a mapping"):
        check_train_config(composed(["+train_data.holdout.size=3", "model=tiny"]))
    with pytest.raises(ValueError, match="every one of"):
        holdout_groups({"dataset": "mlqa_r", "groups": 100000, "seed": 0}, data_root)


# ---------------------------------------------------------------------------------------------------------------
# Distillation from the starting model


def test_distillation_term_is_the_kl_of_the_two_softmaxes_and_zero_for_the_teacher_itself() -> None:
    torch.manual_seed(0)
    q, p, h = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    tq, tp, th = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    term = InBatchDistillation(weight=0.7, temperature=0.1)
    student = F.normalize(q, dim=-1) @ F.normalize(torch.cat([p, h]), dim=-1).T / 0.1
    teacher = F.normalize(tq, dim=-1) @ F.normalize(torch.cat([tp, th]), dim=-1).T / 0.1
    pt = teacher.softmax(-1)
    expected = 0.7 * (pt * (pt.log() - student.log_softmax(-1))).sum(-1).mean()
    assert term(q, p, h, tq, tp, th).item() == pytest.approx(expected.item(), rel=1e-5)
    assert term(q, p, h, q, p, h).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="must not require gradients"):
        term(q, p, None, tq.requires_grad_(True), tp, None)


def _batch(encoder: Any, data_root: Path) -> dict[str, Any]:
    pairs = from_lareqa("mlqa_r", data_root, languages=["en", "de"], max_groups=6,
                        hard_negative="same_paragraph")
    tokenize = encoder.tokenize
    return {"query": tokenize(pairs.queries[:6], "query"), "passage": tokenize(pairs.passages[:6], "passage"),
            "hard_negative": tokenize([n[0] if n else "" for n in pairs.hard_negatives[:6]], "passage"),
            "monolingual": False}


def test_zero_distill_weight_is_the_old_loss_exactly(tiny_encoder: Any, data_root: Path) -> None:
    loss, distill = build_losses(OmegaConf.create({
        "loss": {"_target_": "hybrid_retrieval.losses.info_nce.InfoNCELoss", "temperature": 0.05},
        "distill": {"weight": 0.0, "temperature": 0.05}}))
    assert distill is None and isinstance(loss, InfoNCELoss)
    batch = _batch(tiny_encoder, data_root)
    plain = HybridRetrievalModule(copy.deepcopy(tiny_encoder), InfoNCELoss(0.05), OptimizerSettings())
    zero = HybridRetrievalModule(copy.deepcopy(tiny_encoder), loss, OptimizerSettings(),
                                 distill=InBatchDistillation(weight=0.0))
    assert zero.start_encoder is None and zero.distill is None  # no teacher copy is even made
    plain.eval(), zero.eval()
    assert zero.training_step(batch, 0).item() == plain.training_step(batch, 0).item()


def test_teacher_is_frozen_and_never_receives_gradients(tiny_encoder: Any, data_root: Path) -> None:
    batch = _batch(tiny_encoder, data_root)
    module = HybridRetrievalModule(copy.deepcopy(tiny_encoder), InfoNCELoss(0.05), OptimizerSettings(lr=1e-2),
                                   distill=InBatchDistillation(weight=1.0))
    teacher = module.start_encoder
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(name.startswith("_start") for name in module.state_dict())  # not in checkpoints
    assert all(p is not q for p in module.parameters() for q in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss = module.training_step(batch, 0)
    plain = module.loss(module(batch["query"]), module(batch["passage"]), module(batch["hard_negative"]))
    assert loss.item() > 0 and loss.item() != pytest.approx(plain.item(), abs=0.0)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.encoder.parameters())
    torch.optim.SGD(module.encoder.parameters(), lr=0.1).step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# WiSE-FT


def test_merge_ratios_zero_and_one_reproduce_the_two_models_and_a_half_is_the_midpoint(tiny_encoder: Any) -> None:
    start = copy.deepcopy(tiny_encoder).eval()
    tuned = copy.deepcopy(tiny_encoder).eval()
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    texts = ["wer schrieb Faust?", "Faust ist ein Drama von Goethe.", "東京は日本の首都です。"]
    expected = {0.0: start.encode(texts, "passage"), 1.0: tuned.encode(texts, "passage")}
    for ratio, embeddings in expected.items():
        model = copy.deepcopy(tuned)
        previous = merge_into(model, start, ratio)
        np.testing.assert_allclose(model.encode(texts, "passage"), embeddings, atol=1e-6)
        restore(model, previous)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tuned.state_dict().values()))
    model = copy.deepcopy(tuned)
    merge_into(model, start, 0.5)
    name, weight = next(iter(model.named_parameters()))
    torch.testing.assert_close(weight, (dict(start.named_parameters())[name] + dict(tuned.named_parameters())[name]) / 2)
    assert not np.allclose(model.encode(texts, "passage"), expected[1.0], atol=1e-4)
    assert check_merge(None, 0.3) is None and check_merge("start", 0.25) == 0.25
    with pytest.raises(ValueError, match="merge_ratio"):
        check_merge("start", 1.5)
    with pytest.raises(ValueError, match="merge_with"):
        check_merge("average", 0.5)


def test_module_validates_the_merge_and_resumes_from_the_trained_weights(tiny_encoder: Any) -> None:
    module = HybridRetrievalModule(copy.deepcopy(tiny_encoder), InfoNCELoss(0.05), OptimizerSettings(),
                                   merge_ratio=0.25)
    start = module.start_encoder
    with torch.no_grad():
        for p in module.encoder.parameters():
            if p.requires_grad:
                p.add_(1.0)
    trained = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    module.swap_in_merge()  # what on_validation_start does (after the sparse rows are materialised)
    name = "backbone.encoder.layer.0.attention.self.query.weight"
    merged = module.encoder.state_dict()[name]
    torch.testing.assert_close(merged, 0.75 * start.state_dict()[name] + 0.25 * trained[name])
    best: dict[str, Any] = {"state_dict": {f"encoder.{k}": v.clone() for k, v in module.encoder.state_dict().items()}}
    module.on_save_checkpoint(best)  # weights only: the best checkpoint holds the merge
    torch.testing.assert_close(best["state_dict"][f"encoder.{name}"], merged)
    assert best["hybrid_retrieval"]["merge"] == {"with": "start", "ratio": 0.25}
    resumable = {"state_dict": dict(best["state_dict"]), "optimizer_states": [{}]}
    module.on_save_checkpoint(resumable)  # a resumable checkpoint written mid-validation keeps the trained weights
    torch.testing.assert_close(resumable["state_dict"][f"encoder.{name}"], trained[name])
    module.swap_out_merge()  # on_validation_end
    assert all(torch.equal(trained[k], v) for k, v in module.encoder.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# Max@R and the own-language-first rate


def test_bias_metrics_on_a_hand_worked_case() -> None:
    # Query 0 (language 0): relevant items at ranks 2 (language 0), 5 (language 1), 9 (language 2).
    # Query 1 (language 1): relevant items at ranks 1 (language 0), 1 (language 1: tied for first), 4 (language 2).
    # Query 2 (language 2): relevant items at ranks 3 (language 0), 7 (language 2).
    query = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    ranks = np.array([2, 5, 9, 1, 1, 4, 3, 7])
    language = np.array([0, 1, 2, 0, 1, 2, 0, 2])
    metrics = per_query_metrics(query, ranks, 3)
    np.testing.assert_array_equal(metrics["max_at_r"], [9, 4, 7])
    np.testing.assert_array_equal(metrics["rank_distance"], [7, 3, 4])
    np.testing.assert_array_equal(own_language_first(query, ranks, language, np.array([0, 1, 2]), 3), [1, 1, 0])
    # A query with no relevant item in its own language has nothing to prefer.
    assert np.isnan(own_language_first(np.array([0]), np.array([1]), np.array([1]), np.array([0]), 1)[0])


def test_bias_metrics_match_a_brute_force_sort() -> None:
    rng = np.random.default_rng(0)
    n_lang, per_lang, n_groups = 3, 12, 12
    candidates = rng.standard_normal((n_lang * per_lang, 16)).astype(np.float32)
    candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
    candidate_language = np.repeat(np.arange(n_lang), per_lang)
    # Group g's relevant items: candidate g of every language; queries: one per (group, language).
    relevant = [np.array([lang * per_lang + g for lang in range(n_lang)]) for g in range(n_groups) for _ in range(n_lang)]
    query_language = np.tile(np.arange(n_lang), n_groups)
    queries = candidates[[r[0] for r in relevant]] + 0.8 * rng.standard_normal((len(relevant), 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    result = evaluate_embeddings(queries, candidates, query_language, candidate_language, relevant,
                                 ["aa", "bb", "cc"], num_threads=1)
    max_rank, own_first = [], []
    for i, rel in enumerate(relevant):
        scores = candidates @ queries[i]
        rank_of = {c: int((scores >= scores[c]).sum()) for c in rel}  # the tie rule: last of the tie group
        max_rank.append(max(rank_of.values()))
        own = [c for c in rel if candidate_language[c] == query_language[i]]
        own_first.append(float(rank_of[own[0]] == min(rank_of.values())))
    max_rank, own_first = np.array(max_rank, float), np.array(own_first)
    for lang, code in enumerate(["aa", "bb", "cc"]):
        values = result.per_language["multi"][code]
        assert values["max_at_r"] == pytest.approx(max_rank[query_language == lang].mean())
        assert values["own_language_first"] == pytest.approx(own_first[query_language == lang].mean())
    assert result.summary["multi"]["max_at_r"] == pytest.approx(
        np.mean([max_rank[query_language == lang].mean() for lang in range(n_lang)]))
    assert "max_at_r" not in result.summary["mono"]


# ---------------------------------------------------------------------------------------------------------------
# Hard-negative mining


def _unit(rows: list[list[float]]) -> np.ndarray:
    array = np.array(rows, dtype=np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def test_mining_never_picks_a_translation_and_applies_the_window_and_the_margin() -> None:
    from hybrid_retrieval.data.mining import MiningSettings, mine_negatives, passage_pool

    # Pool (language 0 unless noted): 0 = query 0's passage (group 0); 1 = group 0's passage in language 1 (its
    # translation); 2 = group 0's passage in language 0 written again by another question of group 0;
    # 3 = a near duplicate of the positive (group 5); 4 = a good hard negative (group 6); 5 = far away (group 7).
    texts, groups, pool_lang, row_to_pool = passage_pool(
        ["p0", "p0-de", "p0 again", "near", "hard", "far"], [0, 0, 0, 5, 6, 7], [0, 1, 0, 0, 0, 0])
    assert groups[0] == frozenset({0}) and list(row_to_pool) == [0, 1, 2, 3, 4, 5]
    passages = _unit([[1, 0, 0], [1, 0.01, 0], [1, 0.02, 0], [1, 0.05, 0], [1, 0.6, 0], [0, 0, 1]])
    query = _unit([[1, 0, 0]])  # ranking: 0, 1, 2, 3, 4, 5
    settings = MiningSettings(rank_window=(1, 6), max_score_ratio=0.99, same_language=False)
    [mined] = mine_negatives(query, passages, [0], [0], [0], groups, pool_lang, settings)
    assert mined.passage == 4  # 1 and 2 are the group's own (translation / same answer), 3 fails the margin
    assert mined.skipped == {"translation_group": 2, "own_passage": 1, "rank_window": 0, "score_ratio": 1}
    assert mined.score < 0.99 * mined.positive_score
    # Without the margin the near duplicate is taken; with a window starting at rank 5 it is skipped by rank.
    [loose] = mine_negatives(query, passages, [0], [0], [0], groups, pool_lang,
                             MiningSettings((1, 6), None, False))
    assert loose.passage == 3 and loose.rank == 4
    [late] = mine_negatives(query, passages, [0], [0], [0], groups, pool_lang, MiningSettings((5, 6), None, False))
    assert late.passage == 4 and late.rank == 5 and late.skipped["rank_window"] == 1
    # Same language: the translation is not even in the pool searched; a window too narrow finds nothing.
    [same] = mine_negatives(query, passages, [0], [0], [0], groups, pool_lang, MiningSettings((1, 2), 0.99, True))
    assert same.passage == -1 and same.skipped["translation_group"] == 1
    with pytest.raises(ValueError, match="rank_window"):
        MiningSettings((0, 3))


@pytest.mark.slow
def test_mine_command_writes_training_jsonl_without_translation_negatives(tmp_path: Path, data_root: Path,
                                                                         tiny_encoder: Any) -> None:
    import json
    import os
    import subprocess
    import sys

    from hybrid_retrieval.data.jsonl_pairs import from_jsonl

    out = tmp_path / "mined"
    env = {**os.environ, "HYBRID_RETRIEVAL_MLFLOW_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    done = subprocess.run([sys.executable, "-m", "hybrid_retrieval.mine", "model=tiny", f"output={out}",
                           "train_data.datasets.0.languages=[en,de,es]", "train_data.datasets.0.max_groups=60",
                           "mining.max_score_ratio=null", f"hydra.run.dir={tmp_path}/run"], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    pairs = from_jsonl(out / "pairs.jsonl")
    source = from_lareqa("mlqa_r", data_root, languages=["en", "de", "es"], max_groups=60)
    assert len(pairs) == len(source) and pairs.hard_negatives is not None
    passages_of_group: dict[int, set[str]] = {}
    for group, passage in zip(pairs.groups, pairs.passages):
        passages_of_group.setdefault(int(group), set()).add(passage)
    mined = [n for n in pairs.hard_negatives if n]
    assert len(mined) > len(pairs) // 2 and all(len(n) == 1 for n in mined)
    for group, negatives, passage in zip(pairs.groups, pairs.hard_negatives, pairs.passages):
        assert all(n != passage and n not in passages_of_group[int(group)] for n in negatives)
    provenance = [json.loads(line) for line in (out / "pairs.provenance.jsonl").read_text().splitlines()]
    assert len(provenance) == len(pairs) and all(p["model"].startswith("random:") or p["model"] for p in provenance)
    assert all(p["rank"] is None or 2 <= p["rank"] <= 30 for p in provenance)
    assert json.loads((out / "mine.json").read_text())["rows"] == len(pairs)
