"""Turning sampler rows into tokenized model inputs.

The sampler (:mod:`hybrid_retrieval.training.sampler`) decides which rows form a batch; this module looks up
their texts and tokenizes queries and passages, and the hard negatives of the batch's rows when their dataset
has them (a dataset's ``hard_negative`` option is the one switch).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch.utils.data import Dataset

from hybrid_retrieval.data.pairs import ParallelPairs


class PairTexts(Dataset):
    """Maps a sampler item ``(dataset_index, query_row, passage_row)`` to its texts."""

    def __init__(self, datasets: Sequence[ParallelPairs]) -> None:
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        dataset_index, query_row, passage_row = item
        data = self.datasets[dataset_index]
        negatives = data.hard_negatives
        return {
            "query": data.queries[query_row],
            "passage": data.passages[passage_row],
            "hard_negative": negatives[passage_row] if negatives is not None else None,
            "monolingual": query_row == passage_row,
            "row": (dataset_index, query_row, passage_row),
            "language": data.language_names[data.languages[query_row]],
            "passage_language": data.language_names[data.languages[passage_row]],
        }


class PairCollator:
    """Tokenizes a list of :class:`PairTexts` items with the encoder's prefixes and maximum lengths."""

    def __init__(self, tokenize: Any) -> None:
        self.tokenize = tokenize

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "query": self.tokenize([i["query"] for i in items], "query"),
            "passage": self.tokenize([i["passage"] for i in items], "passage"),
            # Read from the rows themselves: with DataLoader workers the sampler runs ahead of training.
            "monolingual": all(i["monolingual"] for i in items),
            # What the batch is made of, for logs and error messages: (dataset, query row, passage row) and the
            # query and passage language of every row.
            "rows": [i["row"] for i in items],
            "languages": [i["language"] for i in items],
            "passage_languages": [i["passage_language"] for i in items],
        }
        negatives = [i["hard_negative"] for i in items if i["hard_negative"] is not None]
        # Every hard negative present serves as a negative for every query of the batch.
        if negatives:
            batch["hard_negative"] = self.tokenize(negatives, "passage")
        return batch
