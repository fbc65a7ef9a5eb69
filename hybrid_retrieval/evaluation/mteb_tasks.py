"""This project's encoders under MTEB's own evaluation (the ``mteb`` package): the model wrapper, its ``ModelMeta``,
local retrieval tasks built from the LAReQA files in its three settings, an embedding cache, and the offline data
check.

- :class:`MtebEncoder` hands MTEB's texts to :meth:`Encoder.encode`: MTEB's ``query`` prompt type gets the
  model's query prefix, ``document`` its passage prefix (other task types, with no prompt type, the query prefix,
  E5's convention for symmetric tasks); ``model.truncate_dim`` applies as everywhere else.
- :func:`model_meta` names the model ``hybrid_retrieval/<name>`` and records the base model as ``adapted_from``:
  MTEB files results under the name, so a fine-tuned model must never carry its base model's name (it would be
  filed with, and reuse the cached results of, the base model).
- :func:`lareqa_task` / :data:`LOCAL_TASKS`: ``XQuADRMonolingual``, ``XQuADRCrossLingual``, ``XQuADRMultilingual``
  and ``MLQARMonolingual``, ``MLQARCrossLingual``, ``MLQARMultilingual``: retrieval tasks whose data is this
  project's XQuAD-R / MLQA-R files, laid out as MTEB's multilingual retrieval tasks are (``dataset[subset][split]``
  with corpus / queries / relevant_docs): one subset per language (mono), per ordered language pair (cross,
  ``en-de``: English questions against German sentences) or one subset over the pooled candidates of every
  language (multi). Their main score ``map`` is this project's mean average precision over the whole ranking, and
  equals :func:`~hybrid_retrieval.evaluation.lareqa_protocol.evaluate_embeddings`' ``summary[setting]["map"]``; the
  multilingual task adds rank distance, Max@R and own-language-first. MTEB does not know these tasks by name:
  pass the task objects (:func:`resolve_tasks`) to ``ResultCache.load_results(tasks=...)`` or
  ``TaskResult.validate_and_filter_scores(task)``.
- :class:`SharedEmbeddingCache` / :func:`embedding_cache`: MTEB's embedding cache, shared by a dataset's settings.
- :func:`check_task_data` loads every task's data before anything is encoded and names the task that is not
  reachable (offline) and how to provide it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.cache_wrappers import CachedEmbeddingWrapper
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from hybrid_retrieval.config_error import BadValue

ORGANISATION = "hybrid_retrieval"
# LAReQA language codes -> MTEB's ISO 639-3 + script codes.
LANGUAGE_CODES = {"ar": "arb-Arab", "de": "deu-Latn", "el": "ell-Grek", "en": "eng-Latn", "es": "spa-Latn",
                  "hi": "hin-Deva", "ru": "rus-Cyrl", "th": "tha-Thai", "tr": "tur-Latn", "vi": "vie-Latn",
                  "zh": "zho-Hans"}


class TaskDataError(RuntimeError):
    """An MTEB task's data is not reachable; the message names the task and how to provide it."""


