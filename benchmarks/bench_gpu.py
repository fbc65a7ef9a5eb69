"""The GPU checks in one run: matmul rate, training against sentence-transformers, full XQuAD-R evaluation time.

    python benchmarks/bench_gpu.py --out gpu_results        # on a machine with a CUDA GPU, me5_small

1. The device's bf16 matmul rate (8192 x 8192 x 8192, median of timed products after warm-up, CUDA events): the
   ceiling that model FLOP utilisation (MFU) is measured against, next to the datasheet figure if given.
2. ``bench_train.py --device cuda``: sentence-transformers (bf16 autocast, fused AdamW) against this project's
   training step (LightningModule, ``bf16-mixed``; the row-sparse vocabulary update, and the dense one) at batch 100, max length 64, all parameters trainable; pairs/s,
   peak GPU memory, TFLOP/s and MFU; without cuDNN's fused attention (as ``hardware=gpu``), then with it. Then
   ``torch.compile`` on the backbone, with dynamic shapes and with one padded shape under CUDA graphs (leads;
   compilation is in the warm-up steps), under one time limit.
3. Full XQuAD-R (11 languages, 13,090 questions, 13,014 candidates) evaluated on the GPU in bf16 and in fp32,
   the way ``python -m hybrid_retrieval.evaluate dataset=xquad_r hardware=gpu`` does it (the same loader,
   ``Encoder.encode`` with ``hardware=gpu``'s batch size and the same evaluator; no MLflow run): seconds for
   loading, encoding and metrics, and the summary metrics, to set against the CPU's.

4. A torch.profiler table of eight project steps (three warm-up) (``profile.txt``): the busiest operators on the GPU and the host.

Everything is written to ``--out`` as it finishes (``train.json``, ``eval.json``, ``profile.txt``,
``train_cudnn.json``, ``train_compile.json``, ``gpu.json``), so a time limit loses only the step it interrupts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hybrid_retrieval.schemas import load_node

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HERE = Path(__file__).resolve().parent


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """bf16 (n x n) @ (n x n) on random data: median TFLOP/s over `repeats` products timed with CUDA events."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def evaluate_xquad_r(data_root: str, batch_size: int, threads: int, device: str = "cuda",
                     max_questions: int | None = None) -> dict:
    """Full XQuAD-R (or `max_questions` per language) on `device` in bf16 and fp32: timings and summary
    metrics of each."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from hybrid_retrieval.evaluation.sets import evaluate_set, load_evaluation_sets
    from hybrid_retrieval.hardware import set_attention_backends

    torch.set_num_threads(threads)
    started = time.perf_counter()
    dataset = load_node(REPO / "conf" / "dataset" / "xquad_r.yaml")
    dataset.root = data_root
    dataset.max_questions_per_language = max_questions
    sets = load_evaluation_sets(dataset)
    loaded = time.perf_counter()
    if device == "cuda":
        set_attention_backends(OmegaConf.load(REPO / "conf" / "hardware" / "gpu.yaml"))
    encoder = instantiate(OmegaConf.load(REPO / "conf" / "model" / "me5_small.yaml")).to(device).eval()
    model_loaded = time.perf_counter()
    out = {"load_data_s": loaded - started, "load_model_s": model_loaded - loaded, "runs": {}}
    # Warm-up (CUDA context, kernel choice, the compiled rank kernel), so neither timed run pays for it.
    small = OmegaConf.merge(dataset, {"max_questions_per_language": 20})
    for dtype in (torch.bfloat16, None):
        evaluate_set(encoder, load_evaluation_sets(small)[0], batch_size=batch_size, dtype=dtype, num_threads=threads)
    out["warm_up_s"] = time.perf_counter() - model_loaded
    for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
        begin = time.perf_counter()
        result = evaluate_set(encoder, sets[0], batch_size=batch_size, dtype=dtype, num_threads=threads)
        out["runs"][name] = {"wall_s": time.perf_counter() - begin, **result.timings, "summary": result.summary}
        print(f"XQuAD-R on {device}, {name}: {out['runs'][name]['wall_s']:.1f} s (encoding "
              f"{result.timings['encode_s']:.1f} s, metrics {result.timings['metrics_s']:.1f} s); "
              f"summary {json.dumps(result.summary)}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the results")
    parser.add_argument("--data-root", default=os.environ.get("HYBRID_RETRIEVAL_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--datasheet-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 rate by its datasheet (H100 / H200 SXM: 989)")
    parser.add_argument("--compile-timeout", type=int, default=300, help="seconds for the torch.compile runs")
    parser.add_argument("--skip", nargs="*", default=[], choices=("train", "compile", "eval", "profile"))
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="check the script on a CPU: tiny sizes, no GPU figures")
    parser.add_argument("--max-questions", type=int, default=None, help="per language (default: all)")
    args = parser.parse_args()
    import torch

    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU visible to torch; none is (--cpu-dry-run checks the script)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if device == "cuda":
        info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "capability": list(torch.cuda.get_device_capability())}
        info["matmul_bf16_tflops"] = matmul_tflops()
        print(f"{info['gpu']} (torch {info['torch']}, CUDA {info['cuda']}): bf16 matmul 8192^3 "
              f"{info['matmul_bf16_tflops']:.0f} TFLOP/s (datasheet {args.datasheet_tflops:g})", flush=True)
    else:
        info = {"gpu": None, "torch": torch.__version__, "matmul_bf16_tflops": 1.0}
    (out / "gpu.json").write_text(json.dumps(info, indent=2) + "\n")
    common = [sys.executable, str(HERE / "bench_train.py"), "--device", device, "--batch", str(args.batch),
              "--max-length", "64", "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--threads", str(args.threads), "--data-root", args.data_root,
              "--peak-tflops", f"{info['matmul_bf16_tflops']:.1f}"]
    if "train" not in args.skip:
        # project_bf16_sparse is what training does by default (train.sparse_embeddings); project_bf16 the dense
        # update; project_bf16_padded the dense update with model.unpad=false.
        subprocess.run([*common, "--repeats", str(args.repeats), "--configs", "st_bf16", "project_bf16_sparse",
                        "project_bf16", "project_bf16_padded", "--out", str(out / "train.json")])
        # The same with cuDNN's fused attention (PyTorch's default choice on this GPU), for the difference.
        subprocess.run([*common, "--repeats", "1", "--configs", "st_bf16", "project_bf16_sparse", "--cudnn-attention",
                        "on", "--out", str(out / "train_cudnn.json")])
    if "eval" not in args.skip:
        try:
            result = evaluate_xquad_r(args.data_root, batch_size=256, threads=args.threads, device=device,
                                      max_questions=args.max_questions)
            (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        except Exception as error:  # the compile run below still gets its turn
            print(f"evaluation failed: {error!r}", flush=True)
    if "profile" not in args.skip:  # where the project's training step spends its time
        subprocess.run([*common, "--repeats", "1", "--steps", "5", "--configs", "project_bf16_sparse",
                        "--profile", str(out / "profile.txt")])
    if "compile" not in args.skip:
        try:
            subprocess.run([*common, "--repeats", "1", "--configs", "project_bf16_compile", "project_bf16_graphs",
                            "--out", str(out / "train_compile.json")], timeout=args.compile_timeout)
        except subprocess.TimeoutExpired:
            print(f"project_bf16_compile / _graphs: stopped after {args.compile_timeout} s", flush=True)


if __name__ == "__main__":
    main()
