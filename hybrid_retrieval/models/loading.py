"""Where a model's files come from and what a model folder holds; the one owner of loading concerns.

* the hub: :func:`resolve_hub_folder` (``model.path``, else the local Hugging Face cache, else a download of only
  the files loading needs, :func:`hub_files_to_fetch`), and the one :class:`ModelNotFoundError` that names the
  checkpoint, the reason and the fixes when all of that fails;
* a model folder: its tokenizer files (:func:`check_tokenizer_files`), the settings an export records in
  ``hybrid_retrieval.json`` (:func:`folder_settings`, :func:`merge_folder_settings`, :func:`folder_matryoshka`);
* the transformers objects: :func:`load_tokenizer`, :func:`load_backbone`, :func:`random_backbone`, loaded quietly.

:func:`hybrid_retrieval.models.encoder.load_encoder` assembles an encoder from these; export writes the files they
read. Nothing here imports either, so neither imports the other.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybrid_retrieval.config_error import BadValue

__all__ = ["DEFAULT_TINY_CONFIG", "SETTINGS_FILE", "TOKENIZER_FILES", "ModelNotFoundError", "check_tokenizer_files",
           "folder_matryoshka", "folder_settings", "hub_files_to_fetch", "load_backbone", "load_tokenizer",
           "merge_folder_settings", "quiet_transformers", "random_backbone", "resolve_hub_folder"]

DEFAULT_TINY_CONFIG: dict[str, int] = {
    "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
}
SETTINGS_FILE = "hybrid_retrieval.json"
SETTINGS_FORMAT = 1
# Any one of these is a complete tokenizer for AutoTokenizer (tokenizer_config.json alone is not).
TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model", "vocab.txt",
                   "vocab.json")
# Settings that hybrid_retrieval.json fixes for a folder; a config's differing values are overridden.
SETTING_KEYS = ("name", "pooling", "normalize", "dense", "query_prefix", "passage_prefix", "max_query_length",
                "max_passage_length")


class ModelNotFoundError(FileNotFoundError):
    """A configured pretrained model is neither at ``model.path``, nor in the Hugging Face cache, nor downloadable."""


# ------------------------------------------------------------------------------------------------ transformers


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and info logs while loading, restoring the caller's settings."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@functools.lru_cache(maxsize=4)
def load_tokenizer(folder: str) -> Any:
    # Building the 250k-piece tokenizer takes seconds; encoders on the same folder share one (read-only) copy.
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(folder)


def load_backbone(folder: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    with quiet_transformers():
        config = AutoConfig.from_pretrained(str(folder))
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        model_class = AutoModel._model_mapping.get(type(config), None)
        if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
            # Retrieval checkpoints have no trained pooler; building one would add random weights and a warning.
            kwargs["add_pooling_layer"] = False
        return AutoModel.from_pretrained(str(folder), **kwargs)


HUB_TEXT_SUFFIXES = (".json", ".txt", ".model")  # configs, tokenizer files, sentencepiece models
HUB_FIX_HINT = (
    "Fix: set model.path=/local/copy (a folder holding its config.json, tokenizer and weights), or pre-download it "
    "on a machine with network access with `hf download {checkpoint}` and copy that Hugging Face cache here "
    "(HF_HOME / HF_HUB_CACHE), or set HF_ENDPOINT to a reachable hub mirror."
)


def hub_files_to_fetch(repo_files: Sequence[str]) -> list[str]:
    """The files of a hub repository that loading needs, in repository order.

    Top level and sentence-transformers module folders (``1_Pooling/``, ``2_Dense/``, ...): JSON and text files
    (config, tokenizer, ``modules.json``, ``sentence_bert_config.json``), sentencepiece ``*.model`` files, and
    the ``*.safetensors`` weights, or ``pytorch_model*.bin`` only where a folder has no safetensors. Never onnx,
    TensorFlow, Flax, OpenVINO or Rust files, nor anything in other sub-folders.
    """
    import re

    files = list(repo_files)
    by_folder: dict[str, list[str]] = {}
    for file in files:
        folder, _, base = file.rpartition("/")
        if folder and not re.fullmatch(r"\d+_[A-Za-z]\w*", folder):  # only sentence-transformers module folders
            continue
        by_folder.setdefault(folder, []).append(base)
    keep: set[str] = set()
    for folder, names in by_folder.items():
        safetensors = [n for n in names if n.endswith(".safetensors")]
        # Prefer the canonical (possibly sharded) file over variants such as model.fp16.safetensors.
        canonical = [n for n in safetensors if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", n)]
        weights = canonical or safetensors
        weight_kind = ".safetensors"
        if not weights:
            weights = [n for n in names if re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", n)]
            weight_kind = ".bin"
        chosen = set(weights)
        for n in names:
            if n.endswith(".index.json"):  # shard index: only the one of the chosen weights
                if n.removesuffix(".index.json").endswith(weight_kind) and weights:
                    chosen.add(n)
            elif n.endswith(HUB_TEXT_SUFFIXES):
                chosen.add(n)
        keep |= {f"{folder}/{n}" if folder else n for n in chosen}
    return [f for f in files if f in keep]


def _complete_model_folder(folder: Path) -> bool:
    """Whether a local snapshot has what loading needs: config, weights and a tokenizer."""
    if not (folder / "config.json").is_file():
        return False
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    has_tokenizer = any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
    modules = folder / "modules.json"  # sentence-transformers layout: its module folders (2_Dense/, ...) too
    try:
        listed = json.loads(modules.read_text(encoding="utf-8")) if modules.is_file() else []
        module_dirs = [m.get("path") for m in listed]
    except (ValueError, AttributeError, TypeError):
        module_dirs = []
    has_modules = all((folder / d).is_dir() for d in module_dirs if isinstance(d, str) and d)
    return has_weights and has_modules and (has_tokenizer or any(folder.glob("*.model")))


def _hub_failure_reason(err: BaseException) -> str:
    """A short reason for a failed hub look-up or download: offline, not found, or a network error."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    seen: set[int] = set()
    chain: list[BaseException] = []
    while err is not None and id(err) not in seen:  # the download may wrap the root cause
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in chain:
        if isinstance(e, OfflineModeIsEnabled):
            return "offline (HF_HUB_OFFLINE=1) and not in the local Hugging Face cache"
    for e in chain:
        if isinstance(e, GatedRepoError):
            return f"gated on {constants.ENDPOINT}: accept its licence there and log in (`hf auth login` or HF_TOKEN)"
        if isinstance(e, RevisionNotFoundError):
            return f"revision {constants.DEFAULT_REVISION!r} not found on {constants.ENDPOINT}"
        if isinstance(e, RepositoryNotFoundError) or (
            isinstance(e, HfHubHTTPError) and e.response is not None and e.response.status_code in (401, 404)
        ):
            return f"not found on {constants.ENDPOINT} (or private: log in with `hf auth login` or set HF_TOKEN)"
    for e in chain:
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return f"hub error at {constants.ENDPOINT}: HTTP {e.response.status_code}"
    root = chain[-1]
    detail = " ".join(str(root).split())
    if len(detail) > 120:
        detail = detail[:117] + "..."
    return f"network error reaching {constants.ENDPOINT} ({type(root).__name__}: {detail})"


