"""Export an :class:`Encoder` as a self-contained model folder that other tools load without this project.

The folder is at once:

* a transformers model (``config.json``, ``model.safetensors``, tokenizer files: ``AutoModel`` + ``AutoTokenizer``);
* a sentence-transformers model (``modules.json``: Transformer -> Pooling -> [Dense] -> [Truncate] -> [LanguageProjection] -> [Normalize],
  prompts ``query`` / ``document`` in ``config_sentence_transformers.json``), in the classic on-disk format of the
  models on the hub, which old and new sentence-transformers releases read alike;
* this project's model (``hybrid_retrieval.json``: the encoder settings, read back by ``load_encoder(path=...)``),

with a ``README.md`` model card. Writing goes to a hidden temporary folder that is renamed at the end, so an
interrupted export never leaves a half-written folder under the final name.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from torch import nn

from hybrid_retrieval.models.dense import DENSE_WEIGHTS, dense_linear, save_dense
from hybrid_retrieval.models.encoder import Encoder
from hybrid_retrieval.models.loading import SETTINGS_FILE, SETTINGS_FORMAT, quiet_transformers
from hybrid_retrieval.run_folder import HYDRA_CONFIG, RUN_INFO
from hybrid_retrieval.storage import DiskFullError, free_bytes, reporting_disk_full

__all__ = ["DATASET_FACTS", "TRAINING_KEYS", "DataFacts", "card_metadata", "data_license", "encoder_settings",
           "export_encoder", "read_mteb_results", "read_run_config", "read_run_results", "render_model_card",
           "run_card", "run_model_name", "training_data"]

DENSE_FOLDER = "2_Dense"
TRUNCATE_FOLDER = "Truncate"  # <idx>_Truncate: the first model.truncate_dim components, before Normalize
PROJECTION_FOLDER = "LanguageProjection"  # <idx>_LanguageProjection: I - B B^T (model.language_projection)


def _activation_name(dense: nn.Module) -> str:
    activation = dense[1] if isinstance(dense, nn.Sequential) and len(dense) > 1 else nn.Identity()
    return type(activation).__name__.lower()


def encoder_settings(encoder: Encoder) -> dict[str, Any]:
    """The settings that rebuild `encoder` around its weights (what ``hybrid_retrieval.json`` holds)."""
    dense = None
    if encoder.dense is not None:
        linear = dense_linear(encoder.dense)
        dense = {"folder": DENSE_FOLDER, "out_features": int(linear.out_features),
                 "activation": _activation_name(encoder.dense), "bias": linear.bias is not None}
    return {
        "name": encoder.name,
        "pooling": encoder.pooling,
        "normalize": encoder.normalize,
        "dense": dense,
        "query_prefix": encoder.prefixes["query"],
        "passage_prefix": encoder.prefixes["passage"],
        "max_query_length": encoder.max_lengths["query"],
        "max_passage_length": encoder.max_lengths["passage"],
    }


# ------------------------------------------------------------------------------------------ sentence-transformers


def _takes_pooling_flag(backbone: nn.Module) -> bool:
    import inspect

    return not getattr(backbone, "pooler", None) and \
        "add_pooling_layer" in inspect.signature(type(backbone).__init__).parameters


def _sentence_transformers_files(encoder: Encoder, folder: Path) -> None:
    """modules.json and the module folders, in the classic format (``sentence_transformers.models.*`` names,
    ``pooling_mode_*`` flags) of the models on the hub, which every sentence-transformers release reads
    (``prompt_name`` needs 2.4 or later; tested with 6.2)."""
    hidden = int(encoder.backbone.config.hidden_size)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    # The project truncates passages at max_passage_length and queries earlier; sentence-transformers has one
    # limit for both, and passages are the long side.
    st_config: dict[str, Any] = {"max_seq_length": encoder.max_lengths["passage"], "do_lower_case": False}
    if _takes_pooling_flag(encoder.backbone):
        # The exported backbone has no pooler (retrieval never uses it): without this flag sentence-transformers
        # builds a random one and reports it as missing weights.
        st_config["model_args"] = {"add_pooling_layer": False}
    _write_json(folder / "sentence_bert_config.json", st_config)
    # Only the keys every release knows (LaBSE's own 1_Pooling/config.json has exactly these).
    pooling = {"word_embedding_dimension": hidden, "pooling_mode_cls_token": encoder.pooling == "cls",
               "pooling_mode_mean_tokens": encoder.pooling == "mean", "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False}
    _write_json(folder / "1_Pooling" / "config.json", pooling)
    if encoder.dense is not None:
        save_dense(encoder.dense, folder / DENSE_FOLDER)
        config_file = folder / DENSE_FOLDER / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        activation = encoder.dense[1] if isinstance(encoder.dense, nn.Sequential) and len(encoder.dense) > 1 \
            else nn.Identity()
        # sentence-transformers imports this dotted name; nn.Identity, for one, lives outside ...activation.
        config["activation_function"] = f"{type(activation).__module__}.{type(activation).__name__}"
        _write_json(config_file, config)
        modules.append({"idx": 2, "name": "2", "path": DENSE_FOLDER, "type": "sentence_transformers.models.Dense"})
    if encoder.truncate_dim is not None:
        # The first k components as a module (a Dense layer holding the k x d identity slice), then Normalize:
        # what encode() returns is unit-length, as this project's truncated embeddings are, for encode, similarity
        # and inner-product indexes alike (sentence-transformers' own truncate_dim cuts after Normalize).
        idx = len(modules)
        path = f"{idx}_{TRUNCATE_FOLDER}"
        width = dense_linear(encoder.dense).out_features if encoder.dense is not None else hidden
        _save_truncation(width, encoder.truncate_dim, folder / path)
        modules.append({"idx": idx, "name": str(idx), "path": path, "type": "sentence_transformers.models.Dense"})
    projection = getattr(encoder, "language_projection", None)
    if projection is not None:
        # I - B B^T (models/language_projection.py) as a Dense module, then Normalize: what encode() returns.
        idx = len(modules)
        path = f"{idx}_{PROJECTION_FOLDER}"
        _save_dense_matrix(projection.matrix(), folder / path)
        projection.save(folder)  # read back by load_encoder(path=...)
        modules.append({"idx": idx, "name": str(idx), "path": path, "type": "sentence_transformers.models.Dense"})
    if encoder.normalize or encoder.truncate_dim is not None or projection is not None:
        idx = len(modules)
        path = f"{idx}_Normalize"
        (folder / path).mkdir()
        modules.append({"idx": idx, "name": str(idx), "path": path, "type": "sentence_transformers.models.Normalize"})
    _write_json(folder / "modules.json", modules)
    import torch
    import transformers

    _write_json(folder / "config_sentence_transformers.json", {
        "__version__": {"transformers": transformers.__version__, "pytorch": torch.__version__},
        # "query" and "document": the names MTEB and sentence-transformers' encode_query / encode_document read (a
        # third name makes MTEB warn that the prompt is not valid).
        "prompts": {"query": encoder.prefixes["query"], "document": encoder.prefixes["passage"]},
        "default_prompt_name": None,
        # Unnormalised embeddings are scored by inner product in this project, so say so.
        # Truncated embeddings are re-normalised (the truncation module): unit vectors, scored by cosine.
        "similarity_fn_name": "cosine" if encoder.normalize or encoder.truncate_dim is not None
        or projection is not None else "dot",
    })


def _save_dense_matrix(matrix: Any, folder: Path) -> None:
    """A sentence-transformers Dense module (no bias, identity activation) computing ``matrix @ x``."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weight = torch.as_tensor(matrix, dtype=torch.float32).contiguous()
    _write_json(folder / "config.json", {"in_features": int(weight.shape[1]), "out_features": int(weight.shape[0]),
                                         "bias": False, "activation_function": "torch.nn.modules.linear.Identity"})
    save_file({"linear.weight": weight}, str(folder / DENSE_WEIGHTS))


