"""Training data at scale: conversion, start-up, memory and batch feeding of the Arrow pair store.

    python benchmarks/bench_data.py                        # 1k, 1M, 10M, 30M synthetic rows + the 1M long-text set,
                                                           # the list-backed path of commit a426d6d at 1M, DDP at 10M
    python benchmarks/bench_data.py --sizes 1000 1000000 --no-long --no-ddp --baseline none

Data: synthetic parallel JSON-lines sets, groups x 8 languages, rows of a group together (as translation output
and mMARCO-style exports are): short texts at 1M / 10M / 30M rows (about 70 bytes a row), and the long-text 1M set
(125k groups x 8 languages, about 690 bytes a row). Written once under ``--workdir``.

Every measurement runs in a fresh process (its own memory figures):

- ``convert``: ``from_jsonl`` into an empty cache: rows per second.
- ``startup``: open the converted store and build the sampler's index (``HybridBatchSampler``, batch 32, alpha 0.5),
  then draw 300 batches (every queue built and cycled once); seconds and memory: RSS and PSS (proportional: a
  mapped page shared by n processes counts 1/n) after opening, after the index, after the batches, and the peak.
- ``fetch``: batches of 32 read and tokenized (the tiny model's tokenizer, the multilingual-E5 one) through the
  training DataLoader with 0 and 2 workers: pairs per second.
- ``train``: ``python run.py model=tiny train_data=jsonl train_data.path=<set> trainer.max_steps=3`` in one
  process, and with ``hardware=ddp_cpu`` (2 processes): wall time and the peak of the summed RSS and PSS of the
  process tree.
- ``--baseline a426d6d``: ``startup`` and ``fetch`` of the list-backed path (Python lists of strings) at the same
  commit's tree beside it (a git worktree), at 1M rows.

Results: a JSON file (``--out``) and a table; the figures quoted in docs/speed.md come from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
LANGUAGES = ["en", "de", "es", "fr", "it", "ja", "zh", "ar"]


# ------------------------------------------------------------------------------------------------ the data


def write_synthetic(path: Path, rows: int, long_text: bool) -> None:
    """`rows` JSON lines: groups of 8 languages, rows of a group together."""
    if path.exists() and path.stat().st_size > 0:
        return
    tmp = path.with_suffix(".tmp")
    filler = " ".join(f"word{i}" for i in range(90)) if long_text else ""
    with tmp.open("w", encoding="utf-8") as handle:
        lines = []
        for i in range(rows):
            group, language = divmod(i, len(LANGUAGES))
            lang = LANGUAGES[language]
            passage = f"passage {group} in {lang} {filler}" if long_text else f"passage {group} in {lang}"
            lines.append(json.dumps({"group": f"g{group}", "language": lang, "query": f"query {group} {lang}?",
                                     "passage": passage}) + "\n")
            if len(lines) == 100_000:
                handle.writelines(lines)
                lines = []
        handle.writelines(lines)
    tmp.rename(path)


# ------------------------------------------------------------------------------------------------ memory


def memory_mb(pid: int | str = "self") -> dict[str, float]:
    """RSS, PSS and the peak RSS of a process, in MB (from /proc)."""
    found = {"rss": 0.0, "pss": 0.0, "peak": 0.0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                found["rss"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                found["peak"] = int(line.split()[1]) / 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                found["pss"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return found


def tree(pid: int) -> list[int]:
    """pid and every descendant."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo.extend(int(c) for c in children)
        except OSError:
            pass
    return found


# ------------------------------------------------------------------------------------------------ the workers


def worker_convert(path: str) -> dict[str, Any]:
    from hybrid_retrieval.data.jsonl_pairs import from_jsonl

    started = time.perf_counter()
    pairs = from_jsonl(path)
    seconds = time.perf_counter() - started
    return {"rows": len(pairs), "seconds": seconds, "rows_per_s": len(pairs) / seconds, "memory": memory_mb()}


