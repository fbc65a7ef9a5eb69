"""The LAReQA protocol (mono / cross / multi, rank distance) as a sentence-transformers evaluator.

:class:`LareqaEvaluator` runs this project's evaluation on any ``SentenceTransformer``, for example inside
``SentenceTransformerTrainer``::

    from hybrid_retrieval.evaluation.st_evaluator import LareqaEvaluator

    evaluator = LareqaEvaluator("xquad_r", languages=["en", "de", "el"], max_questions_per_language=200)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss, evaluator=evaluator)

It encodes the split's queries with ``model.encode_query`` (the model's ``query`` prompt, when it has one) and its
candidate sentences with ``model.encode_document`` (the ``document`` / ``passage`` / ``corpus`` prompt, when it has
one); the folders :func:`~hybrid_retrieval.models.model_folder.export_encoder` writes define ``query`` and ``document``.
Embeddings are L2-normalised when the model scores by cosine (``similarity_fn_name``), kept as they are when it
scores by dot product, and handed to :func:`~hybrid_retrieval.evaluation.lareqa_protocol.evaluate_split`: the metrics are
this project's, computed by its code, exact over the full ranking.

Metric names follow sentence-transformers: ``{name}_{setting}_{metric}`` (``name`` defaults to the dataset name),
e.g. ``xquad_r_multi_map``, ``xquad_r_cross_ndcg_at_10``, ``xquad_r_multi_rank_distance``; the trainer adds
``eval_``. :attr:`primary_metric` is the multilingual mAP (``{name}_multi_map``).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.data.lareqa import LareqaSplit, format_passage, load_split
from hybrid_retrieval.evaluation.lareqa_protocol import SETTINGS, SUMMARY_METRICS, EvaluationResult, evaluate_split
from hybrid_retrieval.evaluation.sets import KIND_OF_DATASET

try:  # sentence-transformers 5.4 and later
    from sentence_transformers.base.evaluation import BaseEvaluator as SentenceEvaluator
except ImportError:  # earlier releases
    from sentence_transformers.evaluation import SentenceEvaluator

__all__ = ["LAREQA_DATASETS", "LareqaEvaluator"]

logger = logging.getLogger(__name__)

LAREQA_DATASETS = tuple(name for name, module in KIND_OF_DATASET.items()
                        if module == "hybrid_retrieval.evaluation.lareqa")
# similarity_fn_name -> whether embeddings are L2-normalised before the protocol's inner products.
NORMALISE_FOR = {"cosine": True, "dot": False}


def _check_settings(settings: Any) -> tuple[str, ...]:
    chosen = (settings,) if isinstance(settings, str) else tuple(settings)
    unknown = [s for s in chosen if s not in SETTINGS]
    if not chosen or unknown:
        raise BadValue(f"settings={settings!r}: expected a non-empty selection of {list(SETTINGS)}"
                         + (f" (unknown: {unknown})" if unknown else ""))
    return tuple(dict.fromkeys(chosen))


class LareqaEvaluator(SentenceEvaluator):
    """The LAReQA protocol on XQuAD-R or MLQA-R for a ``SentenceTransformer`` (see the module docstring).

    Args:
        dataset: ``"xquad_r"`` or ``"mlqa_r"`` (read with :func:`~hybrid_retrieval.data.lareqa.load_split` from
            ``root``, default ``$HYBRID_RETRIEVAL_DATA``), or a prepared
            :class:`~hybrid_retrieval.data.lareqa.LareqaSplit` (then ``languages``, ``max_questions_per_language``
            and ``root`` must stay unset).
        languages: languages to evaluate (queries and the pooled candidates); None: all of the dataset's.
        max_questions_per_language: cap on questions per language, parallel across languages; None: all.
        root: folder holding the datasets.
        name: prefix of the metric names; None: the dataset name; ``""``: no prefix.
        batch_size: encoding batch size.
        settings: which of ``"mono"``, ``"cross"``, ``"multi"`` to report (all three are computed).
        passage_text: ``"sentence"`` (the LAReQA candidate) or ``"sentence_paragraph"`` (sentence + its paragraph).
        truncate_dim: encode to the first k dimensions (re-normalised for cosine models); None: the model's own.
        query_prompt_name / document_prompt_name: prompts to use instead of the model's defaults.
        num_threads: threads of the rank computation.
        show_progress_bar: show sentence-transformers' encoding progress bars.
        write_csv: append the metrics to ``LAReQA_evaluation_<name>_results.csv`` in ``output_path``, when given.
    """

    def __init__(self, dataset: str | LareqaSplit = "xquad_r", languages: Sequence[str] | str | None = None,
                 max_questions_per_language: int | None = None, root: str | os.PathLike[str] | None = None,
                 name: str | None = None, batch_size: int = 32, settings: Sequence[str] = SETTINGS,
                 passage_text: str = "sentence", truncate_dim: int | None = None,
                 query_prompt_name: str | None = None, document_prompt_name: str | None = None,
                 num_threads: int = 2, show_progress_bar: bool = False, write_csv: bool = True) -> None:
        super().__init__()
        self.settings = _check_settings(settings)
        format_passage("", "", passage_text)  # a bad passage_text fails here, naming the option
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise BadValue(f"batch_size={batch_size!r}: expected a positive int")
        if isinstance(dataset, LareqaSplit):
            file_options = {"languages": languages, "max_questions_per_language": max_questions_per_language,
                            "root": root}
            given = [k for k, v in file_options.items() if v is not None]
            if given:
                raise BadValue(f"{given} select data from the dataset files; with a prepared LareqaSplit "
                                 "as dataset, leave them unset")
            self.split = dataset
        elif isinstance(dataset, str) and dataset in LAREQA_DATASETS:
            self.split = load_split(dataset, root=root, languages=languages,
                                    max_questions_per_language=max_questions_per_language)
        else:
            raise BadValue(f"dataset={dataset!r}: expected one of {list(LAREQA_DATASETS)} or a LareqaSplit")
        if "cross" in self.settings and len(self.split.languages) < 2:
            raise BadValue(f"settings={list(self.settings)} includes 'cross', which needs at least two languages "
                             f"(got {self.split.languages}); leave 'cross' out of settings")
        self.dataset = self.split.name
        self.languages = list(self.split.languages)
        self.max_questions_per_language = max_questions_per_language
        self.name = self.split.name if name is None else str(name)
        self.batch_size = batch_size
        self.passage_text = passage_text
        self.truncate_dim = truncate_dim
        self.query_prompt_name = query_prompt_name
        self.document_prompt_name = document_prompt_name
        self.num_threads = num_threads
        self.show_progress_bar = show_progress_bar
        self.write_csv = write_csv
        self.metric_names = [f"{s}_{m}" for s in self.settings for m in SUMMARY_METRICS[s]]
        self.csv_file = "LAReQA_evaluation" + (f"_{self.name}" if self.name else "") + "_results.csv"
        self.csv_headers = ["epoch", "steps", *self.metric_names]
        self.greater_is_better = True
        main = "multi" if "multi" in self.settings else self.settings[0]
        self.primary_metric = f"{self.name}_{main}_map" if self.name else f"{main}_map"
        self.last_result: EvaluationResult | None = None  # the latest call's full result (per language, per pair)

    # ------------------------------------------------------------------------------------------------ evaluation

    def embed(self, model: Any) -> tuple[np.ndarray, np.ndarray]:
        """The split's (query, candidate) embeddings as float32 arrays, scored by inner product."""
        similarity = str(getattr(model, "similarity_fn_name", None) or "cosine")
        if similarity not in NORMALISE_FOR:
            raise BadValue(f"model.similarity_fn_name={similarity!r}: the LAReQA protocol ranks by inner product, "
                             f"so the model must score by one of {list(NORMALISE_FOR)}")
        options = {"batch_size": self.batch_size, "show_progress_bar": self.show_progress_bar,
                   "convert_to_numpy": True, "normalize_embeddings": NORMALISE_FOR[similarity],
                   "truncate_dim": self.truncate_dim}
        queries = model.encode_query(self.split.query_texts(), prompt_name=self.query_prompt_name, **options)
        candidates = model.encode_document(self.split.candidate_texts(self.passage_text),
                                           prompt_name=self.document_prompt_name, **options)
        return np.asarray(queries, dtype=np.float32), np.asarray(candidates, dtype=np.float32)

    def __call__(self, model: Any, output_path: str | None = None, epoch: int = -1, steps: int = -1,
                 *args: Any, **kwargs: Any) -> dict[str, float]:
        where = "" if epoch == -1 else f" at epoch {epoch}" + ("" if steps == -1 else f", step {steps}")
        logger.info(f"LAReQA evaluation of the model on {self.describe_data()}{where}:")
        query_emb, candidate_emb = self.embed(model)
        result = evaluate_split(query_emb, candidate_emb, self.split, num_threads=self.num_threads)
        self.last_result = result
        logger.info("\n" + result.table())
        values = {f"{s}_{m}": result.summary[s].get(m, float("nan")) for s in self.settings
                  for m in SUMMARY_METRICS[s]}
        if output_path is not None and self.write_csv:
            os.makedirs(output_path, exist_ok=True)
            path = os.path.join(output_path, self.csv_file)
            new = not os.path.isfile(path)
            with open(path, "a", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                if new:
                    writer.writerow(self.csv_headers)
                writer.writerow([epoch, steps, *(values[k] for k in self.metric_names)])
        metrics = self.prefix_name_to_metrics(values, self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics

    # ------------------------------------------------------------------------------------------- description

    def describe_data(self) -> str:
        split = self.split
        return (f"{split.name} ({', '.join(split.languages)}: {len(split.queries)} queries, "
                f"{len(split.candidates)} candidates)")

    @property
    def description(self) -> str:
        return "LAReQA Retrieval"

    def get_config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {"dataset": self.dataset, "languages": self.languages,
                                  "settings": list(self.settings), "passage_text": self.passage_text}
        for key in ("max_questions_per_language", "truncate_dim", "query_prompt_name", "document_prompt_name"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        return config
