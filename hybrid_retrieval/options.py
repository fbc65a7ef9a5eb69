"""``python -m hybrid_retrieval.options [node ...]``: the typed config nodes' options, each with its type and
default, read from their schemas (``hybrid_retrieval/schemas.py``). ``python run.py --cfg job`` shows the composed
values; ``conf/config.yaml`` and the group files say what each option does."""

from __future__ import annotations

import sys

from hybrid_retrieval.schemas import describe, node_of, schemas


def main(argv: list[str] | None = None) -> int:
    nodes = list(sys.argv[1:] if argv is None else argv)
    typed = sorted({node_of(name) for name in schemas()} | set(schemas()))
    unknown = [node for node in nodes if node not in typed]
    if unknown:
        print(f"unknown node {unknown[0]!r}: the typed nodes are {', '.join(typed)}", file=sys.stderr)
        return 2
    print(describe(nodes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
