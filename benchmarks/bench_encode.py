"""Encoding throughput on XQuAD-R (en + zh questions and candidate sentences): naive loop vs Encoder.encode, and
both against the machine's matmul rate.

Four ways to embed the same texts with the same model, timed in one run:

* naive: batches of 64 in file order, every text padded to 128 tokens;
* encode: ``Encoder.encode`` (tokenise once, sort by length, pad each batch only to its longest text);
* encode, default BLAS linears: the same with torch's default fp32 linear layers instead of the oneDNN ones
  ``Encoder.encode`` runs in fp32 on CPU (``hybrid_retrieval/kernels/onednn.py``);
* encode-bf16: the same under bfloat16 autocast.

All use a 128-token truncation limit, so the embeddings are comparable (their agreement is printed too). The same
run times a bare product of the model's shape (2,048 token rows x hidden -> intermediate; fp32 with torch.matmul,
oneDNN and oneDNN with a packed weight, the fastest counting as the machine's rate; bf16) and reports each method's
useful rate: the model's FLOPs counted on real tokens only (linear layers plus attention scores; padding is not
counted) per second, as a share of that rate.

    python benchmarks/bench_encode.py --threads 2 --limit 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from machine import cpu_description  # benchmarks/machine.py (the script's own folder is on sys.path)

from hybrid_retrieval.data.lareqa import load_split
from hybrid_retrieval.kernels import onednn as cpu_kernels
from hybrid_retrieval.models import encoder as encoder_module
from hybrid_retrieval.models.encoder import Encoder, cosine, load_encoder
from hybrid_retrieval.schemas import load_node

PAD_TO = 128


def evenly_spaced(items: list[str], limit: int) -> list[str]:
    """`limit` items spread over the whole list (file order kept); all of them when limit <= 0."""
    if limit <= 0 or limit >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def naive_encode(encoder: Encoder, texts: list[str], kind: str, batch_size: int = 64) -> np.ndarray:
    """The straightforward loop: fixed batches in input order, each padded to PAD_TO tokens."""
    prefix = encoder.prefixes[kind]
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = encoder.tokenizer(
                [prefix + t for t in texts[start : start + batch_size]], padding="max_length", truncation=True,
                max_length=PAD_TO, return_tensors="pt",
            )
            out.append(encoder(batch["input_ids"], batch["attention_mask"]).numpy())
    return np.concatenate(out)


def model_flops(config: object, lengths: np.ndarray) -> float:
    """Forward FLOPs of a BERT-style encoder over texts of these token lengths, no padding: per layer and token
    2 * (4 h^2 + 2 h i) for the Q/K/V/O and feed-forward matmuls, plus 4 L h for attention scores and weighting."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = lengths.astype(np.float64)
    return float(layers * (tokens.sum() * 2 * (4 * h * h + 2 * h * i) + (4 * h * tokens**2).sum()))


def matmul_rate(rows: int, hidden: int, inner: int, dtype: torch.dtype, seconds: float = 3.0,
                kernel: str = "matmul") -> float:
    """GFLOP/s of a bare (rows x hidden) @ (hidden x inner) product in `dtype`, best of repeated timings.
    `kernel`: "matmul" (torch.matmul, the BLAS torch uses by default), "onednn" (oneDNN's inner product) or
    "onednn_packed" (the same with the weight reordered once into oneDNN's layout, as `Encoder.encode` runs fp32
    on CPU)."""
    a, b = torch.randn(rows, hidden).to(dtype), torch.randn(hidden, inner).to(dtype)
    if kernel in ("onednn", "onednn_packed"):
        weight = b.t().contiguous()
        if kernel == "onednn_packed":
            weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows)

        def product() -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(a, weight, None, "none", [], "")
    else:

        def product() -> torch.Tensor:
            return a @ b
    for _ in range(3):
        product()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(10):
            product()
        best = min(best, (time.perf_counter() - started) / 10)
    return 2 * rows * hidden * inner / best / 1e9


def without_onednn(fn: Callable[[], np.ndarray]) -> np.ndarray:
    """Run `fn` with Encoder.encode's oneDNN linear layers switched off (torch's default fp32 linear)."""
    saved = encoder_module.onednn_linears
    encoder_module.onednn_linears = lambda model, enabled=True: contextlib.nullcontext()
    try:
        return fn()
    finally:
        encoder_module.onednn_linears = saved


def timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    assert result is not None
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--limit", type=int, default=256,
                        help="texts per kind (questions, sentences), spread over the files; 0 = all (default 256)")
    parser.add_argument("--languages", default="en,zh")
    parser.add_argument("--data-root", default=None,
                        help="folder holding xquad-r/ (default: $HYBRID_RETRIEVAL_DATA, then the cache)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs per method")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 run")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="padded tokens per batch for Encoder.encode (default: its CPU default, 2048)")
    parser.add_argument("--no-blas", action="store_true",
                        help="skip the fp32 encode with torch's default linear layers instead of oneDNN's")
    parser.add_argument("--no-naive", action="store_true",
                        help="skip the naive loop (slow); ratios are then to the fp32 encode only")
    parser.add_argument("--model", default="me5_small", help="conf/model/<name>.yaml to load (default me5_small)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # Questions and candidate sentences of the chosen XQuAD-R languages, in file order.
    split = load_split("xquad_r", root=args.data_root, languages=args.languages.split(","))
    questions, sentences = split.query_texts(), split.candidate_texts("sentence")
    questions, sentences = evenly_spaced(questions, args.limit), evenly_spaced(sentences, args.limit)

    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(load_node(Path(__file__).resolve().parents[1] / "conf" / "model"
                                                / f"{args.model}.yaml"))
    for key in ("_target_", "_convert_"):
        cfg.pop(key, None)
    cfg.update(max_query_length=PAD_TO, max_passage_length=PAD_TO)
    encoder = load_encoder(**cfg)

    work = [("query", questions), ("passage", sentences)]
    n_texts = len(questions) + len(sentences)
    lengths = np.array([len(ids) for kind, texts in work for ids in encoder.tokenizer(
        [encoder.prefixes[kind] + t for t in texts], truncation=True, max_length=PAD_TO)["input_ids"]])
    print(f"model {args.model}, threads {args.threads}, {len(questions)} questions + {len(sentences)} sentences "
          f"({args.languages}); tokens per text: mean {lengths.mean():.1f}, max {lengths.max()}, "
          f"padded naive {PAD_TO}")

    # Warm-up so one-time costs (allocator, kernel selection) are not timed.
    encoder.encode(questions[:8], "query")
    naive_encode(encoder, questions[:8], "query")

    methods: dict[str, Callable[[], np.ndarray]] = {}
    if not args.no_naive:
        methods["naive (file order, pad 128)"] = lambda: np.concatenate(
            [naive_encode(encoder, t, k, args.batch_size) for k, t in work])
    methods["encode (sorted, dynamic pad)"] = lambda: np.concatenate(
        [encoder.encode(t, k, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens) for k, t in work])
    if not args.no_blas and cpu_kernels.available():
        methods["encode, default BLAS linears"] = lambda: without_onednn(lambda: np.concatenate(
            [encoder.encode(t, k, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens)
             for k, t in work]))
    if not args.no_bf16:
        methods["encode bf16 autocast"] = lambda: np.concatenate(
            [encoder.encode(t, k, batch_size=args.batch_size, dtype=torch.bfloat16,
                            max_batch_tokens=args.max_batch_tokens) for k, t in work])

    results: dict[str, tuple[float, np.ndarray]] = {}
    for label, fn in methods.items():
        results[label] = timed(fn, args.repeats)
        seconds = results[label][0]
        print(f"  {label:30s} {seconds:8.2f} s  {n_texts / seconds:8.1f} texts/s", flush=True)

    config = encoder.backbone.config
    flops = model_flops(config, lengths)
    shape = (2048, config.hidden_size, config.intermediate_size)
    # The machine's fp32 rate is the fastest of the fp32 kernels torch has; oneDNN's packed one is usually it.
    kernels = {"matmul": matmul_rate(*shape, torch.float32)}
    if cpu_kernels.available():
        kernels["onednn"] = matmul_rate(*shape, torch.float32, kernel="onednn")
        kernels["onednn_packed"] = matmul_rate(*shape, torch.float32, kernel="onednn_packed")
    peak = {"fp32": max(kernels.values())}
    if not args.no_bf16:
        peak["bf16"] = matmul_rate(*shape, torch.bfloat16)
    print(f"bare product {shape[0]} x {shape[1]} x {shape[2]}: fp32 "
          + ", ".join(f"{k} {v:.0f}" for k, v in kernels.items())
          + (f", bf16 matmul {peak['bf16']:.0f}" if "bf16" in peak else "")
          + f" GFLOP/s; model work on real tokens {flops / 1e9:.0f} GFLOP")

    base_label = next(iter(results))
    base_seconds, base = results[base_label]
    print(f"ratios to {base_label} (same run):")
    summary = {"cpu": cpu_description(), "threads": args.threads, "texts": n_texts,
               "matmul_gflops": {k: round(v, 1) for k, v in peak.items()},
               "fp32_kernels_gflops": {k: round(v, 1) for k, v in kernels.items()}, "model_gflop": round(flops / 1e9, 1)}
    fp32_seconds = results["encode (sorted, dynamic pad)"][0]
    for label, (seconds, emb) in results.items():
        agreement = cosine(base, emb).min()
        reference = "bf16" if "bf16" in label else "fp32"
        useful = flops / seconds / 1e9
        print(f"  {label:30s} x{base_seconds / seconds:6.2f}   min cosine {agreement:.6f}   "
              f"{useful:6.1f} GFLOP/s = {useful / peak[reference]:5.1%} of the {reference} matmul rate"
              f"   x{fp32_seconds / seconds:.2f} fp32 encode")
        summary[label] = {"seconds": round(seconds, 3), "texts_per_s": round(n_texts / seconds, 1),
                          "speedup": round(base_seconds / seconds, 2), "min_cosine": round(float(agreement), 6),
                          "gflops": round(useful, 1), "share_of_matmul": round(useful / peak[reference], 3),
                          "vs_fp32_encode": round(fp32_seconds / seconds, 2)}
    print(f"CPU: {summary['cpu']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