def _hub_error(name: str, checkpoint: str, reason: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {name!r}: checkpoint {checkpoint!r} is not available: {reason}. "
        + HUB_FIX_HINT.format(checkpoint=checkpoint)
    )


def _download_hub_model(name: str, checkpoint: str) -> Path:
    """Download what loading needs of `checkpoint` into the Hugging Face cache; its snapshot folder."""
    import glob

    from huggingface_hub import HfApi, constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        raise _hub_error(name, checkpoint, f"offline (HF_HUB_OFFLINE=1) and not in the local Hugging Face cache "
                                           f"({constants.HF_HUB_CACHE})")
    try:
        # One bounded listing call first: snapshot_download's own one has no timeout, and the file list decides
        # which weights format to fetch. HF_HUB_ETAG_TIMEOUT (default 10 s) bounds it.
        info = HfApi().model_info(checkpoint, revision=constants.DEFAULT_REVISION,
                                  timeout=constants.HF_HUB_ETAG_TIMEOUT)
        files = hub_files_to_fetch([s.rfilename for s in info.siblings or ()])
        if "config.json" not in files:
            raise _hub_error(name, checkpoint, f"the repository on {constants.ENDPOINT} has no config.json, so it is "
                                               "not a transformers model")
        folder = Path(snapshot_download(checkpoint, revision=constants.DEFAULT_REVISION,
                                        allow_patterns=[glob.escape(f) for f in files]))
    except ModelNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - every hub/network failure becomes one clear, actionable error
        raise _hub_error(name, checkpoint, _hub_failure_reason(err)) from err
    if not _complete_model_folder(folder):
        raise _hub_error(name, checkpoint, f"the download into {folder} lacks weights or tokenizer files")
    return folder