def _save_truncation(width: int, dim: int, folder: Path) -> None:
    """A sentence-transformers Dense module (no bias, identity activation) whose output is its input's first
    `dim` of `width` components."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", {"in_features": width, "out_features": dim, "bias": False,
                                         "activation_function": "torch.nn.modules.linear.Identity"})
    save_file({"linear.weight": torch.eye(dim, width).contiguous()}, str(folder / DENSE_WEIGHTS))


# ------------------------------------------------------------------------------------------------- model card
#
# The card's front matter is huggingface_hub's ModelCardData (model-index through EvalResult), so the hub reads
# what it expects: language, license, datasets, base_model, metrics, library_name, pipeline_tag, tags. The card
# never holds a local absolute path (data roots, tracking URIs, checkpoint files): see _no_local_paths.

CARD_TAGS = ["sentence-transformers", "feature-extraction", "sentence-similarity", "dense-retrieval",
             "hybrid_retrieval"]
# Parts of a run's config that describe how the model was trained (the card's "Training configuration").
TRAINING_KEYS = ("model", "adapt", "sampler", "loss", "matryoshka", "distill", "train", "trainer", "train_data",
                 "dataset", "extra_datasets", "hardware")
MTEB_URL = "https://github.com/embeddings-benchmark/mteb"
# This project's local MTEB tasks (hybrid_retrieval.evaluation.mteb_tasks; not imported, it imports mteb): their
# results name a dataset revision "local..." and the task a dataset prefix (XQuADRMonolingual, MLQARMultilingual).
LOCAL_MTEB_PREFIXES = {"XQuADR": "xquad_r", "MLQAR": "mlqa_r"}

# How far a licence restricts reuse, least to most (see data_license).
PERMISSIVE, ATTRIBUTION, SHARE_ALIKE, NON_COMMERCIAL, UNKNOWN_TERMS = range(5)
RESTRICTIONS = ("permissive", "attribution only", "share-alike", "non-commercial", "terms unknown")


@dataclass(frozen=True)
class DataFacts:
    """What a model card says about a dataset: its name, Hugging Face dataset id, licence and origin."""

    label: str
    hub_id: str | None  # None where the hub has no copy of the dataset
    license: str  # the hub's licence id ("other" where none fits)
    terms: str  # the licence in words
    restriction: int  # PERMISSIVE ... UNKNOWN_TERMS
    source: str  # where the data comes from
    hub_split: str | None = None  # the hub split that evaluation results on this data correspond to
    license_name: str | None = None  # for license "other"
    license_link: str | None = None


LAREQA_URL = "https://github.com/google-research-datasets/lareqa"
DATASET_FACTS: dict[str, DataFacts] = {
    "xquad_r": DataFacts("XQuAD-R", "google-research-datasets/xquad_r", "cc-by-sa-4.0", "CC BY-SA 4.0", SHARE_ALIKE,
                         LAREQA_URL, hub_split="validation"),
    # Removed from the LAReQA repository later (hybrid_retrieval.data.sources pins the commit); no hub copy.
    "mlqa_r": DataFacts("MLQA-R", None, "cc-by-nc-4.0", "CC BY-NC 4.0", NON_COMMERCIAL,
                        f"{LAREQA_URL}/tree/354d67d1cd066854cdfbf5ad0e6105528976141d/mlqa-r"),
    "squad_es": DataFacts("SQuAD-es", "ccasimiro/squad_es", "cc-by-4.0", "CC BY 4.0", ATTRIBUTION,
                          "https://github.com/ccasimiro88/TranslateAlignRetrieve"),
    "squad_it": DataFacts("SQuAD-it", "crux82/squad_it", "cc-by-sa-4.0", "CC BY-SA 4.0", SHARE_ALIKE,
                          "https://github.com/crux82/squad-it"),
    # mMARCO's code and translations are Apache-2.0, but the queries and passages are MS MARCO's: Microsoft's terms
    # (non-commercial research purposes only), which no hub licence id names.
    "mmarco": DataFacts("mMARCO", "unicamp-dl/mmarco", "other",
                        "Apache-2.0 (code and translations) over MS MARCO's queries and passages, whose terms allow "
                        "non-commercial research use only", NON_COMMERCIAL, "https://github.com/unicamp-dl/mMARCO",
                        license_name="ms-marco", license_link="https://microsoft.github.io/msmarco/"),
    # Evaluation sets (and adaptation text) only.
    "tatoeba": DataFacts("Tatoeba", "mteb/tatoeba-bitext-mining", "cc-by-2.0", "CC BY 2.0 FR", ATTRIBUTION,
                         "https://github.com/facebookresearch/LASER/tree/main/data/tatoeba/v1", hub_split="test"),
    "miracl": DataFacts("MIRACL", "miracl/miracl", "apache-2.0", "Apache-2.0", PERMISSIVE,
                        "https://project-miracl.github.io"),
}
DATASET_LABELS = {name: facts.label for name, facts in DATASET_FACTS.items()}
SETTING_LABELS = {"mono": "monolingual", "cross": "cross-lingual", "multi": "multilingual"}
METRIC_LABELS = {"map": "MAP", "ndcg_at_10": "nDCG@10", "mrr_at_10": "MRR@10", "recall_at_1": "R@1",
                 "recall_at_10": "R@10", "recall_at_100": "R@100", "accuracy_at_1": "Accuracy@1",
                 "main_score": "main score"}


def own_data(what: str) -> DataFacts:
    """Facts of data this project knows nothing about (your jsonl / parquet / hf files): licence unknown."""
    return DataFacts(f"your data ({what})", None, "other", "unknown to hybrid_retrieval", UNKNOWN_TERMS, what)


def data_license(data: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The model's licence from the data that trained its weights (``training_data`` entries of :func:`run_card`):
    ``{"license", "license_name", "license_link", "reason"}``.

    Rule: the most restrictive licence among the training data is the model's. Restrictions rank
    non-commercial > share-alike > attribution-only > permissive; data whose terms this project does not know (your
    own files) rank above all, and the licence is then ``other`` with a request to set it. Where the most
    restrictive data do not share one licence id, the licence is ``other``. Evaluation data never set it.
    """
    top = max(int(d["restriction"]) for d in data)
    strictest = [d for d in data if int(d["restriction"]) == top]
    ids = sorted({str(d["license"]) for d in strictest})
    license_id = ids[0] if len(ids) == 1 else "other"
    named = [d for d in strictest if d.get("license_name")]
    chosen = named[0] if license_id == "other" and len(strictest) == 1 and named else None
    which = ", ".join(dict.fromkeys(f"{d['label']} ({d['terms']})" for d in strictest))
    if top == UNKNOWN_TERMS:
        reason = (f"The licence is `other` because the weights were trained on "
                  f"{', '.join(dict.fromkeys(d['label'] for d in strictest))}, whose licence hybrid_retrieval "
                  "cannot know: set the license of your data in this card (`license`, and for `other` "
                  "`license_name` / `license_link`, in the front matter): the most restrictive of its licence and "
                  "those of the other training data listed.")
    else:
        reason = (f"The licence is `{license_id}` because the weights were trained on {which}, the most "
                  f"restrictive licence of the training data ({RESTRICTIONS[top]}): the card takes the most "
                  "restrictive one, ranking non-commercial > share-alike > attribution-only > permissive.")
        if top == NON_COMMERCIAL:
            reason += " Use this model for non-commercial purposes only."
    return {"license": license_id, "license_name": chosen["license_name"] if chosen else None,
            "license_link": chosen.get("license_link") if chosen else None, "reason": reason}


