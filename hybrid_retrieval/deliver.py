"""Send a run's MLflow writes that its store did not take: ``python -m hybrid_retrieval.deliver <run folder> ...``.

Every command journals its MLflow writes in its run folder (``mlflow_journal.jsonl``, ``tracking.Delivery``) and
sends them off the training thread; a tracking server that was down until the command ended leaves the rest
there, and the command's last line names this command. It sends, in order, what the store does not have yet
(metrics, params, tags, artifacts from the run folder, the MLflow model, the run's status); sending twice stores
once. Exit status 0 when everything is delivered.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from hybrid_retrieval.tracking import DELIVER_COMMAND, deliver

    folders = sys.argv[1:] if argv is None else argv
    if not folders or any(f.startswith("-") for f in folders):
        print(f"usage: {DELIVER_COMMAND} <run folder> [<run folder> ...]", file=sys.stderr)
        return 2
    status = 0
    for folder in folders:
        try:
            left, refused = deliver(folder)
        except (FileNotFoundError, ValueError) as error:
            print(f"{folder}: {error}", file=sys.stderr)
            status = 1
            continue
        for line in refused:
            print(f"{folder}: MLflow refused {line}", file=sys.stderr)
        if left:
            print(f"{folder}: {left} writes still not delivered (the store did not answer); run this again",
                  file=sys.stderr)
            status = 1
        else:
            print(f"{folder}: delivered")
    return status


if __name__ == "__main__":
    sys.exit(main())
