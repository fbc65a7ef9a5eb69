"""Peak memory and pairs/s of one training step at several batch sizes, with and without gradient caching.

    python benchmarks/bench_batch_memory.py                          # tiny model, batches 16 64 256, chunk 16
    python benchmarks/bench_batch_memory.py --model me5_small --batches 16 64 --steps 3

Each configuration runs in a fresh process (so peak RSS is its own): encoder + InfoNCE + AdamW on MLQA-R
question / answer-sentence pairs (max length 64), all parameters trainable. "plain" embeds the whole batch with a
graph; "grad cache" embeds it in chunks (hybrid_retrieval.losses.cached). Prints peak RSS, the growth of RSS during
the steps (activations and optimiser state), pairs/s, the ratio to plain at the same batch size, and the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from machine import cpu_description, peak_rss_mb  # noqa: E402 (benchmarks/machine.py)

from hybrid_retrieval.schemas import load_node


def child(args: argparse.Namespace) -> None:
    import torch
    from hydra.utils import instantiate

    from hybrid_retrieval.data.lareqa_pairs import from_lareqa
    from hybrid_retrieval.losses.cached import cached_backward
    from hybrid_retrieval.losses.info_nce import InfoNCELoss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_cfg = load_node(REPO / "conf" / "model" / f"{args.model}.yaml")
    model_cfg.max_query_length = model_cfg.max_passage_length = 64
    encoder = instantiate(model_cfg).train()
    pairs = from_lareqa("mlqa_r", args.data_root)
    loss_fn = InfoNCELoss(temperature=0.05)
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-5, foreach=True)
    batch = args.batch
    queries = encoder.tokenize(pairs.queries[:batch], "query")
    passages = encoder.tokenize(pairs.passages[:batch], "passage")
    before = peak_rss_mb()
    times = []
    for step in range(args.steps + 1):  # the first step warms up (allocator, optimiser state)
        started = time.perf_counter()
        optimizer.zero_grad()
        if args.chunk:
            cached_backward(encoder, {"query": queries, "passage": passages},
                            lambda e: loss_fn(e["query"], e["passage"]), args.chunk)
        else:
            loss_fn(encoder(**queries), encoder(**passages)).backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - started)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "growth_mb": peak_rss_mb() - before,
                      "pairs_per_s": batch / (sum(times) / len(times))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--chunk", type=int, default=16, help="rows per chunk with gradient caching")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", default=os.environ.get("HYBRID_RETRIEVAL_DATA"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.chunk = args.chunk or None
        child(args)
        return
    print(f"CPU: {cpu_description()}; model {args.model}, max length 64, {args.steps} timed steps, "
          f"{args.threads} threads")
    print(f"{'batch':>6} {'mode':>16} {'peak RSS MB':>12} {'growth MB':>10} {'pairs/s':>9} {'vs plain':>9}")
    for batch in args.batches:
        plain = None
        for chunk in (0, args.chunk):
            if chunk and chunk >= batch:
                continue
            command = [sys.executable, __file__, "--child", "--model", args.model, "--batch", str(batch),
                       "--chunk", str(chunk), "--steps", str(args.steps), "--threads", str(args.threads)]
            if args.data_root:
                command += ["--data-root", args.data_root]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            plain = plain or result
            mode = f"grad cache {chunk}" if chunk else "plain"
            print(f"{batch:>6} {mode:>16} {result['peak_rss_mb']:>12.0f} {result['growth_mb']:>10.0f} "
                  f"{result['pairs_per_s']:>9.1f} {result['pairs_per_s'] / plain['pairs_per_s']:>8.2f}x")


if __name__ == "__main__":
    main()