# ------------------------------------------------------------------------------------- paths, names, configs

_FILE_URI = re.compile(r"^(?:file|sqlite)://+(?=/)|^(?:file|sqlite):(?=/)")
_ABSOLUTE = re.compile(r"^(?:/|~|[A-Za-z]:[\\/]|\\\\)")


def local_path_name(text: str) -> str:
    """An absolute local path, or a ``file:`` / ``sqlite:`` URI of one, as its last part (a card never names the
    folders of the machine it was written on); any other text as it is."""
    path = _FILE_URI.sub("", text)
    if not _ABSOLUTE.match(path):
        return text
    return PureWindowsPath(path).name if "\\" in path else PurePosixPath(path).name


def _no_local_paths(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _no_local_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_local_paths(v) for v in value]
    return local_path_name(value) if isinstance(value, str) else value


def hub_model_id(value: Any) -> str | None:
    """`value` when it names a model on the hub (``org/name`` or ``name``), else None (a local path, nothing)."""
    text = str(value or "")
    if not text or _ABSOLUTE.match(text) or text.startswith(".") or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text):
        return None
    return None if Path(text).exists() else text


def run_model_name(run_dir: Path, base: str) -> str:
    """The name a model fine-tuned in ``run_dir`` goes by (MTEB results, model cards): ``<base>-ft-<run>``, the run
    being the folder's last two parts (``2026-12-04_15-06-38``, or ``15-06-38_3`` for a sweep's job 3): never the
    base model's own name, so results of the two are never filed together."""
    run = "_".join(Path(run_dir).resolve().parts[-2:])
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{base}-ft-{run}")


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The config a run folder's run started with (``run_info.json``, else ``.hydra/config.yaml``; {} without
    either), in today's spelling (:func:`hybrid_retrieval.upgrade.upgrade_config`), its interpolations resolved
    where they can be."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    config: Any = None
    info_file = run_dir / RUN_INFO
    if info_file.is_file():
        try:
            config = json.loads(info_file.read_text(encoding="utf-8")).get("config")
        except (ValueError, AttributeError):
            config = None
    if not isinstance(config, Mapping) and (run_dir / HYDRA_CONFIG).is_file():
        config = OmegaConf.to_container(OmegaConf.load(run_dir / HYDRA_CONFIG), resolve=False)
    if not isinstance(config, Mapping):
        return {}
    from hybrid_retrieval.upgrade import upgrade_config

    node = OmegaConf.create(upgrade_config(dict(config)))  # what an older version wrote, in today's spelling
    try:
        return dict(OmegaConf.to_container(node, resolve=True))
    except Exception:  # an interpolation that needs Hydra (or is broken): resolve part by part
        raw = dict(OmegaConf.to_container(node, resolve=False))
        resolved: dict[str, Any] = {}
        for key, value in raw.items():
            try:
                part = node[key]
                resolved[key] = OmegaConf.to_container(part, resolve=True) if OmegaConf.is_config(part) else part
            except Exception:
                resolved[key] = value
        return resolved


