"""Domain adaptation by masked language modelling: text sources, masking, the tied head, its warm-up, training,
and the ``python -m hybrid_retrieval.adapt`` driver end to end. Real tokenizer, real tiny model, real files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import model_config

from hybrid_retrieval.adaptation.mlm import (AdaptConfigError, MLMSettings, _Batcher, adapt_encoder,
                                             build_mlm_head, check_adapt_config, mask_tokens, split_heldout,
                                             train_mlm, unigram_log_prior, warm_up_head)
from hybrid_retrieval.data.text import TextSourceError, load_texts, uses_eval_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Unbelievably, the internationalisation committee postponed everything.",
    "Tom wanted to know where Mary had put the keys.",
    "Der Zug nach Berlin hat heute zwanzig Minuten Verspätung.",
    "Le gouvernement a annoncé une réforme des retraites.",
    "ቶም ብዙ ጊዜ ከውሻው ጋር ይናገራል።",
    "我喜欢在周末去图书馆看书。",
    "Photosynthesis converts sunlight into chemical energy.",
]


def fresh_tiny() -> Any:
    """A new tiny encoder (adaptation changes weights in place, so never the shared session fixture)."""
    from hydra.utils import instantiate

    return instantiate(model_config("tiny"))


def mlm_config(**overrides: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from hybrid_retrieval.schemas import load_node

    cfg = OmegaConf.to_container(load_node(REPO_ROOT / "conf" / "adapt" / "mlm.yaml"), resolve=False)
    cfg["seed"] = 0
    text = overrides.pop("text", None)
    if text is not None:
        cfg["text"] = {**{k: None for k in cfg["text"]}, **text}
    cfg.update(overrides)
    return cfg


# ----------------------------------------------------------------------------------------------- text sources


def test_folder_source_lines_and_paragraphs(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n  \nfirst line\n", encoding="utf-8")
    (tmp_path / "sub" / "b.txt").write_text("a paragraph\nthat goes on\n\nanother one\n", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not a text file\n", encoding="utf-8")
    lines = load_texts({"source": "folder", "path": str(tmp_path)})
    # Sorted by path, blank lines dropped, the repeated line kept once.
    assert lines == ["first line", "second line", "a paragraph", "that goes on", "another one"]
    paragraphs = load_texts({"source": "folder", "path": str(tmp_path), "unit": "paragraph"})
    assert paragraphs == ["first line", "second line", "a paragraph that goes on", "another one"]


def test_jsonl_and_saved_dataset_sources(tmp_path: Path) -> None:
    import datasets

    rows = [{"body": "one text", "id": 1}, {"body": "another text", "id": 2}, {"body": "one text", "id": 3}]
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_texts({"source": "jsonl", "path": str(path), "field": "body"}) == ["one text", "another text"]

    single = tmp_path / "single"
    datasets.Dataset.from_dict({"content": ["alpha", "beta", "alpha"], "n": [1, 2, 3]}).save_to_disk(str(single))
    assert load_texts({"source": "hf_dataset", "path": str(single), "field": "content"}) == ["alpha", "beta"]
    both = tmp_path / "both"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
                          "test": datasets.Dataset.from_dict({"text": ["t3"]})}).save_to_disk(str(both))
    assert load_texts({"source": "hf_dataset", "path": str(both), "split": "test"}) == ["t3"]
    with pytest.raises(TextSourceError, match=r"adapt\.text\.split=None: expected one of the dataset's splits"):
        load_texts({"source": "hf_dataset", "path": str(both)})
    with pytest.raises(TextSourceError, match=r"adapt\.text\.field='body': not a column .*\['content', 'n'\]"):
        load_texts({"source": "hf_dataset", "path": str(single), "field": "body"})


def test_project_sources_lareqa_tatoeba_and_eval_corpus(data_root: Path) -> None:
    raw = json.loads((data_root / "xquad-r" / "de.json").read_text(encoding="utf-8"))
    contexts = [p["context"] for article in raw["data"] for p in article["paragraphs"]]
    sentences = [s for article in raw["data"] for p in article["paragraphs"] for s in p["sentences"]]
    paragraphs = load_texts({"source": "lareqa", "name": "xquad_r", "languages": ["de"]})
    assert paragraphs == list(dict.fromkeys(c.strip() for c in contexts)) and len(paragraphs) == 240
    assert load_texts({"source": "lareqa", "name": "xquad_r", "languages": ["de"], "unit": "sentence"}) == \
        list(dict.fromkeys(s.strip() for s in sentences if s.strip()))

    amh = (data_root / "tatoeba" / "tatoeba.amh-eng.amh").read_text(encoding="utf-8").splitlines()
    texts = load_texts({"source": "tatoeba", "languages": ["amh", "kab"]})
    assert texts[:len(set(amh))] == list(dict.fromkeys(amh)) and "Tom" not in " ".join(texts[:168])
    assert len(texts) == len(set(texts)) > 1000

    options = {"source": "eval_corpus", "name": "xquad_r", "languages": ["de"]}
    assert load_texts(options) == paragraphs and uses_eval_corpus(options)
    assert not uses_eval_corpus({"source": "lareqa", "name": "xquad_r"})
    # A run that evaluates on XQuAD-R must say eval_corpus to adapt on XQuAD-R's text.
    with pytest.raises(TextSourceError, match="set adapt.text.source=eval_corpus adapt.text.name=xquad_r"):
        load_texts({"source": "lareqa", "name": "xquad_r"}, eval_datasets=["xquad_r"])
    with pytest.raises(TextSourceError, match="which this run evaluates on"):
        load_texts({"source": "tatoeba", "languages": ["amh"]}, eval_datasets=["xquad_r", "tatoeba"])
    sample = load_texts({"source": "tatoeba", "languages": ["amh"], "max_texts": 50}, seed=3)
    assert len(sample) == 50 and set(sample) <= set(amh)
    assert sample == load_texts({"source": "tatoeba", "languages": ["amh"], "max_texts": 50}, seed=3)


def test_text_source_errors_name_the_problem(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TextSourceError, match=r"adapt\.text\.path=.*holds no \.txt files"):
        load_texts({"source": "folder", "path": str(empty)})
    (empty / "blank.txt").write_text("\n   \n", encoding="utf-8")
    with pytest.raises(TextSourceError, match=r"1 \.txt file\(s\) hold no text"):
        load_texts({"source": "folder", "path": str(empty)})
    with pytest.raises(TextSourceError, match=r"adapt\.text\.path is not set"):
        load_texts({"source": "folder"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(TextSourceError, match=r"bad\.jsonl:2: no field 'text' .*\['body'\]"):
        load_texts({"source": "jsonl", "path": str(bad)})
    bad.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(TextSourceError, match=r"bad\.jsonl:1: field 'text' is int"):
        load_texts({"source": "jsonl", "path": str(bad)})
    bad.write_text('{"text": "a"\n', encoding="utf-8")
    with pytest.raises(TextSourceError, match=r"bad\.jsonl:1: not valid JSON"):
        load_texts({"source": "jsonl", "path": str(bad)})
    with pytest.raises(TextSourceError, match=r"unknown Tatoeba language code\(s\) \['xx'\]"):
        load_texts({"source": "tatoeba", "languages": ["amh", "xx"]})
    with pytest.raises(TextSourceError, match=r"unknown language\(s\) \['xx'\]"):
        load_texts({"source": "lareqa", "name": "xquad_r", "languages": ["xx"]})
    with pytest.raises(TextSourceError, match=r"adapt\.text\.source='web': expected one of"):
        load_texts({"source": "web"})
    with pytest.raises(TextSourceError, match=r"unknown option\(s\) \['colum'\]"):
        load_texts({"source": "jsonl", "path": str(bad), "colum": "x"})


# --------------------------------------------------------------------------------------------------- masking


def masked_counts(tokenizer: Any, settings: MLMSettings, rounds: int = 150) -> dict[str, Any]:
    batcher = _Batcher(tokenizer, 64)
    batch = batcher(SENTENCES)
    generator = torch.Generator().manual_seed(0)
    chosen_total = masked = randomised = kept = 0
    partial_words = 0
    per_round = []
    for _ in range(rounds):
        ids, labels = mask_tokens(batch["input_ids"], batch["maskable"], batch["word_ids"], settings,
                                  tokenizer.mask_token_id, batcher.random_ids, generator)
        chosen = labels != -100
        assert not chosen[~batch["maskable"]].any()  # never a special token or padding
        assert torch.equal(labels[chosen], batch["input_ids"][chosen])
        assert torch.equal(ids[~chosen], batch["input_ids"][~chosen])
        chosen_total += int(chosen.sum())
        per_round.append(chosen)
        masked += int((ids[chosen] == tokenizer.mask_token_id).sum())
        kept += int((ids[chosen] == batch["input_ids"][chosen]).sum())
        replaced = ids[chosen] != batch["input_ids"][chosen]
        randomised += int(((ids[chosen] != tokenizer.mask_token_id) & replaced).sum())
        for row in range(len(SENTENCES)):
            words = batch["word_ids"][row]
            for word in words[words >= 0].unique():
                status = chosen[row][words == word]
                partial_words += int(bool(status.any()) and not bool(status.all()))
    return {"maskable": int(batch["maskable"].sum()) * rounds, "chosen": chosen_total, "masked": masked,
            "random": randomised, "kept": kept, "partial_words": partial_words, "batch": batch}


def binomial_ok(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p))


def test_masking_rate_and_replacement_shares(tiny_encoder: Any) -> None:
    settings = MLMSettings(masking_rate=0.3, whole_word=False)
    counts = masked_counts(tiny_encoder.tokenizer, settings)
    assert binomial_ok(counts["chosen"], counts["maskable"], 0.3), counts
    assert binomial_ok(counts["masked"], counts["chosen"], 0.8)
    assert binomial_ok(counts["random"], counts["chosen"], 0.1)
    assert counts["partial_words"] > 0  # token-level masking cuts words apart
    other = masked_counts(tiny_encoder.tokenizer, MLMSettings(masking_rate=0.05, mask_token_prob=1.0,
                                                             random_token_prob=0.0), rounds=100)
    assert binomial_ok(other["chosen"], other["maskable"], 0.05)
    assert other["masked"] == other["chosen"] and other["random"] == 0


def test_whole_word_masking_masks_words_together_at_the_configured_rate(tiny_encoder: Any) -> None:
    counts = masked_counts(tiny_encoder.tokenizer, MLMSettings(masking_rate=0.25, whole_word=True), rounds=200)
    assert counts["partial_words"] == 0
    words = counts["batch"]["word_ids"]
    # The sentences do hold multi-token words (otherwise the test would prove nothing).
    sizes = [int((words[row] == w).sum()) for row in range(len(SENTENCES))
             for w in words[row][words[row] >= 0].unique()]
    assert max(sizes) >= 3
    # Each word is chosen with probability 0.25, so each token too; tokens of a word move together, hence a
    # looser bound than the binomial one (4 standard deviations here are about 0.03).
    assert abs(counts["chosen"] / counts["maskable"] - 0.25) < 0.03


# ------------------------------------------------------------------------------------------ head and warm-up


def test_new_head_is_tied_to_the_input_embeddings() -> None:
    encoder = fresh_tiny()
    head, pretrained = build_mlm_head(encoder.backbone, "auto")
    embeddings = encoder.backbone.get_input_embeddings()
    assert not pretrained  # the tiny model, like me5_small, has no MLM head
    assert head.decoder.weight is embeddings.weight
    assert head.decoder.weight.data_ptr() == embeddings.weight.data_ptr()
    hidden = torch.randn(3, encoder.backbone.config.hidden_size)
    before = head(hidden).detach()
    with torch.no_grad():
        # An edit of the embedding matrix is an edit of the decoder. Not a constant shift: the head's LayerNorm
        # output sums to zero, so adding the same number to every entry of row 5 would leave its logit unchanged.
        embeddings.weight[5] += torch.linspace(-1.0, 1.0, embeddings.weight.shape[1])
    assert not torch.allclose(head(hidden)[:, 5], before[:, 5])
    assert torch.allclose(head(hidden)[:, 6], before[:, 6])
    assert all(p is not embeddings.weight for p in head.own_parameters())


def test_new_head_bias_starts_at_the_corpus_token_frequencies(tiny_encoder: Any) -> None:
    tokenizer = tiny_encoder.tokenizer
    vocab = tiny_encoder.backbone.get_input_embeddings().num_embeddings
    prior = unigram_log_prior(tokenizer, SENTENCES * 3, vocab, max_length=64)
    assert prior.shape == (vocab,) and torch.exp(prior.double()).sum().item() == pytest.approx(1.0, abs=1e-6)
    ids = [i for text in SENTENCES for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    token = max(set(ids), key=ids.count)
    expected = math.log((3 * ids.count(token) + 1) / (3 * len(ids) + vocab))
    assert prior[token].item() == pytest.approx(expected, rel=1e-6)
    assert prior[tokenizer.mask_token_id].item() == pytest.approx(math.log(1 / (3 * len(ids) + vocab)), rel=1e-6)


def test_warm_up_trains_only_the_head() -> None:
    encoder = fresh_tiny()
    backbone = encoder.backbone
    backbone.train()
    original = {k: v.clone() for k, v in backbone.state_dict().items()}
    head, _ = build_mlm_head(backbone, "new")
    head_before = [p.detach().clone() for p in head.own_parameters()]
    settings = MLMSettings(head_lr=1e-2, masking_rate=0.3)
    batcher = _Batcher(encoder.tokenizer, 64)
    generator = torch.Generator().manual_seed(0)

    def batches():
        for _ in range(4):
            batch = batcher(SENTENCES)
            ids, labels = mask_tokens(batch["input_ids"], batch["maskable"], batch["word_ids"], settings,
                                      encoder.tokenizer.mask_token_id, batcher.random_ids, generator)
            yield {"input_ids": ids, "attention_mask": batch["attention_mask"], "labels": labels}

    assert warm_up_head(backbone, head, batches(), settings) == 4
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, original[key]), key  # embeddings (the tied decoder) included
    assert all(not torch.equal(p, q) for p, q in zip(head.own_parameters(), head_before))
    assert all(p.requires_grad for p in backbone.parameters()) and backbone.training  # restored


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_checkpoint_head_is_loaded_and_matches_transformers(tmp_path: Path, tiny_encoder: Any,
                                                            family: str) -> None:
    import transformers

    from hybrid_retrieval.models.encoder import load_encoder

    tokenizer = tiny_encoder.tokenizer  # the real e5 tokenizer, already loaded
    config_class, model_class = {"bert": ("BertConfig", "BertForMaskedLM"),
                                 "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForMaskedLM")}[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=64, pad_token_id=1)
    reference = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # a head that is clearly not a fresh one
        for name, parameter in reference.named_parameters():
            if name.startswith(("cls.", "lm_head.")) and parameter.dim() == 1:
                parameter.normal_()
    reference.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    encoder = load_encoder(name="mlm", source="hub", path=str(tmp_path))
    head, pretrained = build_mlm_head(encoder.backbone, "auto")
    assert pretrained
    batch = tokenizer(SENTENCES[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.backbone(**batch).last_hidden_state
        expected = reference(**batch).logits
        assert torch.allclose(head.eval()(hidden), expected, atol=1e-4)
    assert not build_mlm_head(encoder.backbone, "new")[1]


# -------------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_loss_decreases_on_a_tiny_repeated_corpus_and_only_the_backbone_changes() -> None:
    encoder = fresh_tiny()
    original = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    prefixes, pooling = dict(encoder.prefixes), encoder.pooling
    settings = MLMSettings(steps=12, head_warmup_steps=3, batch_size=8, lr=5e-3, head_lr=5e-3, warmup_ratio=0.1,
                           masking_rate=0.3, heldout_size=8, log_every=5, seed=0)
    logged: list[tuple[dict[str, float], int]] = []
    snapshots: dict[str, bool] = {}

    def log(metrics: dict[str, float], step: int) -> None:
        logged.append((dict(metrics), step))
        if "adapt/heldout_loss_before" in metrics:  # after the head warm-up, before MLM training
            snapshots["unchanged_at_before"] = all(torch.equal(v, original[k])
                                                   for k, v in encoder.backbone.state_dict().items())

    # The held-out texts are the training texts: memorising them must lower their loss.
    result = train_mlm(encoder, SENTENCES, SENTENCES, settings, log)
    assert snapshots["unchanged_at_before"]
    assert result["heldout_loss_after"] < result["heldout_loss_before"] - 1.0, result
    assert result["loss_last"] < result["loss_first"]
    assert result["heldout_perplexity_before"] == pytest.approx(math.exp(result["heldout_loss_before"]))
    changed = [k for k, v in encoder.backbone.state_dict().items() if not torch.equal(v, original[k])]
    assert "embeddings.word_embeddings.weight" in changed and any("encoder.layer.1" in k for k in changed)
    assert encoder.prefixes == prefixes and encoder.pooling == pooling
    names = {name for metrics, _ in logged for name in metrics}
    assert {"adapt/head_loss", "adapt/loss", "adapt/lr", "adapt/heldout_loss_before", "adapt/heldout_loss_after",
            "adapt/heldout_perplexity_before", "adapt/heldout_perplexity_after"} <= names
    assert [step for metrics, step in logged if "adapt/loss" in metrics] == [5, 10, 12]  # and the last step
    assert all("@" not in name for name in names)


def test_adapt_encoder_from_config_with_frozen_embeddings_and_fixed_heldout(data_root: Path) -> None:
    encoder = fresh_tiny()
    embeddings = encoder.backbone.get_input_embeddings().weight.detach().clone()
    cfg = mlm_config(text={"source": "tatoeba", "languages": ["swg", "tzl"]}, steps=2, head_warmup_steps=1,
                     batch_size=8, heldout_size=16, freeze_embeddings=True)
    result = adapt_encoder(encoder, cfg)
    assert result["heldout_texts"] == 16 and result["train_texts"] == len(load_texts(cfg["text"])) - 16
    assert torch.equal(encoder.backbone.get_input_embeddings().weight, embeddings)
    assert encoder.backbone.get_input_embeddings().weight.requires_grad  # the flag is restored
    # Same seed, same masks: a second fresh encoder starts from the same held-out loss.
    again = adapt_encoder(fresh_tiny(), cfg)
    assert again["heldout_loss_before"] == pytest.approx(result["heldout_loss_before"], rel=1e-6)
    assert adapt_encoder(encoder, {"method": "none"}) == {}


def test_adapt_config_errors_name_the_option() -> None:
    for key, value, expected in (("masking_rate", 1.5, r"adapt\.masking_rate=1\.5: expected a number in \(0, 1\)"),
                                 ("steps", 0, r"adapt\.steps=0: expected a positive integer"),
                                 ("head", "old", r"adapt\.head='old'"),
                                 ("random_token_prob", 0.5, r"adapt\.random_token_prob=0\.5: expected at most"),
                                 ("whole_word", "yes", r"adapt\.whole_word='yes': expected true or false")):
        with pytest.raises(AdaptConfigError, match=expected):
            check_adapt_config(mlm_config(**{key: value}))
    with pytest.raises(AdaptConfigError, match=r"unknown option\(s\) \['step'\]"):
        check_adapt_config(mlm_config(step=3))
    with pytest.raises(AdaptConfigError, match=r"adapt\.method='xlm'"):
        check_adapt_config({"method": "xlm"})
    with pytest.raises(AdaptConfigError, match=r"adapt\.text\.name='squad'"):
        check_adapt_config(mlm_config(text={"source": "lareqa", "name": "squad"}))
    with pytest.raises(AdaptConfigError, match="source=eval_corpus"):
        check_adapt_config(mlm_config(), eval_datasets=["mlqa_r"])  # the default reads MLQA-R
    assert check_adapt_config({"method": "none"}) is None
    with pytest.raises(AdaptConfigError, match=r"adapt\.heldout_size=8: the text source gave only 8 texts"):
        split_heldout(SENTENCES, 8, 0)


def test_driver_refuses_bad_input_before_the_mlflow_run(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from hybrid_retrieval.adapt import adapt

    empty = tmp_path / "texts"
    empty.mkdir()
    db = tmp_path / "mlflow.db"
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("adapt", overrides=["model=tiny", "adapt.text.source=folder", f"adapt.text.path={empty}",
                                          f"logger.tracking_uri=sqlite:///{db}", f"output={tmp_path / 'model'}"])
        with pytest.raises(TextSourceError, match=r"adapt\.text\.path=.*holds no \.txt files"):
            adapt(cfg)
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "file").write_text("x")
        busy = compose("adapt", overrides=["model=tiny", f"logger.tracking_uri=sqlite:///{db}",
                                           f"output={tmp_path / 'busy'}"])
        with pytest.raises(AdaptConfigError, match="not empty"):
            adapt(busy)
    assert not db.exists()  # no run was started


@pytest.mark.slow
def test_driver_end_to_end_writes_a_loadable_model_and_a_finished_run(tmp_path: Path, data_root: Path) -> None:
    from mlflow.tracking import MlflowClient

    from hybrid_retrieval.models.encoder import load_encoder

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "HYBRID_RETRIEVAL_DATA": str(data_root), "HYBRID_RETRIEVAL_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("HYBRID_RETRIEVAL_MLFLOW_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "hybrid_retrieval.adapt", "model=tiny", "adapt.text.source=tatoeba",
         "adapt.text.languages=[amh,swg]", "adapt.steps=4", "adapt.head_warmup_steps=2", "adapt.batch_size=8",
         "adapt.heldout_size=16", "adapt.log_every=2", "adapt.whole_word=true", f"logger.tracking_uri={uri}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "run" / "model"
    assert "held-out MLM loss" in proc.stdout and str(folder) in proc.stdout

    with pytest.warns(UserWarning, match="overrides the model config"):  # the folder's own settings win
        adapted = load_encoder(name="x", source="hub", path=str(folder))
    original = fresh_tiny()
    assert adapted.name == "tiny" and adapted.prefixes == original.prefixes and adapted.pooling == "mean"
    emb_adapted = adapted.encode(SENTENCES, kind="query")
    emb_original = original.encode(SENTENCES, kind="query")
    assert emb_adapted.shape == emb_original.shape and not np.allclose(emb_adapted, emb_original)
    report = json.loads((tmp_path / "run" / "adapt.json").read_text())

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for name in ("heldout_loss_before", "heldout_loss_after", "heldout_perplexity_before",
                 "heldout_perplexity_after"):
        assert metrics[f"adapt/{name}"] == pytest.approx(report[name])
    assert metrics["adapt/steps"] == 4 and "adapt/loss" in metrics and "adapt/texts" in metrics
    assert run.data.tags["job"] == "adapt" and run.data.tags["adapt_source"] == "tatoeba"
    assert run.data.tags["adapt_uses_eval_corpus"] == "false" and run.data.tags["model_dir"] == str(folder)
    assert run.data.params["adapt.whole_word"] == "True"
    history = client.get_metric_history(run.info.run_id, "adapt/loss")
    assert [m.step for m in history] == [2, 4]


@pytest.mark.slow
def test_the_low_resource_sweep_runs_end_to_end_on_the_tiny_model(tmp_path: Path, data_root: Path) -> None:
    """experiment=low_resource as README documents it, shrunk: no adaptation vs MLM on the el/ru/th/tr passages,
    then hybrid training, validated on XQuAD-R el/ru/th/tr and Tatoeba's low-resource languages; one report."""
    from tests.test_cli import REPO_ROOT, mlflow_client, run_command

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = run_command(["run.py", "-m", "experiment=low_resource", "adapt=none,mlm_target", "model=tiny",
                        "++adapt.steps=2", "++adapt.head_warmup_steps=2", "++adapt.heldout_size=8",
                        "++adapt.max_length=32", "++adapt.text.max_texts=40", "train.batch_size=8", "trainer.limit_train_batches=2",
                        "dataset.max_questions_per_language=10", "extra_datasets.tatoeba.max_pairs_per_language=20",
                        "trainer.enable_progress_bar=false", f"logger.tracking_uri={uri}",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}"], data_root, REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name("hybrid_retrieval")
    runs = {r.data.tags["adapt_method"] if "adapt_method" in r.data.tags else "none": r
            for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("job") == "train"}
    assert set(runs) == {"none", "mlm"}
    adapted = runs["mlm"]
    assert adapted.data.tags["adapt_uses_eval_corpus"] == "true"  # the explicit, logged choice
    assert "adapt/heldout_loss_after" in adapted.data.metrics
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert "val/tatoeba/low_resource/both/accuracy_at_1" in run.data.metrics
        assert {"val/xquad_r/mono/th/map", "val/xquad_r/cross/el-tr/map"} <= set(run.data.metrics)
    # The sweep's report: before/after rows for both arms, both evaluation sets.
    table = (tmp_path / "sweep" / "report" / "report.md").read_text()
    for label in ("adapt=none", "adapt=mlm", "adapt=mlm · before training", "**tatoeba**", "**xquad_r**"):
        assert label in table, label
