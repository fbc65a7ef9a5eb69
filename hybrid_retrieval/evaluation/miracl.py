"""MIRACL as an evaluation set (``dataset=miracl``): monolingual corpus retrieval, per language and macro-averaged.

For each language: the corpus is streamed from its JSONL shards into memory-mapped embedding shards
(:mod:`hybrid_retrieval.evaluation.corpus`), indexed with FAISS as ``dataset.index`` says (exact ``flat`` by
default), the topics are encoded as queries, the top ``dataset.top_k`` (100) passages are retrieved and the run is
scored with trec_eval's conventions (:mod:`hybrid_retrieval.evaluation.ir`): ``ndcg_at_10``, ``recall_at_100``,
``mrr_at_10``, unjudged passages counting as non-relevant, ties broken by docid descending.

The setting is ``mono`` (queries and passages in one language), so validation logs ``val/<key>/mono/<metric>``
(macro over languages) and ``val/<key>/mono/<lang>/<metric>``.

``dataset.max_corpus_passages`` (validation speed) keeps, per language, every judged passage of the kept topics
plus the first N other passages in corpus order: numbers are then those of a smaller, easier corpus, comparable
between runs with the same cap but not with the published full-corpus figures. ``dataset.embeddings_dir`` keeps
the embeddings (``<dir>/<lang>/``, resumable after a kill) and the index beside them for later runs of the same
model and config; null writes them to a temporary folder removed afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from hybrid_retrieval.config_error import BadValue, positive_int
from hybrid_retrieval.data import miracl as data
from hybrid_retrieval.evaluation.corpus import encode_corpus, encoder_fingerprint, remove_embeddings
from hybrid_retrieval.evaluation.index import (IndexConfigError, build_index, load_index, read_manifest,
                                               resolve_index_spec, save_index)
from hybrid_retrieval.evaluation.ir import METRICS, evaluate_run, mean_metrics, run_from_arrays, write_run
from hybrid_retrieval.evaluation.result import NOT_SAVED, RetrievalResult
from hybrid_retrieval.evaluation.sets import EvaluationSet, SetTexts

__all__ = ["LOWER_IS_BETTER", "SETTING", "SUMMARY_METRICS", "MiraclResult", "MiraclSet", "check_config", "load_set"]

SETTING = "mono"
SUMMARY_METRICS: dict[str, tuple[str, ...]] = {SETTING: METRICS}
LOWER_IS_BETTER: tuple[str, ...] = ()
LABELS = {"ndcg_at_10": "nDCG@10", "recall_at_100": "R@100", "mrr_at_10": "MRR@10"}
MIN_TOP_K = 100  # Recall@100 needs 100 hits
COMMON_DIMS = (384, 768, 1024, 512, 256, 128, 64)

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return value


def check_config(dataset: Any) -> None:
    """Check ``conf/dataset/miracl.yaml``'s options without reading any data; ValueError names the option."""
    data.check_languages(_plain(dataset.get("languages")))
    split = dataset.get("split", "dev")
    if split not in data.SPLITS:
        raise BadValue(f"dataset.split={split!r}: expected one of {data.SPLITS}")
    for key in ("max_corpus_passages", "max_topics_per_language"):
        value = dataset.get(key)
        if value is not None and not positive_int(value):
            raise BadValue(f"dataset.{key}={value!r}: expected null (all) or a positive integer")
    top_k = dataset.get("top_k", MIN_TOP_K)
    if not positive_int(top_k) or top_k < MIN_TOP_K:
        raise BadValue(f"dataset.top_k={top_k!r}: expected an integer >= {MIN_TOP_K} (Recall@100 is computed on "
                         "the retrieved list)")
    how = dataset.get("passage_text", "title_text")
    if how not in data.PASSAGE_TEXTS:
        raise BadValue(f"dataset.passage_text={how!r}: expected one of {data.PASSAGE_TEXTS}")
    shard_size = dataset.get("shard_size", 20000)
    if not positive_int(shard_size):
        raise BadValue(f"dataset.shard_size={shard_size!r}: expected a positive integer (passages per embedding "
                         "shard)")
    for key in ("root", "corpus_root"):
        value = dataset.get(key)
        if value is not None and not Path(str(value)).expanduser().is_dir():
            raise BadValue(f"dataset.{key}={str(value)!r} is not a directory")
    spec = _plain(dataset.get("index")) or {"type": "flat"}
    try:
        resolve_index_spec(spec)
        # The model (and so the dimension) is not known yet: a factory string must at least build for one usual
        # dimension; the model's own is checked before any passage is encoded (MiraclSet.evaluate).
        errors = []
        for dim in COMMON_DIMS:
            try:
                resolve_index_spec(spec, dim=dim)
                break
            except IndexConfigError as error:
                errors.append(error)
        else:
            raise errors[COMMON_DIMS.index(384)]
    except IndexConfigError as error:
        raise BadValue(str(error).replace("index.", "dataset.index.")) from error