class MtebEncoder(AbsEncoder):
    """An :class:`~hybrid_retrieval.models.encoder.Encoder` as MTEB's encoder protocol."""

    def __init__(self, encoder: Any, meta: ModelMeta, batch_size: int = 64, dtype: Any = None) -> None:
        self.encoder = encoder
        self.mteb_model_meta = meta
        self.batch_size = batch_size
        self.dtype = dtype

    def encode(self, inputs: Any, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        kind = "passage" if prompt_type == PromptType.document else "query"
        return self.encoder.encode(texts, kind, batch_size=self.batch_size, dtype=self.dtype)


def weights_revision(encoder: Any) -> str:
    """A short hash of the weights: MTEB's revision folder, so retrained weights are never taken for cached ones."""
    import torch

    digest = hashlib.sha1()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def model_meta(encoder: Any, name: str, revision: str, base_model: str | None = None) -> ModelMeta:
    """MTEB's description of ``encoder``, filed as ``hybrid_retrieval/<name>`` (``name`` without an organisation)."""
    experiment = {"truncate_dim": encoder.truncate_dim} if encoder.truncate_dim is not None else None
    return ModelMeta.create_empty(overwrites={
        "name": name if "/" in name else f"{ORGANISATION}/{name}", "revision": revision,
        "embed_dim": encoder.output_dim, "max_tokens": encoder.max_lengths["passage"],
        "similarity_fn_name": ScoringFunction.COSINE if encoder.normalize or encoder.truncate_dim
        else ScoringFunction.DOT_PRODUCT,
        "framework": ["PyTorch"], "adapted_from": base_model, "open_weights": True,
        "n_parameters": int(sum(p.numel() for p in encoder.parameters())),
        "experiment_kwargs": experiment,
    })


# ----------------------------------------------------------------------------------------------------------
# The LAReQA settings as MTEB retrieval tasks

# The project's main metric (AP over the full ranking, mean over queries; hybrid_retrieval.evaluation.metrics) and
# the language-bias metrics of the multilingual setting, added to MTEB's own scores of every subset.
MAIN_METRIC = "map"
MULTI_METRICS = ("map", "rank_distance", "max_at_r", "own_language_first")
# Bumped when what a task computes changes, so results cached under an older definition are never reused.
TASK_VERSION = 2


def _mteb_codes(languages: Sequence[str], name: str) -> None:
    unknown = [x for x in languages if x not in LANGUAGE_CODES]
    if unknown:
        raise BadValue(f"{name}: no MTEB language code for {unknown}; known: {sorted(LANGUAGE_CODES)}")


class _Recorder:
    """An MTEB encoder passed through unchanged that keeps what it returns for queries and documents, so the task
    can rank the whole pool with the model's own similarity function (MTEB keeps only the top k)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.mteb_model_meta = model.mteb_model_meta
        self.embeddings: dict[PromptType, list[Any]] = {PromptType.query: [], PromptType.document: []}

    def encode(self, inputs: Any, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> Any:
        out = self.model.encode(inputs, task_metadata=task_metadata, hf_split=hf_split, hf_subset=hf_subset,
                                prompt_type=prompt_type, **kwargs)
        if prompt_type in self.embeddings:
            self.embeddings[prompt_type].append(out)
        return out

    def similarity(self, embeddings1: Any, embeddings2: Any) -> Any:
        return self.model.similarity(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Any:
        return self.model.similarity_pairwise(embeddings1, embeddings2)

    def stacked(self, prompt_type: PromptType, expected: int) -> Any | None:
        """The embeddings of one prompt type in encoding order (MTEB encodes queries at once and the corpus in
        order, chunk by chunk), or None when their number is not ``expected``."""
        import torch

        parts = [torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
                 for x in self.embeddings[prompt_type]]
        if not parts or sum(len(x) for x in parts) != expected:
            return None
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def ranks_by_similarity(model: Any, queries: Any, corpus: Any, relevant: Sequence[np.ndarray],
                        chunk: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query index, relevant corpus index, rank) of every (query, relevant document) pair, scores from
    ``model.similarity`` (what MTEB ranks by), over the whole corpus. Ties take the last position of their group,
    this project's rule (:mod:`hybrid_retrieval.evaluation.ranks`)."""
    import torch

    query_index, doc_index, ranks = [], [], []
    for start in range(0, len(relevant), chunk):
        stop = min(start + chunk, len(relevant))
        scores = torch.as_tensor(model.similarity(queries[start:stop], corpus)).float().cpu().numpy()
        for row in range(stop - start):
            docs = np.asarray(relevant[start + row], dtype=np.int64)
            thresholds = scores[row, docs]
            query_index.append(np.full(len(docs), start + row, dtype=np.int64))
            doc_index.append(docs)
            ranks.append((scores[row][None, :] >= thresholds[:, None]).sum(axis=1).astype(np.int64))
    if not ranks:
        return (np.zeros(0, dtype=np.int64),) * 3
    return np.concatenate(query_index), np.concatenate(doc_index), np.concatenate(ranks)


def ranks_from_results(results: dict[str, dict[str, float]], query_ids: Sequence[str],
                       relevant: Sequence[np.ndarray], corpus_ids: Sequence[str]) -> tuple[np.ndarray, ...]:
    """As :func:`ranks_by_similarity` from MTEB's retrieved top k (models that are not encoders: search models,
    cross-encoders): a relevant document MTEB did not retrieve is put last in the pool (a lower bound on AP)."""
    query_index, doc_index, ranks = [], [], []
    for i, qid in enumerate(query_ids):
        retrieved = results.get(qid, {})
        values = np.fromiter(retrieved.values(), dtype=np.float64, count=len(retrieved))
        for j in relevant[i]:
            score = retrieved.get(corpus_ids[j])
            query_index.append(i)
            doc_index.append(int(j))
            ranks.append(int((values >= score).sum()) if score is not None else len(corpus_ids))
    return (np.asarray(query_index, dtype=np.int64), np.asarray(doc_index, dtype=np.int64),
            np.asarray(ranks, dtype=np.int64))


def lareqa_scores(query_index: np.ndarray, ranks: np.ndarray, n_queries: int,
                  pair_language: np.ndarray | None = None, query_language: np.ndarray | None = None,
                  languages: Sequence[str] | None = None) -> dict[str, float]:
    """The project's scores of one MTEB subset from the ranks of its relevant documents (flat (query, rank) pairs).

    Without ``languages`` (a monolingual / cross-lingual subset): ``map``, the mean AP over the subset's queries.
    With them (the multilingual subset; ``pair_language``: each pair's document language, ``query_language``: each
    query's, both indices into ``languages``): the macro averages over query languages of ``map``,
    ``rank_distance``, ``max_at_r`` and ``own_language_first``, computed as
    :func:`~hybrid_retrieval.evaluation.lareqa_protocol.evaluate_embeddings` does, plus each language's values as
    ``<metric>_<language>``."""
    from hybrid_retrieval.evaluation.lareqa_protocol import macro_mean, mean_by_group
    from hybrid_retrieval.evaluation.metrics import own_language_first, per_query_metrics

    by_query = per_query_metrics(query_index, ranks, n_queries)
    if languages is None:
        return {MAIN_METRIC: float(np.nanmean(by_query[MAIN_METRIC]))}
    by_query["own_language_first"] = own_language_first(query_index, ranks, pair_language, query_language, n_queries)
    per_language = mean_by_group(by_query, query_language, MULTI_METRICS, list(languages))
    scores = macro_mean(per_language, MULTI_METRICS)
    for language, values in per_language.items():
        scores.update({f"{metric}_{language}": value for metric, value in values.items()})
    return scores


SETTING_NAMES = {"mono": "Monolingual", "cross": "CrossLingual", "multi": "Multilingual"}
DATASET_TASK_PREFIX = {"xquad_r": "XQuADR", "mlqa_r": "MLQAR"}
DATASET_LABELS = {"xquad_r": "XQuAD-R", "mlqa_r": "MLQA-R"}
SETTING_DESCRIPTIONS = {
    "mono": "monolingual setting: one subset per language, its questions against the answer sentences of the same "
            "language",
    "cross": "cross-lingual setting: one subset per ordered language pair X-Y, the questions of X (those with an "
             "answer in Y) against the answer sentences of Y",
    "multi": "multilingual setting: one subset, the questions of every language against one pool of the answer "
             "sentences of all languages (a question's relevant sentences are its answer in every language); "
             "adds the language bias: rank distance, Max@R and own-language-first",
}


class LareqaRetrieval(AbsTaskRetrieval):
    """One LAReQA setting of one dataset as an MTEB retrieval task (built by :func:`lareqa_task`).

    Every subset's scores are MTEB's own (nDCG@k, MAP@k, recall@k, ... from its top-k search) plus the project's
    ``map`` (AP over the whole ranking, the main score) and, in the multilingual subset, the language bias. The
    project's scores rank every document of the subset with the model's own ``similarity`` on the embeddings MTEB
    computed (recorded on the way, nothing is encoded twice); for a model that is not an encoder (a search model,
    a cross-encoder) they are read off MTEB's top k, a relevant document outside it counted last.
    """

    split: Any  # hybrid_retrieval.data.lareqa.LareqaSplit
    setting: str
    passage_text: str
    subset_members: dict[str, tuple[list[int], list[int]]]  # subset -> (query indices, candidate indices)
    _pending: tuple[Any, Any] | None = None

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        from datasets import Dataset

        texts = self.split.candidate_texts(self.passage_text)
        self.dataset = {}
        for subset, (query_indices, candidate_indices) in self.subset_members.items():
            chosen = set(candidate_indices)
            relevant = {f"q{i}": {f"c{j}": 1 for j in self.split.relevant[i].tolist() if j in chosen}
                        for i in query_indices}
            self.dataset[subset] = {self.metadata.eval_splits[0]: {
                "corpus": Dataset.from_list([{"id": f"c{j}", "text": texts[j]} for j in candidate_indices]),
                "queries": Dataset.from_list([{"id": f"q{i}", "text": self.split.queries[i].text}
                                              for i in query_indices]),
                "relevant_docs": relevant, "top_ranked": None}}
        self.data_loaded = True

    def _evaluate_subset(self, model: Any, data_split: Any, *, encode_kwargs: Any, hf_split: str, hf_subset: str,
                         prediction_folder: Any = None, num_proc: int | None = None, timer: Any = None,
                         **kwargs: Any) -> Any:
        from mteb.models import EncoderProtocol, SearchProtocol

        recorder = _Recorder(model) if isinstance(model, EncoderProtocol) and not isinstance(model, SearchProtocol) \
            else None
        self._pending = (recorder, data_split)
        try:
            return super()._evaluate_subset(recorder or model, data_split, encode_kwargs=encode_kwargs,
                                            hf_split=hf_split, hf_subset=hf_subset,
                                            prediction_folder=prediction_folder, num_proc=num_proc, timer=timer,
                                            **kwargs)
        finally:
            self._pending = None

    def task_specific_scores(self, scores: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]],
                             results: dict[str, dict[str, float]], hf_split: str, hf_subset: str) -> dict[str, float]:
        recorder, data_split = self._pending if self._pending is not None else (None, None)
        if data_split is None:
            raise RuntimeError(f"{self.metadata.name}: task_specific_scores runs inside _evaluate_subset only")
        query_ids = list(data_split["queries"]["id"])
        corpus_ids = list(data_split["corpus"]["id"])
        position = {doc: k for k, doc in enumerate(corpus_ids)}
        relevant = [np.array(sorted(position[d] for d, r in qrels[q].items() if r > 0), dtype=np.int64)
                    for q in query_ids]
        queries = recorder.stacked(PromptType.query, len(query_ids)) if recorder is not None else None
        corpus = recorder.stacked(PromptType.document, len(corpus_ids)) if recorder is not None else None
        if queries is not None and corpus is not None:
            query_index, doc_index, ranks = ranks_by_similarity(recorder, queries, corpus, relevant)
        else:
            query_index, doc_index, ranks = ranks_from_results(results, query_ids, relevant, corpus_ids)
        if self.setting != "multi":
            return lareqa_scores(query_index, ranks, len(query_ids))
        index = {language: i for i, language in enumerate(self.split.languages)}
        doc_language = np.array([index[self.split.candidates[int(d[1:])].language] for d in corpus_ids],
                                dtype=np.int64)
        query_language = np.array([index[self.split.queries[int(q[1:])].language] for q in query_ids],
                                  dtype=np.int64)
        return lareqa_scores(query_index, ranks, len(query_ids), doc_language[doc_index], query_language,
                             self.split.languages)


