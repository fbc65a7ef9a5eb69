"""How well XQuAD paragraphs are found by text in SQuAD translations (data/squad.xquad_text_matches).

A paragraph whose questions carry SQuAD ids is XQuAD's exactly when one of its ids is an XQuAD id: on those
paragraphs the text rule's recall and its extra drops are measured; the paragraphs with made-up ids (SQuAD-it) are
the ones only the text rule can catch.

    python scripts/xquad_text_match.py > docs/results/contamination/xquad_text_match.json
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from hybrid_retrieval.data.squad import (TEXT_MATCH_MARGIN, TEXT_MATCH_SCORE, _read_json, resolve_squad_files,
                                         xquad_reference, xquad_text_matches)

FILES = {"it": "squad-it/SQuAD_it-test.json.gz", "es": "squad-es/dev-v1.1-es_small.json"}
SQUAD_ID = re.compile(r"[0-9a-f]{24}")


def main() -> None:
    reference = xquad_reference()
    out = {"command": "python scripts/xquad_text_match.py",
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip(),
           "rule": {"score": TEXT_MATCH_SCORE, "margin": TEXT_MATCH_MARGIN},
           "xquad_languages": len(reference.paragraphs), "files": {}}
    for language, path in resolve_squad_files(FILES).items():
        paragraphs = [p for article in _read_json(path)["data"] for p in article["paragraphs"]]
        matched = xquad_text_matches([p["context"] for p in paragraphs], reference.paragraphs)
        known = np.array([all(SQUAD_ID.fullmatch(q["id"]) for q in p["qas"]) for p in paragraphs])
        by_id = np.array([any(q["id"] in reference.ids for q in p["qas"]) for p in paragraphs])
        out["files"][language] = {
            "file": str(path.name), "paragraphs": len(paragraphs), "made_up_ids": int((~known).sum()),
            "xquad_by_id": int((by_id & known).sum()),
            "found_by_text_of_those": int((matched & by_id & known).sum()),
            "recall_by_text": round(float((matched & by_id & known).sum() / max(1, (by_id & known).sum())), 4),
            "text_only_drops_among_squad_ids": int((matched & ~by_id & known).sum()),
            "text_drops_among_made_up_ids": int((matched & ~known).sum()),
        }
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