def _dataset_label(dataset: Mapping[str, Any] | None, fallback: str) -> str:
    dataset = dataset or {}
    name = str(dataset.get("name", fallback))
    label = DATASET_LABELS.get(name, name)
    details = []
    if dataset.get("languages"):
        details.append(", ".join(map(str, dataset["languages"])))
    if dataset.get("max_questions_per_language"):
        details.append(f"{dataset['max_questions_per_language']} questions per language")
    return f"{label} ({'; '.join(details)})" if details else label


def read_run_results(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every evaluation set's final validation in a run folder: ``metrics.json`` (the main ``dataset``) and
    ``<key>_metrics.json`` (each of ``extra_datasets``), named from the run's config when present.

    Returns ``{key: {"type": dataset name, "name": label, "dataset": Hugging Face dataset id or None, "split": its
    split, "summary": {setting: {metric: value}}}}`` (empty when the folder has no metrics)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    main = config.get("dataset") if isinstance(config.get("dataset"), Mapping) else None
    extras = config.get("extra_datasets") if isinstance(config.get("extra_datasets"), Mapping) else {}
    files: dict[str, tuple[Path, Mapping[str, Any] | None]] = {}
    if (run_dir / "metrics.json").is_file():
        files[str(main.get("name")) if main else "main"] = (run_dir / "metrics.json", main)
    for path in sorted(run_dir.glob("*_metrics.json")):
        key = path.name[:-len("_metrics.json")]
        files[key] = (path, extras.get(key) if isinstance(extras.get(key), Mapping) else None)
    results: dict[str, dict[str, Any]] = {}
    for key, (path, dataset) in files.items():
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, Mapping) and isinstance(data.get("summary"), Mapping):
            name = str((dataset or {}).get("name", key))
            facts = DATASET_FACTS.get(name)
            results[key] = {"type": name, "name": _dataset_label(dataset, key),
                            "dataset": facts.hub_id if facts else None,
                            "split": (facts.hub_split if facts else None) or (dataset or {}).get("split"),
                            "summary": data["summary"]}
    return results


def _dataset_languages(name: str, languages: Any) -> list[str] | None:
    """A dataset's configured languages, all of them when null; None where they are not known."""
    if languages:
        return [str(x) for x in ([languages] if isinstance(languages, str) else languages)]
    try:
        if name in ("xquad_r", "mlqa_r"):
            from hybrid_retrieval.data.sources import dataset_languages

            return dataset_languages(name)
        if name == "tatoeba":
            from hybrid_retrieval.data.tatoeba import LANGUAGES

            return [*LANGUAGES, "en"]  # every pair is X <-> English
        if name == "miracl":
            from hybrid_retrieval.data.miracl import LANGUAGES

            return list(LANGUAGES)
    except ImportError:
        return None
    return None


def _fact_entry(facts: DataFacts, languages: list[str] | None, role: str) -> dict[str, Any]:
    return {**asdict(facts), "languages": languages, "role": role}


