"""Turning sampler rows into tokenized model inputs.

The sampler (:mod:`hybrid_retrieval.training.sampler`) decides which rows form a batch; :class:`PairTexts` reads
the texts of a whole batch from the datasets' Arrow tables in one call (``__getitems__``, which the DataLoader
uses for a batch sampler), and :class:`PairCollator` tokenizes queries, passages and the hard negatives of the
batch's passage rows: up to ``train.hard_negatives`` of each row, every one a negative for every query. With
DataLoader workers (``train.num_workers``) both run in the workers; the tables are memory-mapped, so a worker
reads the same pages as the main process instead of a copy.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch.utils.data import Dataset

from hybrid_retrieval.data.pairs import ParallelPairs


class PairTexts(Dataset):
    """Maps a batch of sampler items ``(dataset_index, query_row, passage_row)`` to its texts.

    Args:
        datasets: the training datasets, in the sampler's order.
        hard_negatives: how many of each passage row's hard negatives enter the batch (0: none).
    """

    def __init__(self, datasets: Sequence[ParallelPairs], hard_negatives: int = 1) -> None:
        self.datasets = list(datasets)
        self.hard_negatives = int(hard_negatives)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitems__(self, items: Sequence[tuple[int, int, int]]) -> dict[str, Any]:
        texts: dict[str, Any] = {"query": [], "passage": [], "hard_negative": [], "rows": [], "languages": [],
                                 "passage_languages": []}
        # The sampler draws one dataset per batch; grouping keeps any mix correct all the same.
        for index in sorted({item[0] for item in items}):
            mine = [item for item in items if item[0] == index]
            data = self.datasets[index]
            queries, passages, negatives = data.fetch([q for _, q, _ in mine], [p for _, _, p in mine],
                                                      self.hard_negatives)
            names = data.language_names
            texts["query"] += queries
            texts["passage"] += passages
            texts["hard_negative"] += [n for row in negatives for n in row]
            texts["rows"] += [tuple(item) for item in mine]
            texts["languages"] += [names[data.languages[q]] for _, q, _ in mine]
            texts["passage_languages"] += [names[data.languages[p]] for _, _, p in mine]
        # Read from the rows themselves: with DataLoader workers the sampler runs ahead of training.
        texts["monolingual"] = all(q == p for _, q, p in texts["rows"])
        return texts

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        return self.__getitems__([item])


class PairCollator:
    """Tokenizes the texts of a batch (:meth:`PairTexts.__getitems__`) with the encoder's prefixes and maximum
    lengths."""

    def __init__(self, tokenize: Any) -> None:
        self.tokenize = tokenize

    def __call__(self, texts: dict[str, Any]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "query": self.tokenize(texts["query"], "query"),
            "passage": self.tokenize(texts["passage"], "passage"),
            "monolingual": texts["monolingual"],
            # What the batch is made of, for logs and error messages: (dataset, query row, passage row) and the
            # query and passage language of every row.
            "rows": texts["rows"],
            "languages": texts["languages"],
            "passage_languages": texts["passage_languages"],
        }
        if texts["hard_negative"]:
            batch["hard_negative"] = self.tokenize(texts["hard_negative"], "passage")
        return batch
