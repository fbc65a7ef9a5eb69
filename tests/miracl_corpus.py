"""A synthetic MIRACL corpus for the real dev topics and qrels: every judged passage plus distractors.

The MIRACL corpus lives only on the Hugging Face hub, so offline tests (and the CLI checks) use passages made here,
in MIRACL's layout (``miracl-corpus-v1.0-<lang>/docs-<i>.jsonl.gz``, one ``{docid, title, text}`` a line):

- each passage judged relevant for a topic contains that topic's query, so a model can find it;
- judged non-relevant passages share a few words with their topic's query;
- distractors (unjudged, ids ``90000000#<n>``) are filler, and every ``hard_every``-th one repeats a query verbatim:
  a run then ranks unjudged passages above relevant ones, which is what scoring only judged passages would hide.

Run as a script to build a folder: ``python tests/miracl_corpus.py <out> --languages sw te yo``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from collections.abc import Sequence
from typing import Any
from pathlib import Path

from hybrid_retrieval.data.miracl import load_language

FILLER = ("river mountain city school market history music football language island village council harvest "
          "station library bridge festival region forest coast museum").split()


def _filler(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(FILLER) for _ in range(words))


def write_shard(path: Path, rows: Sequence[Any], gz: bool = False) -> Path:
    """One corpus shard in MIRACL's layout: a JSON object a line (a string row is written as it is, e.g. a
    malformed line), gzipped when `gz`."""
    text = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as out:
            out.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_synthetic_corpus(folder: Path, languages: Sequence[str], data_root: Path | None = None,
                           distractors: int = 300, hard_every: int = 5, max_topics: int | None = None,
                           shards: int = 3, gzipped: bool = True, seed: int = 0) -> Path:
    """Write ``<folder>/miracl-corpus-v1.0-<lang>/docs-<i>.jsonl[.gz]``; returns `folder` (a ``corpus_root``)."""
    rng = random.Random(seed)
    for language in languages:
        topics = load_language(language, data_root, max_topics=max_topics)
        passages: dict[str, dict[str, str]] = {}
        for qid, judged in topics.qrels.items():
            query = topics.topics[qid]
            for docid, rel in judged.items():
                if rel >= 1:
                    text = f"{query} {_filler(rng, 12)}"
                elif docid not in passages:
                    words = query.split()
                    text = f"{' '.join(words[: max(1, len(words) // 3)])} {_filler(rng, 14)}"
                else:
                    continue
                passages[docid] = {"docid": docid, "title": f"Title {docid.split('#')[0]}", "text": text}
        queries = list(topics.topics.values())
        for n in range(distractors):
            text = (f"{queries[n % len(queries)]} {_filler(rng, 6)}" if hard_every and n % hard_every == 0
                    else _filler(rng, 16))
            docid = f"90000000#{n}"
            passages[docid] = {"docid": docid, "title": "", "text": text}
        rows = list(passages.values())
        rng.shuffle(rows)  # judged passages spread over all shards, as in the real corpus
        target = folder / f"miracl-corpus-v1.0-{language}"
        target.mkdir(parents=True, exist_ok=True)
        per_shard = -(-len(rows) // shards)
        for i in range(shards):
            write_shard(target / f"docs-{i}.jsonl{'.gz' if gzipped else ''}",
                        rows[i * per_shard:(i + 1) * per_shard], gz=gzipped)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--languages", nargs="+", default=["sw", "te", "yo"])
    parser.add_argument("--distractors", type=int, default=2000)
    parser.add_argument("--max-topics", type=int, default=None)
    args = parser.parse_args()
    write_synthetic_corpus(args.out, args.languages, distractors=args.distractors, max_topics=args.max_topics)
    print(args.out)
