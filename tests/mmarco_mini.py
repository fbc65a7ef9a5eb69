"""A miniature mMARCO in the published layout (``unicamp-dl/mmarco`` on the Hugging Face hub), for tests and
benchmarks of :func:`hybrid_retrieval.data.mmarco.from_mmarco`::

    <root>/data/triples.train.ids.small.tsv                        qid<TAB>positive pid<TAB>negative pid
    <root>/data/google/queries/train/<language>_queries.train.tsv  qid<TAB>query text
    <root>/data/google/collections/<language>_collection.tsv       pid<TAB>passage text

Ids are sparse (non-contiguous) and written in a shuffled order; texts name their language and id and hold
non-ASCII characters (multi-byte UTF-8), some passages hold a tab, and the last line of a collection has no newline.

Run as a script to build a folder: ``python tests/mmarco_mini.py <out> --queries 1000 --passages 100000
--triples 50000``.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

WORDS = {
    "english": "river mountain city school market history music bridge forest coast museum harvest".split(),
    "german": "Fluss Berg Stadt Schüler Markt Geschichte Musik Brücke Wald Küste Museum Ernte größer".split(),
    "chinese": "河流 山 城市 学校 市场 历史 音乐 桥 森林 海岸 博物馆 收获".split(),
    "french": "rivière montagne ville école marché histoire musique pont forêt côte musée récolte".split(),
    "russian": "река гора город школа рынок история музыка мост лес берег музей урожай".split(),
    "japanese": "川 山 都市 学校 市場 歴史 音楽 橋 森 海岸 博物館 収穫".split(),
}
DEFAULT_WORDS = "alpha beta gamma delta épsilon zêta ēta θήτα iota kappa".split()


@dataclass
class MiniMmarco:
    """What :func:`write_mini_mmarco` wrote: the ids in file order, the triples, and the files' paths."""

    root: Path
    languages: list[str]
    qids: list[int]
    pids: list[int]
    triples: list[tuple[int, int, int]]

    @property
    def triples_file(self) -> Path:
        return self.root / "data" / "triples.train.ids.small.tsv"

    def queries_file(self, language: str) -> Path:
        return self.root / "data" / "google" / "queries" / "train" / f"{language}_queries.train.tsv"

    def collection_file(self, language: str) -> Path:
        return self.root / "data" / "google" / "collections" / f"{language}_collection.tsv"


def _text(rng: random.Random, language: str, kind: str, number: int, words: int) -> str:
    vocabulary = WORDS.get(language, DEFAULT_WORDS)
    return f"{language} {kind} {number}: " + " ".join(rng.choice(vocabulary) for _ in range(words))


def write_triples(path: Path, triples: Sequence[tuple[int, int, int] | str], newline: str = "\n") -> Path:
    """The triples file: a tuple is written as ``qid<TAB>pid<TAB>pid``, a string as it is (a malformed line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [t if isinstance(t, str) else "\t".join(str(v) for v in t) for t in triples]
    path.write_bytes("".join(line + newline for line in lines).encode("utf-8"))
    return path


def write_mini_mmarco(root: str | Path, languages: Sequence[str] = ("english", "german", "chinese"),
                      n_queries: int = 6, n_passages: int = 24,
                      triples: int | Sequence[tuple[int, int, int] | str] = 16, seed: int = 0,
                      newline: str = "\n") -> MiniMmarco:
    """Write a miniature mMARCO under `root` (layout in the module docstring) and describe it.

    - n_queries, n_passages: how many qids and pids (sparse, shuffled) each language's files hold.
    - triples: how many to draw (every query gets several; positive and negative differ), or the lines themselves
      (tuples of ids, or strings written verbatim, e.g. a malformed line).
    - newline: the line ending of every file (``"\\r\\n"`` for Windows-style files).
    """
    root = Path(root)
    rng = random.Random(seed)
    qids = rng.sample(range(1, 50 * n_queries + 100), n_queries)
    pids = rng.sample(range(0, 50 * n_passages + 100), n_passages)
    if isinstance(triples, int):
        # The first triples cycle through the queries (each gets several), then queries repeat at random.
        drawn = []
        for i in range(triples):
            qid = qids[i % n_queries] if i < 2 * n_queries else rng.choice(qids)
            positive, negative = rng.sample(pids, 2)
            drawn.append((qid, positive, negative))
        triples = drawn
    mini = MiniMmarco(root, list(languages), list(qids), list(pids),
                      [t for t in triples if not isinstance(t, str)])
    write_triples(mini.triples_file, triples, newline)
    for language in languages:
        text_rng = random.Random(f"{seed}-{language}")
        queries = [f"{qid}\t{_text(text_rng, language, 'query', qid, 4)}?" for qid in qids]
        passages = [f"{pid}\t{_text(text_rng, language, 'passage', pid, 12)}"
                    + ("\twith a tab" if i % 7 == 3 else "") for i, pid in enumerate(pids)]
        for path, lines in ((mini.queries_file(language), queries), (mini.collection_file(language), passages)):
            path.parent.mkdir(parents=True, exist_ok=True)
            ending = newline if path == mini.queries_file(language) else ""
            path.write_bytes((newline.join(lines) + ending).encode("utf-8"))
    return mini


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--languages", nargs="+", default=["english", "german", "chinese"])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--triples", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    mini = write_mini_mmarco(args.root, args.languages, args.queries, args.passages, args.triples, args.seed)
    print(f"wrote {len(mini.triples)} triples, {len(mini.qids)} queries and {len(mini.pids)} passages per language "
          f"({', '.join(mini.languages)}) under {mini.root}")


if __name__ == "__main__":
    main()