def worker_startup(path: str) -> dict[str, Any]:
    from hybrid_retrieval.data.jsonl_pairs import from_jsonl
    from hybrid_retrieval.training.sampler import HybridBatchSampler

    base = memory_mb()
    started = time.perf_counter()
    pairs = from_jsonl(path)
    opened = time.perf_counter()
    after_open = memory_mb()
    sampler = HybridBatchSampler([pairs], batch_size=32, mono_ratio=0.5, seed=42, batches_per_epoch=300)
    indexed = time.perf_counter()
    after_index = memory_mb()
    summary = pairs.summary()
    summarised = time.perf_counter()
    first = None
    for i, _ in enumerate(sampler):
        if i == 0:
            first = time.perf_counter()
    drawn = time.perf_counter()
    after = memory_mb()
    return {"rows": len(pairs), "groups": summary["groups"], "open_s": opened - started,
            "index_s": indexed - opened, "startup_s": indexed - started, "summary_s": summarised - indexed,
            "first_batch_s": first - summarised, "batches_s": drawn - summarised, "memory_base": base,
            "memory_open": after_open, "memory_index": after_index, "memory_batches": after}


def worker_fetch(path: str, workers: int, batches: int) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    from hybrid_retrieval.data.jsonl_pairs import from_jsonl
    from hybrid_retrieval.models.encoder import load_encoder
    from hybrid_retrieval.training.batches import PairCollator, PairTexts
    from hybrid_retrieval.training.sampler import HybridBatchSampler

    torch.set_num_threads(1)
    encoder = load_encoder(name="tiny", source="random", tiny={"num_hidden_layers": 1, "hidden_size": 32,
                                                                 "num_attention_heads": 2, "intermediate_size": 64})
    pairs = from_jsonl(path)
    sampler = HybridBatchSampler([pairs], batch_size=32, mono_ratio=0.5, seed=42, batches_per_epoch=batches + 20)
    options = {"num_workers": workers, "persistent_workers": True} if workers else {}
    loader = DataLoader(PairTexts([pairs]), batch_sampler=sampler, collate_fn=PairCollator(encoder.tokenize), **options)
    count = 0
    started = None
    for i, batch in enumerate(loader):
        if i == 20:  # workers started and warm
            started = time.perf_counter()
        if i >= 20:
            count += batch["query"]["input_ids"].shape[0]
    seconds = time.perf_counter() - started
    return {"workers": workers, "pairs": count, "seconds": seconds, "pairs_per_s": count / seconds}


