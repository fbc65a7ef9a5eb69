"""The ``adapt`` node's schemas (``conf/adapt/*.yaml``): Hydra refuses an unknown key or a wrong type while composing.
``adaptation/mlm.py`` checks the ranges and the ``text`` source's options before any work; its ``MLMSettings`` are
these options (a test keeps the two equal)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class AdaptNoneConfig:
    """No adaptation stage (``adapt=none``)."""

    method: str = "none"


@dataclass
class AdaptMlmConfig:
    """Masked-language-model adaptation (``adapt=mlm``, ``adapt=mlm_target``); ``conf/adapt/mlm.yaml`` says what each
    option does."""

    method: str = "mlm"
    text: Any = None                      # the unlabelled text: {source, name, unit, languages, root, path, ...}
    steps: int = 100
    head_warmup_steps: int = 50
    head: str = "auto"                    # auto | new
    batch_size: int = 16
    max_length: int = 128
    lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    masking_rate: float = 0.15
    whole_word: bool = False
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    heldout_size: int = 64
    heldout_mask_seed: int = 1234
    freeze_embeddings: bool = False
    log_every: int = 10
    seed: int = 42


SCHEMAS = {"adapt": AdaptNoneConfig, "adapt_mlm": AdaptMlmConfig}
