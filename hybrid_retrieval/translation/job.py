"""One translate run, checked and resolved from its config before any model is loaded (:func:`prepare_job`), then
run (:func:`run_job`). ``python -m hybrid_retrieval.translate`` composes the two around the MLflow run."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from hybrid_retrieval.data.lareqa import PASSAGE_TEXTS
from hybrid_retrieval.data.squad import SQUAD_HARD_NEGATIVES
from hybrid_retrieval.data.sources import cache_root
from hybrid_retrieval.translation.languages import FAMILIES, LanguageError, model_language_code
from hybrid_retrieval.translation.stage import (SourceRow, StageStats, assemble_rows, plan_units, read_input,
                                                translate_units, write_output)

__all__ = ["TranslateConfigError", "TranslateJob", "default_cache_file", "prepare_job", "run_job"]


class TranslateConfigError(ValueError):
    """A translate option that cannot work; the message names the option."""


@dataclass
class TranslateJob:
    """Everything a run needs, resolved: rows read, language codes mapped, model folders found."""

    rows: list[SourceRow]
    family: str
    source_language: str
    source_code: str
    targets: dict[str, str]  # target language -> model code
    folders: dict[str, Path]  # target language -> model folder
    models: dict[str, str]  # target language -> model id (checkpoint, else folder): cache key and provenance
    output: Path
    cache: Path
    settings: Any  # GenerationSettings
    batch_size: int
    max_batch_tokens: int | None
    split_passages: bool
    max_batches: int | None
    progress_every_s: float
    device: str
    dtype: str
    target_prefix: str | None
    stats: StageStats = field(default_factory=StageStats)


def default_cache_file(preset: str) -> Path:
    """``$HYBRID_RETRIEVAL_CACHE/translations/<preset>.jsonl`` (default ``~/.cache/hybrid_retrieval/...``)."""
    return cache_root() / "translations" / f"{preset}.jsonl"


def _int(value: Any, option: str, allow_none: bool = False, minimum: int = 1) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TranslateConfigError(f"{option}={value!r}: expected {'null or ' if allow_none else ''}an integer "
                                   f">= {minimum}")
    return value


def _plain(node: Any) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node or {})


def _languages(value: Any) -> list[str]:
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, str):
        value = [value]
    if value is None or not isinstance(value, (list, tuple)) or not value:
        raise TranslateConfigError(f"translate.target_languages={value!r}: expected a non-empty list such as [it, sw]")
    return [str(v) for v in value]


def prepare_job(cfg: DictConfig, output_dir: str | os.PathLike[str]) -> TranslateJob:
    """Check every option, read and check the input, map language codes and find the model (downloading it only
    when online and not cached). Raises before any model is loaded; `output_dir` is the run folder."""
    from hybrid_retrieval.translation.translator import DTYPES, GenerationSettings, resolve_model_folder

    t, m = cfg.translate, cfg.translate_model
    family = m.get("family")
    if family not in FAMILIES:
        raise TranslateConfigError(f"translate_model.family={family!r}: expected one of {list(FAMILIES)}")
    preset = str(m.get("name") or family)
    source = t.get("source_language")
    if source is None or str(source) == "":
        raise TranslateConfigError("translate.source_language is not set: the input's language, e.g. es")
    source = str(source)
    targets = _languages(t.get("target_languages"))
    repeated = sorted({x for x in targets if targets.count(x) > 1})
    if repeated:
        raise TranslateConfigError(f"translate.target_languages: {repeated} given more than once")
    if source in targets:
        raise TranslateConfigError(f"translate.target_languages={targets} holds the source language {source!r}")
    codes = _plain(m.get("language_codes"))
    try:
        source_code = model_language_code(family, source, codes, "translate.source_language", preset)
        target_codes = {x: model_language_code(family, x, codes, "translate.target_languages", preset) for x in targets}
    except LanguageError as error:
        raise TranslateConfigError(str(error)) from None
    settings = GenerationSettings(num_beams=_int(t.get("num_beams"), "translate.num_beams"),
                                  max_new_tokens=_int(t.get("max_new_tokens"), "translate.max_new_tokens"),
                                  max_source_length=_int(t.get("max_source_length"), "translate.max_source_length"))
    batch_size = _int(t.get("batch_size"), "translate.batch_size")
    max_batch_tokens = _int(t.get("max_batch_tokens"), "translate.max_batch_tokens", allow_none=True)
    max_batches = _int(t.get("max_batches"), "translate.max_batches", allow_none=True)
    every = t.get("progress_every_s", 30)
    if isinstance(every, bool) or not isinstance(every, (int, float)) or every <= 0:
        raise TranslateConfigError(f"translate.progress_every_s={every!r}: expected a positive number of seconds")
    dtype = str(t.get("dtype", "float32"))
    if dtype not in DTYPES:
        raise TranslateConfigError(f"translate.dtype={dtype!r}: expected one of {list(DTYPES)}")
    device = str(t.get("device") or "auto")
    if device == "auto":
        import torch

        device = "cuda" if cfg.hardware.get("accelerator") == "gpu" and torch.cuda.is_available() else "cpu"
    squad = _plain(t.get("squad"))
    if squad.get("passage_text", "sentence") not in PASSAGE_TEXTS:
        raise TranslateConfigError(f"translate.squad.passage_text={squad.get('passage_text')!r}: expected one of "
                                   f"{list(PASSAGE_TEXTS)}")
    if squad.get("hard_negative") not in SQUAD_HARD_NEGATIVES:
        raise TranslateConfigError(f"translate.squad.hard_negative={squad.get('hard_negative')!r}: expected one of "
                                   f"{list(SQUAD_HARD_NEGATIVES)}")
    rows = read_input(t.get("input"), source, str(t.get("input_format", "auto")), squad, t.get("max_rows"))

    # Marian has one model per pair: checkpoint and model_path may hold {source} and {target}.
    folders: dict[str, Path] = {}
    models: dict[str, str] = {}
    for target in targets:
        names = {"source": source, "target": target}
        checkpoint = m.get("checkpoint")
        checkpoint = str(checkpoint).format(**names) if checkpoint else None
        path = t.get("model_path")
        path = str(path).format(**names) if path else None
        folders[target] = resolve_model_folder(checkpoint, path)
        models[target] = checkpoint or str(folders[target].resolve())
    output = Path(t.output).expanduser() if t.get("output") else Path(output_dir) / "pairs.jsonl"
    cache = Path(t.cache).expanduser() if t.get("cache") else default_cache_file(preset)
    return TranslateJob(rows=rows, family=family, source_language=source, source_code=source_code,
                        targets=target_codes, folders=folders, models=models, output=output, cache=cache,
                        settings=settings, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                        split_passages=bool(t.get("split_passages", True)), max_batches=max_batches,
                        progress_every_s=float(every), device=device, dtype=dtype,
                        target_prefix=m.get("target_prefix"))


def run_job(job: TranslateJob) -> tuple[Path, Path]:
    """Translate (through the cache), assemble and write the output; returns (output, provenance file).
    Raises :class:`~hybrid_retrieval.translation.stage.TranslationStopped` after ``max_batches`` model batches."""
    from hybrid_retrieval.translation.cache import TranslationCache
    from hybrid_retrieval.translation.translator import Seq2SeqTranslator

    start = time.monotonic()
    stats = job.stats
    plan = plan_units(job.rows, job.source_language, list(job.targets), job.split_passages)
    stats.source_rows = len(plan.rows)
    loaded: dict[Path, Seq2SeqTranslator] = {}

    def translator_for(target: str) -> Seq2SeqTranslator:
        folder = job.folders[target]
        if folder not in loaded:  # NLLB / M2M100: one model for every target; Marian: one per pair
            loaded.clear()
            loaded[folder] = Seq2SeqTranslator(folder, job.family, job.source_code, job.settings, job.device,
                                               job.dtype, job.target_prefix)
        return loaded[folder]

    with TranslationCache(job.cache, set(job.models.values()), job.settings.key()) as cache:
        try:
            translations = translate_units(plan, job.source_language, job.targets, job.models, translator_for, cache,
                                           job.batch_size, job.max_batch_tokens, job.max_batches,
                                           job.progress_every_s, stats)
        finally:
            stats.seconds = time.monotonic() - start
    rows, provenance = assemble_rows(job.rows, plan, translations, job.targets, job.models, job.source_language,
                                     stats)
    return write_output(job.output, rows, provenance)