def run_worker(args: list[str], env: dict[str, str], pythonpath: str | None = None) -> dict[str, Any]:
    env = {**os.environ, **env}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", *args], env=env,
                         capture_output=True, text=True, cwd=pythonpath or ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_training(path: Path, ddp: bool, env: dict[str, str], folder: Path) -> dict[str, Any]:
    """``run.py model=tiny ... trainer.max_steps=3``: wall time, peak summed RSS / PSS of the process tree."""
    command = [sys.executable, "run.py", "model=tiny", "train_data=jsonl", f"train_data.path={path}",
               "trainer.max_steps=3", "train.evaluate_before=false", f"hydra.run.dir={folder}",
               f"logger.tracking_uri=sqlite:///{folder.parent}/mlflow.db"]
    if ddp:
        command.append("hardware=ddp_cpu")
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0.0, "pss": 0.0, "processes": 0}
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        pids = tree(process.pid)
        sums = [memory_mb(p) for p in pids]
        rss, pss = sum(m["rss"] for m in sums), sum(m["pss"] for m in sums)
        if pss > peak["pss"]:
            peak.update(pss=pss, processes=len(pids))
        peak["rss"] = max(peak["rss"], rss)
        time.sleep(0.2)
    reader.join(timeout=5)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{''.join(output)[-3000:]}")
    return {"ddp": ddp, "seconds": time.perf_counter() - started, "peak_rss_mb": peak["rss"],
            "peak_pss_mb": peak["pss"], "processes": peak["processes"]}


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 1_000_000, 10_000_000, 30_000_000])
    parser.add_argument("--no-long", action="store_true", help="skip the 1M long-text set")
    parser.add_argument("--no-ddp", action="store_true", help="skip the training runs (one process and DDP)")
    parser.add_argument("--ddp-size", type=int, default=10_000_000)
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[1000, 1_000_000, 10_000_000, 30_000_000])
    parser.add_argument("--baseline", default="a426d6d", help="commit of the list-backed path, or none")
    parser.add_argument("--baseline-size", type=int, default=1_000_000)
    parser.add_argument("--fetch-batches", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hybrid_retrieval_bench_data"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "data_speed.json")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, *rest = args.worker
        result = {"convert": lambda: worker_convert(rest[0]), "startup": lambda: worker_startup(rest[0]),
                  "fetch": lambda: worker_fetch(rest[0], int(rest[1]), int(rest[2]))}[mode]()
        print(json.dumps(result))
        return

    from machine import cpu_description

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    results: dict[str, Any] = {"cpu": cpu_description(), "commit": commit, "command": " ".join(sys.argv),
                               "sets": {}, "baseline": None, "training": []}
    print(results["cpu"])
    sets = [(f"short_{n}", n, False) for n in args.sizes] + ([] if args.no_long else [("long_1000000", 1_000_000, True)])
    for label, rows, long_text in sets:
        path = work / f"{label}.jsonl"
        write_synthetic(path, rows, long_text)
        cache = work / f"cache_{label}"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        env = {"HYBRID_RETRIEVAL_CACHE": str(cache), "HYBRID_RETRIEVAL_PROGRESS_EVERY_S": "3600"}
        found: dict[str, Any] = {"rows": rows, "jsonl_mb": path.stat().st_size / 2**20}
        found["convert"] = run_worker(["convert", str(path)], env)
        found["startup"] = run_worker(["startup", str(path)], env)
        found["fetch"] = [run_worker(["fetch", str(path), str(w), str(args.fetch_batches)], env) for w in (0, 2)]
        results["sets"][label] = found
        s = found["startup"]
        print(f"{label}: convert {found['convert']['rows_per_s']:,.0f} rows/s; start-up {s['startup_s']:.2f} s "
              f"(open {s['open_s']:.2f} + index {s['index_s']:.2f}), summary {s['summary_s']:.2f} s; RSS after "
              f"batches {s['memory_batches']['rss']:.0f} MB (base {s['memory_base']['rss']:.0f}), peak "
              f"{s['memory_batches']['peak']:.0f} MB; fetch+tokenize "
              + ", ".join(f"{f['workers']} workers {f['pairs_per_s']:,.0f} pairs/s" for f in found["fetch"]),
              flush=True)
    if args.baseline != "none":
        tree_dir = work / f"tree_{args.baseline}"
        if not tree_dir.exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(tree_dir), args.baseline], cwd=ROOT, check=True)
        label = "short_1000000" if args.baseline_size == 1_000_000 else f"short_{args.baseline_size}"
        path = work / f"{label}.jsonl"
        write_synthetic(path, args.baseline_size, False)
        startup = run_worker(["startup", str(path)], {}, str(tree_dir))
        fetch = [run_worker(["fetch", str(path), str(w), str(args.fetch_batches)], {}, str(tree_dir)) for w in (0, 2)]
        results["baseline"] = {"commit": args.baseline, "rows": args.baseline_size, "startup": startup, "fetch": fetch}
        print(f"list-backed ({args.baseline}) {label}: start-up {startup['startup_s']:.2f} s (read {startup['open_s']:.2f}"
              f" + index {startup['index_s']:.2f}); RSS after batches {startup['memory_batches']['rss']:.0f} MB, peak "
              f"{startup['memory_batches']['peak']:.0f} MB; fetch+tokenize "
              + ", ".join(f"{f['workers']} workers {f['pairs_per_s']:,.0f} pairs/s" for f in fetch), flush=True)
    if not args.no_ddp:
        for rows in args.train_sizes + [args.ddp_size]:
            ddp = rows == args.ddp_size and len([r for r in results["training"] if r["rows"] == rows]) == 1
            label = f"short_{rows}"
            path = work / f"{label}.jsonl"
            write_synthetic(path, rows, False)
            env = {"HYBRID_RETRIEVAL_CACHE": str(work / f"cache_{label}"), "HYBRID_RETRIEVAL_PROGRESS_EVERY_S": "3600"}
            run = run_training(path, ddp, env, work / "runs" / f"{label}_{'ddp' if ddp else 'one'}")
            run["rows"] = rows
            results["training"].append(run)
            print(f"run.py model=tiny, {rows:,} rows, {'DDP 2 processes' if ddp else 'one process'}: "
                  f"{run['seconds']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB, peak PSS {run['peak_pss_mb']:.0f} MB "
                  f"({run['processes']} processes)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