def lareqa_subsets(split: Any, setting: str) -> dict[str, tuple[list[int], list[int]]]:
    """MTEB subsets of one LAReQA setting: subset name -> (query indices, candidate indices) into ``split``.

    ``mono``: ``<x>`` per language (x's queries, x's candidates); ``cross``: ``<x>-<y>`` per ordered pair of
    different languages holding at least one query of x with a relevant candidate in y (those queries, y's
    candidates); ``multi``: ``default``, every query against every candidate. These are exactly the groups
    :func:`~hybrid_retrieval.evaluation.lareqa_protocol.evaluate_embeddings` averages over.
    """
    if setting not in SETTING_NAMES:
        raise BadValue(f"setting={setting!r}: expected one of {list(SETTING_NAMES)}")
    if setting == "multi":
        return {"default": (list(range(len(split.queries))), list(range(len(split.candidates))))}
    members = {x: [j for j, c in enumerate(split.candidates) if c.language == x] for x in split.languages}
    candidate_language = [c.language for c in split.candidates]
    subsets: dict[str, tuple[list[int], list[int]]] = {}
    for x in split.languages:
        for y in split.languages:
            if (x == y) != (setting == "mono"):
                continue
            queries = [i for i, q in enumerate(split.queries)
                       if q.language == x and any(candidate_language[j] == y for j in split.relevant[i].tolist())]
            if queries:
                subsets[x if setting == "mono" else f"{x}-{y}"] = (queries, members[y])
    return subsets


