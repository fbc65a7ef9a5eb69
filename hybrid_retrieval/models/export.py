"""Export an :class:`Encoder` as a self-contained model folder that other tools load without this project.

The folder is at once:

* a transformers model (``config.json``, ``model.safetensors``, tokenizer files: ``AutoModel`` + ``AutoTokenizer``);
* a sentence-transformers model (``modules.json``: Transformer -> Pooling -> [Dense] -> [Truncate] -> [Normalize],
  prompts
  ``query`` / ``passage`` in ``config_sentence_transformers.json``), in the classic on-disk format of the models
  on the hub, which old and new sentence-transformers releases read alike;
* this project's model (``hybrid_retrieval.json``: the encoder settings, read back by ``load_encoder(path=...)``),

with a ``README.md`` model card. Writing goes to a hidden temporary folder that is renamed at the end, so an
interrupted export never leaves a half-written folder under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from hybrid_retrieval.models.dense import DENSE_WEIGHTS, dense_linear, save_dense
from hybrid_retrieval.models.encoder import Encoder
from hybrid_retrieval.models.loading import SETTINGS_FILE, SETTINGS_FORMAT, quiet_transformers

__all__ = ["encoder_settings", "export_encoder", "read_run_results", "render_model_card", "run_model_name"]

DENSE_FOLDER = "2_Dense"
TRUNCATE_FOLDER = "Truncate"  # <idx>_Truncate: the first model.truncate_dim components, before Normalize


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
    if encoder.normalize or encoder.truncate_dim is not None:
        idx = len(modules)
        path = f"{idx}_Normalize"
        (folder / path).mkdir()
        modules.append({"idx": idx, "name": str(idx), "path": path, "type": "sentence_transformers.models.Normalize"})
    _write_json(folder / "modules.json", modules)
    import torch
    import transformers

    _write_json(folder / "config_sentence_transformers.json", {
        "__version__": {"transformers": transformers.__version__, "pytorch": torch.__version__},
        # "document" is the name MTEB and sentence-transformers' encode_document read; "passage" is this project's.
        "prompts": {"query": encoder.prefixes["query"], "document": encoder.prefixes["passage"],
                    "passage": encoder.prefixes["passage"]},
        "default_prompt_name": None,
        # Unnormalised embeddings are scored by inner product in this project, so say so.
        # Truncated embeddings are re-normalised (the truncation module): unit vectors, scored by cosine.
        "similarity_fn_name": "cosine" if encoder.normalize or encoder.truncate_dim is not None else "dot",
    })


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


DATASET_LABELS = {"xquad_r": "XQuAD-R", "mlqa_r": "MLQA-R", "tatoeba": "Tatoeba", "miracl": "MIRACL"}
SETTING_LABELS = {"mono": "monolingual", "cross": "cross-lingual", "multi": "multilingual"}


def run_model_name(run_dir: Path, base: str) -> str:
    """The name a model fine-tuned in ``run_dir`` goes by (MTEB results, model cards): ``<base>-ft-<run>``, the run
    being the folder's last two parts (``2026-12-04_15-06-38``, or ``15-06-38_3`` for a sweep's job 3): never the
    base model's own name, so results of the two are never filed together."""
    import re

    run = "_".join(Path(run_dir).resolve().parts[-2:])
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{base}-ft-{run}")


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
    ``<key>_metrics.json`` (each of ``extra_datasets``), named from the run's ``.hydra/config.yaml`` when present.

    Returns ``{key: {"type": dataset name, "name": label, "summary": {setting: {metric: value}}}}`` (empty when the
    folder has no metrics)."""
    run_dir = Path(run_dir)
    config: Mapping[str, Any] = {}
    config_file = run_dir / ".hydra" / "config.yaml"
    if config_file.is_file():
        from omegaconf import OmegaConf

        loaded = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
        config = loaded if isinstance(loaded, Mapping) else {}
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
            results[key] = {"type": str((dataset or {}).get("name", key)), "name": _dataset_label(dataset, key),
                            "summary": data["summary"]}
    return results


def _results_tables(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines: list[str] = []
    for key, result in results.items():
        lines += [f"**{result.get('name', key)}** (`{key}`)", "", *_metrics_table({"summary": result["summary"]}), ""]
    return lines


def _model_index(name: str, results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The hub's ``model-index`` (one retrieval result per evaluation set, one metric per setting x metric)."""
    import math

    entries = []
    for key, result in results.items():
        metrics = [{"type": f"{setting}_{metric}", "value": round(float(value), 6),
                    "name": f"{SETTING_LABELS.get(setting, setting)} {metric}"}
                   for setting, values in result["summary"].items() if isinstance(values, Mapping)
                   for metric, value in values.items()
                   if isinstance(value, (int, float)) and math.isfinite(float(value))]
        entries.append({"task": {"type": "retrieval", "name": "Retrieval"},
                        "dataset": {"name": str(result.get("name", key)), "type": str(result.get("type", key))},
                        "metrics": metrics})
    return [{"name": name, "results": entries}] if entries else []


def _yaml_block(value: Any) -> list[str]:
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(OmegaConf.create(value)) if isinstance(value, (Mapping, list)) else f"{value}\n"
    return ["```yaml", *text.rstrip("\n").splitlines(), "```"]


def render_model_card(settings: Mapping[str, Any], card: Mapping[str, Any] | None = None,
                      folder_name: str = "model", without_pooler: bool = False) -> str:
    """The README.md of an exported folder: settings, training config, data, final metrics and how to load it.

    `card` is free-form; these keys are recognised: ``title``, ``description``, ``base_model``, ``model_name``
    (the name in ``model-index``; default: the title), ``training`` (the training config), ``data`` (a string,
    list or mapping), ``results`` (every evaluation set's final validation, :func:`read_run_results`: a table each
    and the front matter's ``model-index``), ``metrics`` (a flat mapping, or metrics.json's
    ``{"summary": {setting: {metric: value}}}``); any other key becomes a section of its own.
    `without_pooler`: the backbone was saved without a pooler (the usage example then says so to transformers).
    """
    card = dict(card or {})
    title = card.pop("title", None) or settings["name"]
    description = card.pop("description", None)
    base_model = card.pop("base_model", None)
    training, data, metrics = card.pop("training", None), card.pop("data", None), card.pop("metrics", None)
    results = card.pop("results", None) or {}
    model_name = str(card.pop("model_name", None) or title)
    dense = settings["dense"]
    import yaml

    front: dict[str, Any] = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
                             "tags": ["sentence-transformers", "feature-extraction", "sentence-similarity",
                                      "hybrid_retrieval"]}
    if base_model:
        front["base_model"] = str(base_model)
    if results:
        front["model-index"] = _model_index(model_name, results)
    lines = ["---", *yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip("\n").splitlines(), "---", "",
             f"# {title}", ""]
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
        lines += [f"Base model: `{base_model}`.", ""]
    if results:
        lines += ["## Results", "", "The run's final validation (the exported weights), every evaluation set:", "",
                  *_results_tables(results)]
    elif metrics:
        lines += ["## Results", "", *_metrics_table(metrics), ""]
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
              "p = model.encode(['The Eiffel Tower is 330 m tall.'], prompt_name='passage')",
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
    # A sibling, so the final rename stays on one file system (and is atomic there).
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        with quiet_transformers():
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
        readme = render_model_card({**settings, **sizes}, card, folder.name, _takes_pooling_flag(encoder.backbone))
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
