"""The ``adapt`` node's schema (``conf/adapt/*.yaml``): Hydra refuses an unknown key or a wrong type while composing.
:class:`MLMSettings` are the MLM stage's options; the schema is they plus ``method`` and ``text`` (the unlabelled
text), for ``adapt=none`` too, so that a sweep over ``adapt=none,mlm`` can set the MLM options once (``none`` logs
the ones it does not use). ``adaptation/mlm.py`` checks the ranges and the text source's options before any work."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MLMSettings:
    """The MLM options of ``conf/adapt/mlm.yaml`` (their meaning: that file and ``adaptation/mlm.py``)."""

    steps: int = 100
    head_warmup_steps: int = 50
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
    head: str = "auto"
    log_every: int = 10
    seed: int = 42


# The method (none | mlm), the text ({source, name, unit, ...}) and the MLM settings.
AdaptConfig = dataclasses.make_dataclass(
    "AdaptConfig",
    [("method", str, dataclasses.field(default="none")), ("text", Any, dataclasses.field(default=None)),
     *((f.name, typing.get_type_hints(MLMSettings)[f.name], dataclasses.field(default=f.default))
       for f in dataclasses.fields(MLMSettings))])
AdaptConfig.__module__ = __name__