def resolve_hub_folder(name: str, checkpoint: str | None, path: str | Path | None) -> Path:
    """Local folder of a hub model: ``path`` if given, else the local Hugging Face cache, else a download.

    The download (``huggingface_hub.snapshot_download``, so ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, ``HF_HOME``,
    ``HF_HUB_CACHE``, ``HF_TOKEN`` and the ``HF_HUB_*_TIMEOUT`` variables apply) fetches only what
    :func:`hub_files_to_fetch` selects, into the cache, so a second call finds it there without the network.
    Raises :class:`ModelNotFoundError` naming the checkpoint, the reason and the fixes when all of that fails.
    """
    if path is not None:
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(
                f"model {name!r}: model.path={str(path)!r} is not a transformers model folder "
                f"({folder / 'config.json'} is missing)"
            )
        return folder
    if not checkpoint:
        raise BadValue(f"model {name!r}: source 'hub' needs model.checkpoint or model.path")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(checkpoint, "config.json")
    if isinstance(cached, str) and _complete_model_folder(Path(cached).parent):
        return Path(cached).parent
    return _download_hub_model(name, checkpoint)


def random_backbone(vocab_size: int, pad_id: int, tiny: Mapping[str, Any], seed: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    settings = {**DEFAULT_TINY_CONFIG, **tiny}
    try:
        config = BertConfig(vocab_size=vocab_size, pad_token_id=pad_id, max_position_embeddings=512, **settings)
    except TypeError as err:
        raise BadValue(f"model.tiny: {err}") from err
    if config.hidden_size % config.num_attention_heads:
        raise BadValue(f"model.tiny: hidden_size={config.hidden_size} is not divisible by "
                         f"num_attention_heads={config.num_attention_heads}")
    # Fork the RNG so a fixed seed gives the same weights without disturbing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    return model.float()


# ------------------------------------------------------------------------------------------------ model folders


def check_tokenizer_files(folder: Path, option: str = "model.path") -> None:
    """Raise a clear error when `folder` holds a model but no tokenizer (a bare ``backbone.save_pretrained``)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"{option}={str(folder)!r} has no tokenizer: none of {', '.join(TOKENIZER_FILES)} is in the folder. "
            "Copy the tokenizer files of the base model into it, or export the model with "
            "`python -m hybrid_retrieval.export` (which writes them)."
        )


def folder_settings(folder: Path) -> dict[str, Any] | None:
    """The settings in ``<folder>/hybrid_retrieval.json``; None for a folder without one (a plain hub copy)."""
    file = folder / SETTINGS_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BadValue(f"{file}: not valid JSON ({err}); expected the settings written by export_encoder") from err
    if not isinstance(data, Mapping) or not isinstance(data.get("encoder"), Mapping):
        raise BadValue(f"{file}: expected an object with an 'encoder' object (the settings written by "
                         "export_encoder)")
    if data.get("format") != SETTINGS_FORMAT:
        raise BadValue(f"{file}: format {data.get('format')!r} is not supported; expected {SETTINGS_FORMAT}")
    unknown = set(data["encoder"]) - set(SETTING_KEYS)
    if unknown:
        raise BadValue(f"{file}: unknown encoder settings {sorted(unknown)}; expected keys among {SETTING_KEYS}")
    return dict(data["encoder"])


def _comparable(key: str, value: Any, saved: Any) -> Any:
    if key == "dense" and isinstance(value, Mapping):
        # A config may leave out keys that have defaults; "torch.nn.modules.activation.Tanh" == "tanh".
        out_features = value.get("out_features", saved.get("out_features") if isinstance(saved, Mapping) else None)
        return {"folder": value.get("folder"), "out_features": out_features,
                "activation": str(value.get("activation", "tanh")).rsplit(".", 1)[-1].lower(),
                "bias": bool(value.get("bias", True))}
    return value


def merge_folder_settings(folder: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with the settings of ``<folder>/hybrid_retrieval.json`` on top; warns naming the keys that
    differed (the folder's weights were trained with its own settings, so those win)."""
    saved = folder_settings(folder)
    if saved is None:
        return dict(config)
    differing = [k for k in SETTING_KEYS if k in saved and k in config
                 and _comparable(k, saved[k], saved[k]) != _comparable(k, config[k], saved[k])]
    if differing:
        detail = ", ".join(f"{k}: {config[k]!r} -> {saved[k]!r}" for k in differing)
        warnings.warn(f"model.path={str(folder)!r}: its {SETTINGS_FILE} overrides the model config for "
                      f"{', '.join(differing)} ({detail})", UserWarning, stacklevel=3)
    return {**config, **{k: saved[k] for k in SETTING_KEYS if k in saved}}




def folder_matryoshka(folder: Path) -> dict[str, Any]:
    """``{"matryoshka_dims", "truncate_dim", "model_name"}`` recorded in ``<folder>/hybrid_retrieval.json`` (None
    each when absent)."""
    file = Path(folder) / SETTINGS_FILE
    data = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    return {key: data.get(key) for key in ("matryoshka_dims", "truncate_dim", "model_name")}