def lareqa_task(name: str, dataset: str, setting: str = "mono", root: Any = None,
                languages: Sequence[str] | None = None, max_questions_per_language: int | None = None,
                passage_text: str = "sentence") -> LareqaRetrieval:
    """A retrieval task over this project's XQuAD-R / MLQA-R files in one setting of the LAReQA protocol
    (``mono``, ``cross`` or ``multi``; :func:`lareqa_subsets`), relevance as LAReQA's.

    Main score ``map``: the project's mean average precision over the whole ranking, per subset the mean over its
    queries. MTEB averages a task's subsets with equal weight, so the task's score is the project's: the macro
    average over languages (mono) or over ordered language pairs (cross). The multilingual task is one subset
    whose ``map`` (and ``rank_distance``, ``max_at_r``, ``own_language_first``) is already the macro average over
    query languages, as the project reports it; MTEB's own scores of that subset (``ndcg_at_10``, ...) are means
    over all its queries, which differ from the macro average only where languages have different numbers of
    questions (MLQA-R; XQuAD-R is parallel).

    The dataset revision is ``local-<hash>`` of what selects the data (languages, cap, passage text) and of the
    task's definition, so results cached for another selection are recognised as such.
    """
    from hybrid_retrieval.data.lareqa import load_split

    if setting not in SETTING_NAMES:
        raise BadValue(f"{name}: setting={setting!r}: expected one of {list(SETTING_NAMES)}")
    split = load_split(dataset, root=root, languages=list(languages) if languages else None,
                       max_questions_per_language=max_questions_per_language)
    split.candidate_texts(passage_text)  # checks the option
    _mteb_codes(split.languages, name)
    subsets = lareqa_subsets(split, setting)
    if not subsets:
        raise BadValue(f"{name}: no queries in the {setting} setting for languages {split.languages}")
    if setting == "mono":
        eval_langs: Any = {x: [LANGUAGE_CODES[x]] for x in subsets}
    elif setting == "cross":
        eval_langs = {pair: [LANGUAGE_CODES[x] for x in pair.split("-")] for pair in subsets}
    else:
        eval_langs = [LANGUAGE_CODES[x] for x in split.languages]
    selection = {"version": TASK_VERSION, "dataset": dataset, "setting": setting, "languages": split.languages,
                 "max_questions_per_language": max_questions_per_language, "passage_text": passage_text,
                 "queries": len(split.queries), "candidates": len(split.candidates)}
    revision = "local-" + hashlib.sha1(json.dumps(selection, sort_keys=True).encode()).hexdigest()[:10]
    label = DATASET_LABELS.get(dataset, dataset)
    metadata = TaskMetadata(
        name=name, type="Retrieval", category="t2t", modalities=["text"], main_score=MAIN_METRIC,
        description=f"{label} (LAReQA, Roy et al. 2020), {SETTING_DESCRIPTIONS[setting]}; read from "
                    "hybrid_retrieval's local data files. Main score: mean average precision over the whole ranking.",
        reference="https://github.com/google-research-datasets/lareqa",
        dataset={"path": f"local/{dataset}", "revision": revision}, eval_splits=["test"], eval_langs=eval_langs,
        date=("2020-04-01", "2020-04-30"), domains=["Encyclopaedic", "Written"],
        task_subtypes=["Question answering"], license="cc-by-sa-4.0" if dataset == "xquad_r" else "cc-by-nc-4.0",
        annotations_creators="human-annotated", dialect=[], sample_creation="found", bibtex_citation="")

    task_class = type(name, (LareqaRetrieval,), {"metadata": metadata})
    task = task_class()
    task.split, task.setting, task.passage_text, task.subset_members = split, setting, passage_text, subsets
    return task