def training_data(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every dataset that trained the weights (``train_data.datasets``, and ``adapt.text`` when adapting), as
    :class:`DataFacts` fields plus ``languages`` (None where unknown) and ``role``."""
    entries: list[dict[str, Any]] = []
    train_data = config.get("train_data") if isinstance(config.get("train_data"), Mapping) else {}
    for entry in train_data.get("datasets") or []:
        if not isinstance(entry, Mapping):
            continue
        target = str(entry.get("_target_", "")).rsplit(".", 1)[-1]
        name = str(entry.get("name") or "")
        if target == "from_lareqa" and name in DATASET_FACTS:
            entries.append(_fact_entry(DATASET_FACTS[name], _dataset_languages(name, entry.get("languages")),
                                       "training pairs"))
        elif target == "from_squad" and isinstance(entry.get("files"), Mapping):
            for language, file in entry["files"].items():
                text = str(file).replace("\\", "/")
                facts = (DATASET_FACTS["squad_es"] if "squad-es/" in text else
                         DATASET_FACTS["squad_it"] if "squad-it/" in text else own_data(local_path_name(str(file))))
                entries.append(_fact_entry(facts, [str(language)], "training pairs"))
        elif target == "from_mmarco":
            try:
                from hybrid_retrieval.data.mmarco import mmarco_languages

                languages: list[str] | None = [code for _, code in mmarco_languages(entry.get("languages"))]
            except (ImportError, ValueError):
                languages = None
            entries.append(_fact_entry(DATASET_FACTS["mmarco"], languages, "training pairs"))
        else:  # from_jsonl, from_parquet, from_hf, or a reader of your own
            path = str(entry.get("path") or name or target or "data")
            hub = hub_model_id(path) if target == "from_hf" and "/" in path else None
            facts = own_data(local_path_name(path))
            if hub:
                facts = DataFacts(f"{hub} (Hugging Face dataset)", hub, "other", facts.terms, UNKNOWN_TERMS,
                                  f"https://huggingface.co/datasets/{hub}")
            entries.append(_fact_entry(facts, None, "training pairs"))
    adapt = config.get("adapt") if isinstance(config.get("adapt"), Mapping) else {}
    text = adapt.get("text") if isinstance(adapt.get("text"), Mapping) else None
    if adapt.get("method") not in (None, "none") and text:
        source, name = str(text.get("source") or ""), str(text.get("name") or "")
        role = f"adaptation text ({adapt.get('method')})"
        if source in ("lareqa", "eval_corpus", "tatoeba") and (name or source) in DATASET_FACTS:
            key = name if source != "tatoeba" else "tatoeba"
            entries.append(_fact_entry(DATASET_FACTS[key], _dataset_languages(key, text.get("languages")), role))
        elif text.get("hub_name"):
            hub = str(text["hub_name"])
            entries.append(_fact_entry(DataFacts(f"{hub} (Hugging Face dataset)", hub, "other",
                                                 "unknown to hybrid_retrieval", UNKNOWN_TERMS,
                                                 f"https://huggingface.co/datasets/{hub}"), None, role))
        else:
            entries.append(_fact_entry(own_data(local_path_name(str(text.get("path") or source))), None, role))
    unique: list[dict[str, Any]] = []
    for entry in entries:
        if entry not in unique:
            unique.append(entry)
    return unique


def card_languages(config: Mapping[str, Any], data: Sequence[Mapping[str, Any]]) -> list[str]:
    """ISO codes of the training data's and the evaluation sets' languages, sorted."""
    languages = {str(x) for d in data for x in (d.get("languages") or [])}
    sets = [config.get("dataset")]
    if isinstance(config.get("extra_datasets"), Mapping):
        sets += list(config["extra_datasets"].values())
    for dataset in sets:
        if isinstance(dataset, Mapping) and dataset.get("name"):
            languages.update(_dataset_languages(str(dataset["name"]), dataset.get("languages")) or [])
    return sorted(languages)


def _describe_dataset(entry: Any) -> str:
    """One training dataset entry as a line: ``mlqa_r (languages=[en, de], max_groups=60)``."""
    if not isinstance(entry, Mapping):
        return str(entry)

    def plain(value: Any) -> str:
        return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else str(value)

    settings = ", ".join(f"{k}={plain(v)}" for k, v in entry.items()
                         if not str(k).startswith("_") and k != "name" and v is not None)
    return f"{entry.get('name', 'dataset')} ({settings})" if settings else str(entry.get("name", entry))


def read_mteb_results(run_dir: Path) -> list[dict[str, Any]]:
    """MTEB's results filed under the run folder (``<run>/mteb/results/...``, as ``python -m hybrid_retrieval.mteb``
    writes them): the newest result file of each task, one entry per split and subset with its main score, the
    dataset's hub id (None where there is none) and the file, relative to the run folder."""
    run_dir = Path(run_dir).resolve()
    folder = run_dir / "mteb" / "results"
    if not folder.is_dir():
        return []
    newest: dict[str, tuple[float, Path, Mapping[str, Any]]] = {}
    for path in sorted(folder.rglob("*.json")):
        if path.name == "model_meta.json":
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, Mapping) or not data.get("task_name") or not isinstance(data.get("scores"), Mapping):
            continue
        task, mtime = str(data["task_name"]), path.stat().st_mtime
        if task not in newest or mtime > newest[task][0]:
            newest[task] = (mtime, path, data)
    entries = []
    for task in sorted(newest):
        _, path, data = newest[task]
        revision = str(data.get("dataset_revision") or "") or None
        info = _mteb_task(task, local=str(revision or "").startswith("local"))
        for split, subsets in data["scores"].items():
            for subset in subsets if isinstance(subsets, list) else []:
                value = subset.get("main_score") if isinstance(subset, Mapping) else None
                if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                    continue
                entries.append({"task": task, "subset": str(subset.get("hf_subset", "default")),
                                "split": info["split"] or str(split), "metric": _main_metric(subset, info["metric"]),
                                "value": float(value), "dataset": info["dataset"],
                                "revision": revision or info["revision"], "local": info["local"],
                                "task_type": info["task_type"], "file": path.relative_to(run_dir).as_posix()})
    return entries


def _mteb_task(task: str, local: bool) -> dict[str, Any]:
    """Where an MTEB task's data is on the hub, and its main score's name: this project's local tasks map to their
    dataset's hub id; MTEB's own come from its task metadata (when ``mteb`` is installed)."""
    if local:
        name = next((name for prefix, name in LOCAL_MTEB_PREFIXES.items() if task.startswith(prefix)), None)
        facts = DATASET_FACTS.get(name or "")
        return {"dataset": facts.hub_id if facts else None, "split": facts.hub_split if facts else None,
                "revision": None, "metric": None, "task_type": "text-retrieval", "local": True}
    try:
        import mteb

        metadata = mteb.get_task(task).metadata
        types = metadata._hf_task_type() if hasattr(metadata, "_hf_task_type") else [str(metadata.type).lower()]
        return {"dataset": metadata.dataset.get("path"), "split": None, "revision": metadata.dataset.get("revision"),
                "metric": metadata.main_score, "task_type": types[0] if types else "text-retrieval", "local": False}
    except Exception:  # mteb missing, or a task it does not know: the card's text lists the scores
        return {"dataset": None, "split": None, "revision": None, "metric": None, "task_type": "retrieval",
                "local": False}


def _main_metric(subset: Mapping[str, Any], named: str | None) -> str:
    """The name of a result's main score: the task's, else the score whose value it is (``map``, ``ndcg_at_10``
    first)."""
    value = subset.get("main_score")
    if named:
        return named
    keys = ["map", "ndcg_at_10", *sorted(k for k in subset if k not in ("main_score", "hf_subset"))]
    return next((k for k in keys if isinstance(subset.get(k), (int, float)) and subset[k] == value), "main_score")


