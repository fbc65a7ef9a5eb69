"""The ``train`` node's schema (``conf/config.yaml``, overridden by ``conf/experiment/*.yaml``): an unknown key or a
value of the wrong type is refused when Hydra composes the config; ranges and rules across keys are checked by
``config_checks.check_train_config`` before any model loads. ``conf/config.yaml`` says what each option does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class TrainConfig:
    batch_size: int = 32
    lr: float = 5.0e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: str = "linear"                 # linear | cosine | constant
    seed: int = 42
    freeze_embeddings: bool = True
    grad_cache_chunk: Optional[int] = None
    gradient_checkpointing: bool = False
    sparse_embeddings: bool = True
    hard_negatives: int = 1
    num_workers: int = 0
    dynamic_padding: bool = False
    checkpoint_every_n_steps: Optional[int] = 50
    resume: Optional[str] = None             # a run folder | last | auto
    contamination: str = "refuse"            # refuse | warn | off
    log_batches: bool = False
    evaluate_before: Any = True              # true | false | first_job
    merge_ratio: Optional[float] = None
    monitor: str = "val/multi/map"
    monitor_mode: str = "max"                # max | min
