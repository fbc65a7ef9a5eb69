"""What the hardware options resolve to. ``auto`` precision (``hardware.precision`` / ``hardware.encode_dtype``)
picks bfloat16 where the machine computes it natively (CPU flags avx512_bf16 or amx_bf16; a GPU that supports
bf16) and float32 elsewhere, where emulated bf16 is slower than fp32. Resolved where it is used, so the config
keeps saying ``auto``; runs record what it became (tags ``precision``, ``encode_dtype``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
ENCODE_DTYPES = ("float32", "bfloat16", "auto")


@dataclass
class HardwareConfig:
    """The ``hardware`` node's schema (``conf/hardware/*.yaml``): an unknown key or a value of the wrong type is
    refused when Hydra composes the config. Ranges and allowed values: :func:`check_hardware`."""

    name: str
    accelerator: str = "cpu"            # Lightning accelerator: cpu | gpu
    devices: Any = 1                    # Lightning devices: a count, -1 (all), or a list of indices
    num_nodes: int = 1
    strategy: str = "auto"              # Lightning strategy: auto | ddp
    collective_timeout_s: Optional[float] = None  # DDP: a collective waiting longer fails the job; null = torch's
    precision: str = "32-true"          # Lightning precision: 32-true | bf16-mixed | auto
    num_threads: int = 2                # torch threads per process
    encode_dtype: str = "float32"       # float32 | bfloat16 | auto (evaluation encoding)
    encode_batch_size: int = 64
    cudnn_attention: bool = True        # GPU: cuDNN's attention kernel (off in the GPU configs)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_description() -> str:
    """CPU model, core count and the vector / matrix flags that decide speed and bf16 arithmetic (result files
    record it: bf16 results differ between CPUs)."""
    import os
    import platform

    model = platform.processor() or "unknown CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    shown = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    return f"{model}, {os.cpu_count()} cores; flags: {' '.join(shown) or 'none of avx2/avx512/amx'}"


def native_bf16(accelerator: str) -> bool:
    """True where bf16 runs on dedicated units: a CUDA device that supports it, or a CPU with AVX512-BF16 / AMX."""
    if accelerator in ("gpu", "cuda"):
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def trainer_precision(hardware: Any) -> str:
    """Lightning's ``precision``: the configured value, or for ``auto`` bf16-mixed where bf16 is native, else
    32-true."""
    value = str(hardware.precision)
    if value != "auto":
        return value
    return "bf16-mixed" if native_bf16(str(hardware.accelerator)) else "32-true"


def encode_dtype_name(hardware: Any) -> str:
    """``float32`` or ``bfloat16``: the configured ``encode_dtype``, or for ``auto`` bfloat16 where it is native."""
    value = str(hardware.encode_dtype)
    if value != "auto":
        return value
    return "bfloat16" if native_bf16(str(hardware.accelerator)) else "float32"


def uses_gpu(hardware: Any) -> bool:
    """True when ``hardware.accelerator`` asks for a CUDA GPU (``gpu`` or ``cuda``)."""
    return str(hardware.get("accelerator", "cpu")) in ("gpu", "cuda")


def torch_device(hardware: Any) -> Any:
    """Where a driver without a Lightning Trainer (evaluate, encode, search, adapt) puts the model: the current
    CUDA device for ``accelerator: gpu``, else the CPU. :func:`check_device` has already refused a GPU
    config on a machine without one. Also applies :func:`set_attention_backends`."""
    import torch

    set_attention_backends(hardware)
    return torch.device("cuda") if uses_gpu(hardware) else torch.device("cpu")


def set_attention_backends(hardware: Any) -> None:
    """``hardware.cudnn_attention: false`` takes cuDNN's fused attention out of PyTorch's scaled-dot-product
    choices (flash and memory-efficient kernels remain). cuDNN builds a graph for every new padded length, a host
    cost that dominated training and bf16 encoding of a small model on an H200 (docs/speed.md#gpu). Process-wide;
    no effect on a CPU."""
    if uses_gpu(hardware) and not bool(hardware.get("cudnn_attention", True)):
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)


def encode_dtype(hardware: Any) -> Any:
    """The dtype ``Encoder.encode`` takes: torch.bfloat16 (autocast), or None for float32."""
    import torch

    return torch.bfloat16 if encode_dtype_name(hardware) == "bfloat16" else None


def check_hardware(hardware: Any) -> None:
    """What the schema's types cannot say: ranges and allowed values, before any work."""
    from hybrid_retrieval.config_error import positive_int, require

    require(positive_int(hardware.get("num_threads")), "hardware.num_threads", "a positive integer",
            hardware.get("num_threads"))
    require(hardware.get("encode_dtype") in ENCODE_DTYPES, "hardware.encode_dtype",
            f"one of {ENCODE_DTYPES}", hardware.get("encode_dtype"))
    require(positive_int(hardware.get("encode_batch_size")), "hardware.encode_batch_size",
            "a positive integer", hardware.get("encode_batch_size"))
    require(positive_int(hardware.get("num_nodes", 1)), "hardware.num_nodes", "a positive integer",
            hardware.get("num_nodes"))
    timeout = hardware.get("collective_timeout_s")
    number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
    require(timeout is None or (number and timeout > 0), "hardware.collective_timeout_s",
            "a number of seconds > 0, or null (torch's default)", timeout)


def check_device(hardware: Any) -> None:
    """A single-process driver (evaluate, encode, search, adapt) asked for a GPU that torch cannot see: refused
    before any model loads. (Training leaves this to Lightning: a job may be built on a node without GPUs.)"""
    if uses_gpu(hardware):
        import torch

        from hybrid_retrieval.config_error import require

        require(torch.cuda.is_available(), "hardware.accelerator", "a CUDA device visible to torch "
                f"(torch {torch.__version__} sees none); use hardware=cpu or hardware=cpu_auto on this machine",
                hardware.get("accelerator"))