def run_card(run_dir: Path, checkpoint_file: str | Path | None = None, model: Mapping[str, Any] | None = None,
             checkpoint_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model card (the `card` of :func:`export_encoder`) of weights trained in the run folder `run_dir`: what
    ``run.py``'s own export and ``python -m hybrid_retrieval.export`` both write.

    From the folder: the run's config (training configuration, training data, their licences and languages, the
    evaluation sets), every evaluation set's final validation (:func:`read_run_results`), MTEB results under
    ``<run>/mteb/`` (:func:`read_mteb_results`). From the checkpoint (``model`` and ``checkpoint_info`` when the
    caller has read it, else read from `checkpoint_file`): the model config (the base model) and its step. Local
    absolute paths become their last part.
    """
    run_dir = Path(run_dir).resolve()
    if checkpoint_file is not None and (model is None or checkpoint_info is None):
        from hybrid_retrieval.models.checkpoint import read_checkpoint

        checkpoint = read_checkpoint(checkpoint_file)  # memory-mapped: the weights are not read
        model = dict(checkpoint.model) if model is None else model
        checkpoint_info = dict(checkpoint.info) if checkpoint_info is None else checkpoint_info
    config = read_run_config(run_dir)
    model = dict(model or (config.get("model") if isinstance(config.get("model"), Mapping) else None) or {})
    card: dict[str, Any] = {}
    base = None if model.get("path") else hub_model_id(model.get("checkpoint"))
    if base:
        card["base_model"] = base
    if config:
        card["training"] = _no_local_paths({k: config[k] for k in TRAINING_KEYS if k in config} or config)
        data = _no_local_paths((config.get("train_data") or {}).get("datasets") or []) \
            if isinstance(config.get("train_data"), Mapping) else []
        if data:
            card["data"] = [_describe_dataset(d) for d in data]
        card["training_data"] = training_data(config)
        card["languages"] = card_languages(config, card["training_data"])
    else:
        card["training"] = {"model": _no_local_paths({k: v for k, v in model.items() if not str(k).startswith("_")})}
    card["results"] = read_run_results(run_dir)
    if not card["results"] and (run_dir / "metrics.json").is_file():
        card["metrics"] = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    if config or card["results"]:  # a run folder: the model is named after the run
        card["model_name"] = run_model_name(run_dir, str(model.get("name", "model")))
    mteb = read_mteb_results(run_dir)
    if mteb:
        card["mteb"] = mteb
    if checkpoint_file is not None:
        path = Path(checkpoint_file).resolve()
        name = path.relative_to(run_dir).as_posix() if path.is_relative_to(run_dir) else path.name
        card["checkpoint"] = {"file": name, **_no_local_paths(dict(checkpoint_info or {}))}
    return card


# ---------------------------------------------------------------------------------------------- rendering


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    """A nested ``{row: {column: value}}`` mapping (e.g. metrics.json's summary) as one table, else key | value."""
    summary = metrics.get("summary") if isinstance(metrics.get("summary"), Mapping) else metrics
    if summary and all(isinstance(v, Mapping) for v in summary.values()):
        columns = list(dict.fromkeys(c for row in summary.values() for c in row))
        lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for row, values in summary.items():
            lines.append(f"| {row} | " + " | ".join(_cell(values.get(c, "")) for c in columns) + " |")
        return lines
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in summary.items() if not isinstance(v, Mapping)]
    return lines


