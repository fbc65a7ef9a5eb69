"""A transformers seq2seq translation model (NLLB-200, M2M100, Marian): found, loaded, and run on length-sorted
batches with dynamic padding.

:func:`resolve_model_folder` finds the model before anything else runs: ``translate.model_path`` (a local copy),
else the local Hugging Face cache, else a download (only when online); a checkpoint that none of these provides is
an error naming it and ``translate.model_path``. :class:`Seq2SeqTranslator` translates a list of texts into a list
of the same order; :func:`plan_length_batches` cuts texts into batches of similar token length.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.models.encoder import plan_batches
from hybrid_retrieval.models.loading import ModelNotFoundError, hub_files_to_fetch

__all__ = ["GenerationSettings", "Seq2SeqTranslator", "plan_length_batches", "resolve_model_folder"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; they change translations, so they are part of the cache key (:meth:`key`)."""

    num_beams: int = 4
    max_new_tokens: int = 256
    max_source_length: int = 256  # longer sources are truncated (passages are split into sentences first)

    def key(self) -> str:
        return (f"num_beams={self.num_beams},max_new_tokens={self.max_new_tokens},"
                f"max_source_length={self.max_source_length}")


def _offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HYBRID_RETRIEVAL_OFFLINE", ""))
    return any(flag.strip().lower() in {"1", "true", "yes", "on"} for flag in flags)


def resolve_model_folder(checkpoint: str | None, model_path: str | os.PathLike[str] | None) -> Path:
    """The local folder of a translation model: `model_path` when set, else the Hugging Face cache's copy of
    `checkpoint`, else a download of it (``HF_HUB_OFFLINE=1`` or ``HYBRID_RETRIEVAL_OFFLINE=1`` forbid that)."""
    if model_path is not None and str(model_path) != "":
        folder = Path(model_path).expanduser()
        if not folder.is_dir():
            raise ModelNotFoundError(f"translate.model_path={str(model_path)!r} does not exist (expected a folder "
                                     "holding the model's config.json, tokenizer and weights)")
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"translate.model_path={str(model_path)!r} is not a transformers model folder "
                                     f"({folder / 'config.json'} is missing)")
        return folder
    if not checkpoint:
        raise ModelNotFoundError("translate_model.checkpoint is null and translate.model_path is not set; "
                                 "set one of them")
    from huggingface_hub import snapshot_download

    fix = (f"Set translate.model_path=/local/copy (a folder holding config.json, tokenizer and weights; e.g. "
           f"`hf download {checkpoint} --local-dir <folder>` on a machine with network access), or put it in the "
           "Hugging Face cache (HF_HOME / HF_HUB_CACHE)")
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(checkpoint, local_files_only=True))
        if (folder / "config.json").is_file():
            return folder
    except (LocalEntryNotFoundError, OSError, ValueError):  # not in the cache (or not a valid repo id): see below
        folder = None
    if _offline():
        raise ModelNotFoundError(f"translation model checkpoint {checkpoint!r} has no local copy and downloads are "
                                 f"off (HF_HUB_OFFLINE / HYBRID_RETRIEVAL_OFFLINE). {fix}")
    try:
        from huggingface_hub import HfApi, constants

        info = HfApi().model_info(checkpoint, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        files = hub_files_to_fetch([s.rfilename for s in info.siblings or ()])
        folder = Path(snapshot_download(checkpoint, allow_patterns=files))
    except Exception as error:  # noqa: BLE001 - every hub/network failure becomes one actionable error
        detail = " ".join(str(error).split())[:200]
        raise ModelNotFoundError(f"translation model checkpoint {checkpoint!r} has no local copy and could not be "
                                 f"downloaded ({type(error).__name__}: {detail}). {fix}") from error
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"translation model checkpoint {checkpoint!r}: the download into {folder} has no "
                                 f"config.json. {fix}")
    return folder


def plan_length_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None) -> list[list[int]]:
    """Batches of indices into `lengths`: longest first, ties in index order, cut so that a batch holds at most
    `batch_size` texts and `max_batch_tokens` padded tokens (a single longer text still gets its own batch).

    The plan depends only on the lengths and the limits, so a rerun over the same texts makes the same batches:
    a resumed run skips the finished ones and runs the others exactly as an uninterrupted run would have.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # by length descending, then index
    cuts = plan_batches(lengths[order], batch_size, max_batch_tokens)
    return [order[start:stop].tolist() for start, stop in cuts]


class Seq2SeqTranslator:
    """One loaded translation model for one source language: ``translate(texts, target)`` keeps input order.

    family: "nllb" (source/target set by FLORES-200 tokens), "m2m100" (``__xx__`` tokens) or "marian" (one model per
    pair; `target_prefix` such as ``">>{code}<< "`` for multi-target OPUS-MT models).
    """

    def __init__(self, folder: str | os.PathLike[str], family: str, source_code: str,
                 settings: GenerationSettings, device: str = "cpu", dtype: str = "float32",
                 target_prefix: str | None = None) -> None:
        from transformers import AutoTokenizer

        if dtype not in DTYPES:
            raise BadValue(f"translate.dtype={dtype!r}: expected one of {list(DTYPES)}")
        self.folder = Path(folder)
        self.family = family
        self.source_code = source_code
        self.settings = settings
        self.target_prefix = target_prefix
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        if family in ("nllb", "m2m100"):
            self._check_token(self._language_token(source_code), "source")
            self.tokenizer.src_lang = source_code
        self.dtype = DTYPES[dtype]
        self._model: Any = None  # loaded on the first translation: a run answered from the cache never loads it
        self.calls = 0  # generate() calls, for the stage's statistics

    @property
    def model(self) -> Any:
        if self._model is None:
            from transformers import AutoModelForSeq2SeqLM

            self._model = AutoModelForSeq2SeqLM.from_pretrained(str(self.folder), dtype=self.dtype).to(self.device)
            self._model.eval()
        return self._model

    def _language_token(self, code: str) -> str:
        return f"__{code}__" if self.family == "m2m100" else code

    def _check_token(self, token: str, role: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise BadValue(f"the tokenizer in {self.folder} has no {role} language token {token!r}; is this an "
                             f"{self.family} model? (translate_model.family)")
        return int(token_id)

    def _inputs(self, texts: Sequence[str], target_code: str | None) -> list[str]:
        if self.target_prefix and target_code is not None:
            prefix = self.target_prefix.format(code=target_code)
            return [prefix + text for text in texts]
        return list(texts)

    def token_lengths(self, texts: Sequence[str], target_code: str | None = None) -> list[int]:
        """Source token counts (special tokens included, truncated like translation), for batching."""
        encoded = self.tokenizer(self._inputs(texts, target_code), truncation=True,
                                 max_length=self.settings.max_source_length)
        return [len(ids) for ids in encoded["input_ids"]]

    @torch.inference_mode()
    def translate(self, texts: Sequence[str], target_code: str) -> list[str]:
        """Translations of `texts`, in their order, as one padded batch (pad to its longest text)."""
        if not texts:
            return []
        encoded = self.tokenizer(self._inputs(texts, target_code), truncation=True, padding="longest",
                                 max_length=self.settings.max_source_length, return_tensors="pt").to(self.device)
        extra: dict[str, Any] = {}
        if self.family in ("nllb", "m2m100"):
            extra["forced_bos_token_id"] = self._check_token(self._language_token(target_code), "target")
        output = self.model.generate(**encoded, num_beams=self.settings.num_beams, do_sample=False,
                                     max_new_tokens=self.settings.max_new_tokens, **extra)
        self.calls += 1
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]
