"""This project's encoders under MTEB's own evaluation (the ``mteb`` package): the model wrapper, its ``ModelMeta``,
local retrieval tasks built from the LAReQA files, and the offline data check.

- :class:`MtebEncoder` hands MTEB's texts to :meth:`Encoder.encode`: MTEB's ``query`` prompt type gets the
  model's query prefix, ``document`` its passage prefix (other task types, with no prompt type, the query prefix,
  E5's convention for symmetric tasks); ``model.truncate_dim`` applies as everywhere else.
- :func:`model_meta` names the model ``hybrid_retrieval/<name>`` and records the base model as ``adapted_from``:
  MTEB files results under the name, so a fine-tuned model must never carry its base model's name (it would be
  filed with, and reuse the cached results of, the base model).
- :func:`lareqa_task`: ``XQuADRMonolingual`` / ``MLQARMonolingual``, retrieval tasks whose data is this project's
  XQuAD-R / MLQA-R files (one subset per language: its queries against the candidate sentences of the same
  language), so MTEB's evaluation runs offline and can be compared with the project's own evaluator.
- :func:`check_task_data` loads every task's data before anything is encoded and names the task that is not
  reachable (offline) and how to provide it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

ORGANISATION = "hybrid_retrieval"
# Local tasks: MTEB task name -> this project's dataset name.
LOCAL_TASKS = {"XQuADRMonolingual": "xquad_r", "MLQARMonolingual": "mlqa_r"}
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


def lareqa_task(name: str, dataset: str, root: Any = None, languages: Sequence[str] | None = None,
                max_questions_per_language: int | None = None, passage_text: str = "sentence") -> AbsTaskRetrieval:
    """A retrieval task over this project's XQuAD-R / MLQA-R files: one subset per language, each language's queries
    against that language's candidates (the monolingual setting of the LAReQA protocol), relevance as LAReQA's."""
    from hybrid_retrieval.data.lareqa import load_split

    split = load_split(dataset, root=root, languages=list(languages) if languages else None,
                       max_questions_per_language=max_questions_per_language)
    unknown = [x for x in split.languages if x not in LANGUAGE_CODES]
    if unknown:
        raise ValueError(f"{name}: no MTEB language code for {unknown}; known: {sorted(LANGUAGE_CODES)}")
    label = {"xquad_r": "XQuAD-R", "mlqa_r": "MLQA-R"}.get(dataset, dataset)
    metadata = TaskMetadata(
        name=name, type="Retrieval", category="t2t", modalities=["text"], main_score="ndcg_at_10",
        description=f"{label} (LAReQA, Roy et al. 2020), monolingual setting: each language's questions against "
                    "the answer sentences of the same language, read from hybrid_retrieval's local data files.",
        reference="https://github.com/google-research-datasets/lareqa",
        dataset={"path": f"local/{dataset}", "revision": "local"}, eval_splits=["test"],
        eval_langs={x: [LANGUAGE_CODES[x]] for x in split.languages}, date=("2020-04-01", "2020-04-30"),
        domains=["Encyclopaedic", "Written"], task_subtypes=["Question answering"], license="cc-by-sa-4.0",
        annotations_creators="human-annotated", dialect=[], sample_creation="found", bibtex_citation="")
    texts = split.candidate_texts(passage_text)

    def subsets() -> dict[str, dict[str, Any]]:
        from datasets import Dataset

        data: dict[str, dict[str, Any]] = {}
        for language in split.languages:
            members = [i for i, c in enumerate(split.candidates) if c.language == language]
            chosen = set(members)
            queries, relevant = [], {}
            for i, query in enumerate(split.queries):
                if query.language != language:
                    continue
                positives = {f"c{j}": 1 for j in split.relevant[i].tolist() if j in chosen}
                if positives:
                    queries.append({"id": f"q{i}", "text": query.text})
                    relevant[f"q{i}"] = positives
            data[language] = {"test": {
                "corpus": Dataset.from_list([{"id": f"c{j}", "text": texts[j]} for j in members]),
                "queries": Dataset.from_list(queries), "relevant_docs": relevant, "top_ranked": None}}
        return data

    class LareqaMonolingual(AbsTaskRetrieval):
        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            self.dataset = subsets()
            self.data_loaded = True

    LareqaMonolingual.metadata = metadata
    LareqaMonolingual.__name__ = name
    return LareqaMonolingual()


def resolve_tasks(names: Sequence[str], local: dict[str, Any] | None = None) -> list[Any]:
    """MTEB tasks by name (``mteb.get_task``), this project's local ones (:data:`LOCAL_TASKS`, built with the
    ``local`` options: root, languages, max_questions_per_language, passage_text) included."""
    import mteb

    tasks = []
    for name in names:
        if name in LOCAL_TASKS:
            tasks.append(lareqa_task(name, LOCAL_TASKS[name], **(local or {})))
            continue
        try:
            tasks.append(mteb.get_task(name))
        except (KeyError, ValueError) as error:
            raise ValueError(f"tasks: {name!r} is not an MTEB task ({error}); the local ones are "
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
    ``mteb/<task>/<main score>``: MLflow metric names."""
    main = {task.metadata.name: task.metadata.main_score for task in tasks}
    metrics: dict[str, float] = {}
    for task_result in result.task_results:
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