# MTEB task name -> (this project's dataset, LAReQA setting), for every dataset and setting.
LOCAL_TASKS = {f"{prefix}{SETTING_NAMES[setting]}": (dataset, setting)
               for dataset, prefix in DATASET_TASK_PREFIX.items() for setting in SETTING_NAMES}


class SharedEmbeddingCache(CachedEmbeddingWrapper):
    """MTEB's embedding cache (``mteb.models.cache_wrappers``: a store per task and prompt type, keyed by a hash of
    each text), except that this project's local tasks of one dataset share one store: their three settings encode
    the same questions and sentences, and :class:`MtebEncoder`'s prefixes do not depend on the task. A second
    command on the same model (same folder) encodes nothing it has encoded before."""

    def _get_or_create_cache(self, task_name: str, prompt_type: PromptType | None,
                             encode_kwargs: dict[str, Any] | None = None) -> Any:
        local = LOCAL_TASKS.get(task_name)
        return super()._get_or_create_cache(f"lareqa_{local[0]}" if local else task_name, prompt_type,
                                            encode_kwargs)


def embedding_cache(model: Any, folder: Any) -> SharedEmbeddingCache:
    """``model`` with its embeddings cached under ``folder`` (one folder per model, revision and encoder settings:
    see :func:`encoder_settings`); a truncated model's go to an experiment folder of their own."""
    import functools

    from mteb.models.cache_wrappers.cache_backends.numpy_cache import NumpyCache

    return SharedEmbeddingCache(model, folder, cache_backend=functools.partial(NumpyCache, initial_vectors=4096))