@dataclass
class MiraclResult(RetrievalResult):
    """Macro averages (``summary``), per-language means (``per_language``), per-topic values and the runs."""

    counts: dict[str, dict[str, int]]  # language -> topics, passages, judged passages not in the corpus
    per_topic: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict, repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    runs: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict, repr=False, metadata=NOT_SAVED)
    notes: list[str] = field(default_factory=list)

    json_indent: ClassVar[int] = 1  # per-topic values of thousands of topics

    def table(self) -> str:
        """One row per language, then the macro average."""
        header = f"{'language':<10}{'topics':>8}{'passages':>12}" + "".join(f"{LABELS[m]:>10}" for m in METRICS)
        lines = [header, "-" * len(header)]
        for language, values in self.per_language[SETTING].items():
            counts = self.counts[language]
            lines.append(f"{language:<10}{counts['topics']:>8}{counts['passages']:>12,}"
                         + "".join(f"{values[m]:>10.4f}" for m in METRICS))
        lines.append(f"{'macro':<10}{'':>8}{'':>12}" + "".join(f"{self.summary[SETTING][m]:>10.4f}" for m in METRICS))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class MiraclSet(EvaluationSet):
    """The MIRACL evaluation set of ``conf/dataset/miracl.yaml`` (see the module docstring)."""

    key: str
    languages: dict[str, data.MiraclLanguage]
    shards: dict[str, list[Path]]
    index_spec: dict[str, Any]
    top_k: int = 100
    max_corpus_passages: int | None = None
    passage_text: str = "title_text"
    shard_size: int = 20000
    embeddings_dir: str | None = None
    split: str = "dev"
    progress: bool = True
    _selected: dict[str, list[tuple[str, str]]] = field(default_factory=dict, repr=False)

    def texts(self) -> SetTexts:
        return SetTexts([("query", language, list(topics.topics.values()))
                         for language, topics in self.languages.items()],
                        ["corpus passages (millions, read in shards at evaluation) are not compared"])

    def _passages(self, language: str) -> Any:
        """(docid, text) of the language's corpus selection; a capped selection is kept in memory after the first
        pass (validation repeats it), a full corpus is streamed from disk each time."""
        if language in self._selected:
            return self._selected[language]
        judged = self.languages[language].judged_docids()
        stream = ((p.docid, data.passage_text(p, self.passage_text))
                  for p in data.select_passages(self.shards[language], judged, self.max_corpus_passages))
        if self.max_corpus_passages is None:
            return stream
        self._selected[language] = list(stream)
        return self._selected[language]

    def _encoding_config(self, language: str, encoder: Any, dtype: Any, fingerprint: str | None) -> dict[str, Any]:
        selection: dict[str, Any] = {"max_corpus_passages": self.max_corpus_passages}
        if self.max_corpus_passages is not None:  # the kept passages depend on the kept topics' judgments
            judged = "\n".join(sorted(self.languages[language].judged_docids()))
            selection["judged"] = hashlib.sha256(judged.encode()).hexdigest()[:16]
        return {"model": encoder.name, "weights": fingerprint, "language": language,
                "passage_text": self.passage_text, "corpus": data.corpus_signature(self.shards[language]),
                "selection": selection, "dtype": str(dtype)}

    def evaluate(self, encoder: Any, batch_size: int = 64, dtype: Any = None, num_threads: int = 2) -> MiraclResult:
        import faiss

        from hybrid_retrieval.distributed import encode_across_ranks, rank_and_world

        faiss.omp_set_num_threads(num_threads)
        rank, world = rank_and_world()
        options = {"batch_size": batch_size, "dtype": dtype}
        keep = self.embeddings_dir is not None and rank == 0  # under DDP other ranks write private copies
        fingerprint = encoder_fingerprint(encoder) if keep else None
        try:  # an index FAISS cannot build for this model fails here, before any passage is encoded
            resolve_index_spec(self.index_spec, dim=encoder.output_dim)
        except IndexConfigError as error:
            raise IndexConfigError(str(error).replace("index.", "dataset.index.")) from error
        timings = {"encode_s": 0.0, "index_s": 0.0, "search_s": 0.0, "metrics_s": 0.0}
        per_language: dict[str, dict[str, float]] = {}
        per_topic: dict[str, dict[str, dict[str, float]]] = {}
        counts: dict[str, dict[str, int]] = {}
        runs: dict[str, dict[str, dict[str, float]]] = {}
        notes: list[str] = []
        for language, topics in self.languages.items():
            folder = (Path(self.embeddings_dir).expanduser() / language if keep
                      else Path(tempfile.mkdtemp(prefix=f"miracl-{language}-")))
            try:
                started = time.perf_counter()
                passages = self._passages(language)
                embeddings = encode_corpus(
                    lambda texts: encode_across_ranks(encoder, texts, "passage", **options), passages, folder,
                    model=encoder.name, config=self._encoding_config(language, encoder, dtype, fingerprint),
                    dim=encoder.output_dim, shard_size=self.shard_size,
                    total=len(passages) if isinstance(passages, list) else None,
                    progress=self.progress and rank == 0, option=f"dataset.embeddings_dir ({language})")
                qids = list(topics.topics)
                query_emb = encode_across_ranks(encoder, [topics.topics[q] for q in qids], "query", **options)
                timings["encode_s"] += time.perf_counter() - started

                started = time.perf_counter()
                index = self._index(embeddings, folder / f"index-{_spec_digest(self.index_spec)}", keep,
                                    encoder.name)
                timings["index_s"] += time.perf_counter() - started
                started = time.perf_counter()
                scores, rows = index.search(query_emb, self.top_k)
                timings["search_s"] += time.perf_counter() - started

                started = time.perf_counter()
                run = run_from_arrays(qids, scores, rows, index.ids)
                per_topic[language] = evaluate_run(run, topics.qrels)
                per_language[language] = mean_metrics(per_topic[language])
                judged = topics.judged_docids()
                missing = len(judged - set(index.ids))
                timings["metrics_s"] += time.perf_counter() - started
            finally:
                if not keep:
                    remove_embeddings(folder)
            runs[language] = run
            counts[language] = {"topics": len(qids), "passages": len(index), "judged_missing": missing,
                                "judged": len(judged), "dropped_topics": topics.dropped}
            if missing:
                notes.append(f"{language}: {missing} of {len(judged)} judged passages are not in the corpus "
                             "(they still count in the recall and ideal-DCG denominators)")
                log.warning(notes[-1])
        summary = {SETTING: {m: float(np.mean([v[m] for v in per_language.values()])) for m in METRICS}}
        return MiraclResult(summary, {SETTING: per_language}, counts, per_topic, timings, runs, notes)

    def _index(self, embeddings: Any, folder: Path, keep: bool, model: str) -> Any:
        """The index beside the embeddings when it was saved for these very embeddings, else a new one."""
        if keep and folder.is_dir():
            try:
                manifest = read_manifest(folder)
            except (FileNotFoundError, ValueError):
                manifest = None
            if manifest is not None and manifest.get("embeddings_config_hash") == embeddings.config_hash \
                    and manifest.get("count") == len(embeddings):
                return load_index(folder, vectors=embeddings)
        index = build_index(embeddings, self.index_spec, model=model)
        if keep:
            save_index(index, folder)
        return index

    def describe(self) -> str:
        topics = sum(len(x.topics) for x in self.languages.values())
        cap = ("full corpus" if self.max_corpus_passages is None
               else f"corpus capped at judged + {self.max_corpus_passages:,} other passages per language")
        return (f"MIRACL {self.split} ({', '.join(self.languages)}: {topics:,} topics; {cap}; index "
                f"{self.index_spec.get('type')}; top {self.top_k})")

    def write_report(self, result: MiraclResult, folder: Path, prefix: str = "") -> list[Path]:
        """``<prefix>metrics.json`` and one TREC run per language, ``<prefix>run.<lang>.trec`` (topic ids repeat
        across languages, so each run goes with its language's qrels file)."""
        files = [result.save_json(Path(folder) / f"{prefix}metrics.json")]
        for language, run in result.runs.items():
            files.append(write_run(Path(folder) / f"{prefix}run.{language}.trec", run, tag=f"hybrid_retrieval-{self.key}"))
        return files


def _spec_digest(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(spec), sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_set(key: str, dataset: Any) -> MiraclSet:
    """Topics, qrels and the corpus shards' locations (the corpus itself is read when evaluating)."""
    check_config(dataset)
    languages = data.check_languages(_plain(dataset.get("languages")))
    split = dataset.get("split", "dev")
    loaded = {x: data.load_language(x, dataset.get("root"), split, dataset.get("max_topics_per_language"))
              for x in languages}
    shards = {x: data.check_corpus_shards(data.corpus_dir(x, dataset.get("corpus_root"))) for x in languages}
    embeddings_dir = dataset.get("embeddings_dir")
    return MiraclSet(key=key, languages=loaded, shards=shards,
                     index_spec=_plain(dataset.get("index")) or {"type": "flat"},
                     top_k=int(dataset.get("top_k", MIN_TOP_K)), max_corpus_passages=dataset.get("max_corpus_passages"),
                     passage_text=dataset.get("passage_text", "title_text"),
                     shard_size=int(dataset.get("shard_size", 20000)),
                     embeddings_dir=None if embeddings_dir is None else os.fspath(embeddings_dir), split=split,
                     progress=bool(dataset.get("progress", True)))

