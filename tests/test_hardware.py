"""hardware precision `auto`: bf16 where the machine computes it natively, fp32 elsewhere; explicit values stay."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from hybrid_retrieval import hardware
from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.hardware import check_hardware


@pytest.fixture
def flags(monkeypatch):
    """Set the CPU flags `auto` sees."""
    def set_flags(*names: str) -> None:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(names))
    return set_flags


def _cpu(**values):
    return OmegaConf.create({"accelerator": "cpu", "precision": "auto", "encode_dtype": "auto", "num_threads": 2,
                             "encode_batch_size": 64, **values})


def test_auto_picks_bf16_only_where_the_cpu_has_bf16_units(flags) -> None:
    import torch

    flags("avx2", "avx512f", "avx512_bf16")
    assert hardware.trainer_precision(_cpu()) == "bf16-mixed"
    assert hardware.encode_dtype(_cpu()) is torch.bfloat16
    flags("avx2", "amx_tile", "amx_bf16")
    assert hardware.encode_dtype_name(_cpu()) == "bfloat16"
    flags("avx2", "avx512f")  # no bf16 units: emulated bf16 is slower than fp32
    assert hardware.trainer_precision(_cpu()) == "32-true"
    assert hardware.encode_dtype(_cpu()) is None
    # Explicit settings are never changed, whatever the CPU.
    assert hardware.trainer_precision(_cpu(precision="bf16-mixed")) == "bf16-mixed"
    assert hardware.encode_dtype_name(_cpu(encode_dtype="bfloat16")) == "bfloat16"
    flags("avx512_bf16")
    assert hardware.encode_dtype(_cpu(encode_dtype="float32")) is None


def test_this_machines_flags_are_read_from_proc_cpuinfo() -> None:
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo")
    line = next(l for l in info.read_text().splitlines() if l.startswith("flags"))
    assert hardware.cpu_flags() == frozenset(line.split(":", 1)[1].split())
    expected = "bfloat16" if {"avx512_bf16", "amx_bf16"} & hardware.cpu_flags() else "float32"
    assert hardware.encode_dtype_name(_cpu()) == expected


def test_encode_dtype_accepts_auto_and_names_the_choices_otherwise() -> None:
    check_hardware(_cpu())
    with pytest.raises(ConfigError, match=r"hardware\.encode_dtype.*auto"):
        check_hardware(_cpu(encode_dtype="fp8"))


def test_gpu_configs_leave_out_cudnn_attention_and_the_option_is_checked() -> None:
    import torch
    from hydra import compose, initialize_config_dir

    from tests.test_configs import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name in ("gpu", "ddp", "slurm"):
            gpu = compose(config_name="config", overrides=[f"hardware={name}"]).hardware
            assert gpu.cudnn_attention is False and hardware.uses_gpu(gpu)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        hardware.set_attention_backends(_cpu(cudnn_attention=False))  # a CPU run changes nothing
        assert torch.backends.cuda.cudnn_sdp_enabled()
        hardware.set_attention_backends(gpu)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    assert hardware.torch_device(_cpu()) == torch.device("cpu")
    with pytest.raises(Exception) as raised:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose(config_name="config", overrides=["hardware.cudnn_attention=sometimes"])
    assert "full_key: hardware.cudnn_attention" in str(raised.value.__cause__)  # refused by the schema's type


def test_a_gpu_config_is_refused_before_any_model_loads_where_torch_sees_no_gpu() -> None:
    import torch
    from hydra import compose, initialize_config_dir

    from hybrid_retrieval.evaluate import check_evaluate_config
    from hybrid_retrieval.hardware import check_device
    from tests.test_configs import CONF

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    check_device(_cpu())
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["hardware=gpu", "model=tiny"])
    with pytest.raises(ConfigError, match=r"hardware\.accelerator='gpu': expected a CUDA device visible to torch "
                                          r".*use hardware=cpu"):
        check_evaluate_config(cfg)


def test_ddp_configs_give_up_on_a_collective_after_collective_timeout_s() -> None:
    from datetime import timedelta

    from hydra import compose, initialize_config_dir
    from pytorch_lightning.strategies import DDPStrategy

    from hybrid_retrieval.training.strategy import trainer_strategy
    from tests.test_configs import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name in ("ddp", "ddp_cpu", "slurm"):
            config = compose(config_name="config", overrides=[f"hardware={name}"]).hardware
            strategy = trainer_strategy(config)
            assert isinstance(strategy, DDPStrategy) and strategy.collective_timeout == timedelta(minutes=5), name
            assert strategy._timeout == DDPStrategy()._timeout, name  # the rendezvous keeps torch's default
            config.collective_timeout_s = None
            assert trainer_strategy(config) == "ddp"
    assert trainer_strategy(_cpu(strategy="auto", collective_timeout_s=60)) == "auto"
    for bad in (0, -1, "5m", True):
        with pytest.raises(ConfigError, match=r"hardware\.collective_timeout_s=.*expected a number of seconds > 0"):
            check_hardware(_cpu(collective_timeout_s=bad))