def encoder_settings(encoder: Any, dtype: Any = None) -> str:
    """A short hash of what changes an encoder's embeddings besides its weights (prefixes, maximum lengths,
    pooling, normalisation, the encoding dtype): the embedding cache's folder below the weights' revision."""
    settings = {"prefixes": dict(encoder.prefixes), "max_lengths": dict(encoder.max_lengths),
                "pooling": getattr(encoder, "pooling", None), "normalize": bool(getattr(encoder, "normalize", True)),
                "dtype": str(dtype)}
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def resolve_tasks(names: Sequence[str], local: dict[str, Any] | None = None) -> list[Any]:
    """MTEB tasks by name (``mteb.get_task``), this project's local ones (:data:`LOCAL_TASKS`, built with the
    ``local`` options: root, languages, max_questions_per_language, passage_text) included."""
    import mteb

    tasks = []
    for name in names:
        if name in LOCAL_TASKS:
            dataset, setting = LOCAL_TASKS[name]
            tasks.append(lareqa_task(name, dataset, setting, **(local or {})))
            continue
        try:
            tasks.append(mteb.get_task(name))
        except (KeyError, ValueError) as error:
            raise BadValue(f"tasks: {name!r} is not an MTEB task ({error}); the local ones are "
                             f"{sorted(LOCAL_TASKS)}, MTEB's are listed by `mteb.get_tasks()`") from error
    return tasks


def check_task_data(tasks: Sequence[Any]) -> None:
    """Load every task's data now, before any encoding; a task whose data cannot be loaded raises
    :class:`TaskDataError` naming it, where its data lives and how to provide it."""
    for task in tasks:
        try:
            task.load_data()
        except Exception as error:  # datasets / huggingface_hub raise many kinds when offline
            path = task.metadata.dataset.get("path")
            revision = task.metadata.dataset.get("revision")
            raise TaskDataError(
                f"tasks: {task.metadata.name}: its data (Hugging Face dataset {path!r}, revision {revision}) is not "
                f"reachable ({type(error).__name__}: {str(error)[:300]}). Provide it: on a machine with network run "
                f"`python -c \"import mteb; mteb.get_task('{task.metadata.name}').load_data()\"`, copy its Hugging "
                "Face cache (~/.cache/huggingface, or $HF_HOME) to this machine (same path, or set HF_HOME), and run "
                "again; or drop the task from tasks=[...]") from error


def main_scores(result: Any, tasks: Sequence[Any]) -> dict[str, float]:
    """``mteb/<task>/<subset>/<main score>`` for every subset of every task's evaluation splits, and their mean as
    ``mteb/<task>/<main score>`` (MTEB's own task score: subsets weigh equally): MLflow metric names. ``result``:
    what ``mteb.evaluate`` returns, or a list of its task results."""
    main = {task.metadata.name: task.metadata.main_score for task in tasks}
    metrics: dict[str, float] = {}
    for task_result in getattr(result, "task_results", result):
        metric = main.get(task_result.task_name, "main_score")
        values = []
        for split, subsets in task_result.scores.items():
            for subset in subsets:
                if subset.get("main_score") is None:
                    continue
                name = subset["hf_subset"] if len(task_result.scores) == 1 else f"{split}/{subset['hf_subset']}"
                metrics[f"mteb/{task_result.task_name}/{name}/{metric}"] = float(subset["main_score"])
                values.append(float(subset["main_score"]))
        if values:
            metrics[f"mteb/{task_result.task_name}/{metric}"] = float(np.mean(values))
    return metrics