def _eval_results(results: Mapping[str, Mapping[str, Any]], mteb: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The ``model-index`` as huggingface_hub EvalResults: one per evaluation set x setting x metric, for the sets
    whose data has a hub id (the type: the plain metric name; the setting: the dataset config), the card-body-only
    bias measures left out; then MTEB's main scores."""
    from huggingface_hub import EvalResult

    from hybrid_retrieval.evaluation.metrics import BIAS_METRICS

    entries: list[Any] = []
    taken: set[tuple[Any, ...]] = set()
    for key, result in results.items():
        dataset = result.get("dataset")
        if not dataset:
            continue
        for setting, values in result["summary"].items():
            if not isinstance(values, Mapping):
                continue
            config = str(setting)
            if ("retrieval", dataset, config, result.get("split")) in taken:  # two sets on the same data
                config = f"{setting}-{key}"
            taken.add(("retrieval", dataset, config, result.get("split")))
            label = SETTING_LABELS.get(str(setting), str(setting))
            for metric, value in values.items():
                if metric in BIAS_METRICS or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                    continue
                entries.append(EvalResult(
                    task_type="retrieval", task_name="Retrieval", dataset_type=str(dataset),
                    dataset_name=f"{result.get('name', key)}, {label}", dataset_config=config,
                    dataset_split=result.get("split"), metric_type=str(metric),
                    metric_name=METRIC_LABELS.get(str(metric), str(metric)), metric_value=round(float(value), 6)))
    for entry in mteb:
        if not entry.get("dataset"):
            continue
        # A local task reads this project's copy of the data (possibly a slice: its revision says which), not the
        # hub's revision of it.
        local = f"; local data, {entry['revision']}" if entry.get("local") and entry.get("revision") else ""
        entries.append(EvalResult(
            task_type=str(entry["task_type"]), task_name=str(entry["task"]), dataset_type=str(entry["dataset"]),
            dataset_name=f"MTEB {entry['task']} ({entry['subset']}{local})", dataset_config=str(entry["subset"]),
            dataset_split=str(entry["split"]), dataset_revision=None if entry.get("local") else entry.get("revision"),
            metric_type=str(entry["metric"]), metric_name=METRIC_LABELS.get(str(entry["metric"]), str(entry["metric"])),
            metric_value=round(float(entry["value"]), 6), source_name="MTEB", source_url=MTEB_URL))
    return entries


def _results_tables(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines: list[str] = []
    for key, result in results.items():
        where = (f"Hugging Face dataset `{result['dataset']}`" + (f", split `{result['split']}`"
                                                                  if result.get("split") else "")
                 if result.get("dataset") else "no Hugging Face dataset id: in this table only, not in the "
                 "model-index")
        lines += [f"**{result.get('name', key)}** (`{key}`; {where})", "",
                  *_metrics_table({"summary": result["summary"]}), ""]
    return lines


def _data_lines(data: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for d in data:
        languages = f"; {', '.join(d['languages'])}" if d.get("languages") else ""
        where = (f"[`{d['hub_id']}`](https://huggingface.co/datasets/{d['hub_id']})" if d.get("hub_id") else
                 f"not on the Hugging Face hub ({d['source']})" if d.get("source", "").startswith("http") else
                 "not on the Hugging Face hub")
        lines.append(f"- **{d['label']}** ({d['role']}{languages}): {d['terms']}; {where}")
    return lines


def _yaml_block(value: Any) -> list[str]:
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(OmegaConf.create(value)) if isinstance(value, (Mapping, list)) else f"{value}\n"
    return ["```yaml", *text.rstrip("\n").splitlines(), "```"]


def card_metadata(card: Mapping[str, Any], title: str) -> Any:
    """The front matter of a card (:func:`render_model_card`'s `card`) as huggingface_hub's ``ModelCardData``."""
    from huggingface_hub import ModelCardData

    data = list(card.get("training_data") or [])
    licence = data_license(data) if data else {}
    eval_results = _eval_results(card.get("results") or {}, card.get("mteb") or [])
    datasets = list(dict.fromkeys(d["hub_id"] for d in data if d.get("hub_id")))
    metrics = list(dict.fromkeys(r.metric_type for r in eval_results))
    return ModelCardData(
        base_model=hub_model_id(card.get("base_model")), datasets=datasets or None,
        eval_results=eval_results or None, language=list(card.get("languages") or []) or None,
        library_name="sentence-transformers", license=licence.get("license"),
        license_name=licence.get("license_name"), license_link=licence.get("license_link"),
        metrics=metrics or None, model_name=str(card.get("model_name") or title) if eval_results else None,
        pipeline_tag="sentence-similarity", tags=list(CARD_TAGS))


def render_model_card(settings: Mapping[str, Any], card: Mapping[str, Any] | None = None,
                      folder_name: str = "model", without_pooler: bool = False) -> str:
    """The README.md of an exported folder: the front matter the hub reads (:func:`card_metadata`), then settings,
    training data and licence, results, training config and how to load it.

    `card` is free-form (:func:`run_card` makes it for a run); these keys are recognised: ``title``,
    ``description``, ``base_model`` (a hub id; anything else only in the text), ``model_name`` (the name in
    ``model-index``; default: the title), ``languages``, ``training_data`` (:func:`training_data`: the datasets
    behind ``datasets`` and ``license``), ``training`` (the training config), ``data`` (a string, list or
    mapping), ``results`` (every evaluation set's final validation, :func:`read_run_results`: a table each and the
    ``model-index``), ``mteb`` (:func:`read_mteb_results`), ``metrics`` (a flat mapping, or metrics.json's
    ``{"summary": {setting: {metric: value}}}``); any other key becomes a section of its own.
    `without_pooler`: the backbone was saved without a pooler (the usage example then says so to transformers).
    """
    card = dict(card or {})
    title = card.pop("title", None) or settings["name"]
    front = card_metadata(card, title)
    description = card.pop("description", None)
    base_model = card.pop("base_model", None)
    training, data, metrics = card.pop("training", None), card.pop("data", None), card.pop("metrics", None)
    results = card.pop("results", None) or {}
    mteb = card.pop("mteb", None) or []
    sources = card.pop("training_data", None) or []
    for key in ("model_name", "languages"):
        card.pop(key, None)
    dense = settings["dense"]
    lines = ["---", *front.to_yaml().splitlines(), "---", "", f"# {title}", ""]
    lines += [description, ""] if description else []
    lines += ["A multilingual dense retrieval encoder (a dual encoder: queries and passages share the weights) "
              "exported by hybrid_retrieval, a framework for hybrid monolingual + cross-lingual batch training "
              "(Elmahdy et al., 2024, arXiv 2408.10536).", "",
              "## Encoder", "", "| setting | value |", "|---|---|",
              f"| pooling | {settings['pooling']} |",
              f"| dense head | {'none' if dense is None else json.dumps(dense)} |",
              f"| L2-normalised | {settings['normalize']} |",
              f"| query prefix | `{settings['query_prefix']!r}` |",
              f"| passage prefix | `{settings['passage_prefix']!r}` |",
              f"| max tokens (query / passage) | {settings['max_query_length']} / {settings['max_passage_length']} |",
              ""]
    if base_model:
        lines += [f"Base model: `{local_path_name(str(base_model))}`.", ""]
    if sources:
        licence = data_license(sources)
        lines += ["## Training data and licence", "", "The data that trained the weights:", "", *_data_lines(sources),
                  ""]
        if data:
            lines += ["As configured (`train_data.datasets`):", ""]
            lines += [f"- {v}" for v in (data if isinstance(data, (list, tuple)) else [data])]
            lines.append("")
        lines += [licence["reason"] + (f" The base model (`{front.base_model}`) has a licence of its own: check it "
                                       "too." if front.base_model else ""), ""]
        data = None
    if results:
        lines += ["## Results", "", "The run's final validation (the exported weights), every evaluation set. The "
                  "front matter's `model-index` holds the sets with a Hugging Face dataset id, the setting as the "
                  "dataset config; `rank_distance` and `max_at_r` (lower is better) and `own_language_first` "
                  "(language bias) are in these tables only.", "", *_results_tables(results)]
    elif metrics:
        lines += ["## Results", "", *_metrics_table(metrics), ""]
    if mteb:
        lines += ["## MTEB", "", f"Main scores of MTEB's own evaluation ([mteb]({MTEB_URL})), from the run "
                  "folder's MTEB results; those on a Hugging Face dataset are in the `model-index` too.", "",
                  "| task | subset | split | metric | value | file |", "|---|---|---|---|---|---|"]
        lines += [f"| {e['task']} | {e['subset']} | {e['split']} | {e['metric']} | {_cell(float(e['value']))} | "
                  f"`{e['file']}` |" for e in mteb]
        lines.append("")
    sizes = []
    if settings.get("matryoshka_dims"):
        sizes.append(f"Trained with a Matryoshka loss at {settings['matryoshka_dims']} dimensions: the first k "
                     "dimensions, re-normalised, are an embedding of their own (sentence-transformers "
                     "`truncate_dim=k`, this project `model.truncate_dim=k`).")
    if settings.get("truncate_dim"):
        sizes.append(f"Embeddings are their first {settings['truncate_dim']} dimensions, re-normalised to unit "
                     "length (in sentence-transformers a Dense module holding the identity slice, before Normalize).")
    if sizes:
        lines += ["## Embedding sizes", "", *sizes, ""]
    if data:
        lines += ["## Data", ""]
        if isinstance(data, Mapping):
            lines += [f"- **{k}**: {v}" for k, v in data.items()]
        elif isinstance(data, (list, tuple)):
            lines += [f"- {v}" for v in data]
        else:
            lines.append(str(data))
        lines.append("")
    if training:
        lines += ["## Training configuration", "", *_yaml_block(training), ""]
    for key, value in card.items():
        lines += [f"## {str(key).replace('_', ' ').capitalize()}", "", *_yaml_block(value), ""]
    pool = ("cls = out.last_hidden_state[:, 0]" if settings["pooling"] == "cls" else
            "mask = batch['attention_mask'].unsqueeze(-1).float()\n"
            "pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1)")
    pooled_name = "cls" if settings["pooling"] == "cls" else "pooled"
    norm = f"emb = torch.nn.functional.normalize({pooled_name}, dim=-1)" if settings["normalize"] else \
        f"emb = {pooled_name}"
    lines += ["## Usage", "", "sentence-transformers (pooling, dense head, normalisation and prefixes included):", "",
              "```python", "from sentence_transformers import SentenceTransformer", "",
              f"model = SentenceTransformer({folder_name!r})",
              "q = model.encode(['how tall is the eiffel tower?'], prompt_name='query')",
              "p = model.encode(['The Eiffel Tower is 330 m tall.'], prompt_name='document')",
              "scores = model.similarity(q, p)", "```", "",
              f"Note: sentence-transformers truncates every text at {settings['max_passage_length']} tokens; this "
              f"project truncates queries at {settings['max_query_length']}.", "", ]
    if dense is None:
        lines += ["transformers (pooling and prefixes by hand):", "", "```python", "import torch",
                  "from transformers import AutoModel, AutoTokenizer", "",
                  f"tokenizer = AutoTokenizer.from_pretrained({folder_name!r})",
                  f"model = AutoModel.from_pretrained({folder_name!r}"
                  + (", add_pooling_layer=False)  # no pooler: embeddings are pooled below" if without_pooler
                     else ")"),
                  f"texts = [{settings['query_prefix']!r} + 'how tall is the eiffel tower?']",
                  f"batch = tokenizer(texts, padding=True, truncation=True, "
                  f"max_length={settings['max_query_length']}, return_tensors='pt')",
                  "with torch.no_grad():", "    out = model(**batch)", *pool.splitlines(), norm, "```", ""]
    else:
        lines += ["transformers: the backbone loads with `AutoModel.from_pretrained`, but the dense head in "
                  f"`{dense['folder']}/` is sentence-transformers' format: use sentence-transformers or this "
                  "project to get the final embeddings.", ""]
    lines += ["hybrid_retrieval:", "", "```python", "from hybrid_retrieval.models.encoder import load_encoder", "",
              f"encoder = load_encoder(name={settings['name']!r}, source='hub', path={folder_name!r})",
              "q = encoder.encode(['how tall is the eiffel tower?'], 'query')", "```", "",
              f"or on the command line: `python -m hybrid_retrieval.encode model.path={folder_name} "
              "input=texts.txt kind=passage output=emb/`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- export


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_encoder(encoder: Encoder, folder: str | Path, card: Mapping[str, Any] | None = None,
                   overwrite: bool = False) -> Path:
    """Write `encoder` as a transformers + sentence-transformers + hybrid_retrieval folder at `folder`.

    An existing empty folder is replaced; a non-empty one only with ``overwrite=True`` (else FileExistsError).
    Everything is written into a temporary sibling folder first and renamed into place at the end.
    Returns the folder.
    """
    folder = Path(folder).expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"export folder {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"export folder {folder} exists and is not empty; choose another folder or pass "
                              "overwrite=true")
    folder.parent.mkdir(parents=True, exist_ok=True)
    needed = sum(t.numel() * t.element_size() for t in encoder.backbone.state_dict().values())
    advice = ("the folder's earlier content, if any, is kept; free space, or export the checkpoint elsewhere: "
              "python -m hybrid_retrieval.export checkpoint=<run folder>/checkpoints/best.ckpt output=<folder>")
    if (free_bytes(folder.parent) or needed) < needed:
        raise DiskFullError("the model export", folder.parent, needed, advice)
    # A sibling, so the final rename stays on one file system (and is atomic there).
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        with reporting_disk_full("the model export", folder.parent, needed, advice), quiet_transformers():
            encoder.backbone.save_pretrained(str(tmp))
            encoder.tokenizer.save_pretrained(str(tmp))
            _sentence_transformers_files(encoder, tmp)
            settings = encoder_settings(encoder)
            # Beside "encoder" (whose keys older readers check strictly): sizes and the name results are filed under.
            sizes = {"matryoshka_dims": getattr(encoder, "matryoshka_dims", None),
                     "truncate_dim": getattr(encoder, "truncate_dim", None)}
            model_name = (card or {}).get("model_name")
            _write_json(tmp / SETTINGS_FILE, {"format": SETTINGS_FORMAT, "encoder": settings,
                                              "embedding_dim": encoder.embedding_dim, **sizes,
                                              **({"model_name": str(model_name)} if model_name else {})})
            readme = render_model_card({**settings, **sizes}, card, folder.name,
                                       _takes_pooling_flag(encoder.backbone))
            (tmp / "README.md").write_text(readme, encoding="utf-8")
            _replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _replace_folder(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is moved aside first and removed after the swap."""
    old = None
    if target.exists():
        if not any(target.iterdir()):
            target.rmdir()
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
    os.replace(new, target)
    # mkdtemp creates 0700 and the weights are written 0600: the export is an ordinary, shareable folder.
    mask = _umask()
    os.chmod(target, 0o777 & ~mask)
    for path in target.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
