"""The ``train_data`` node: one schema per kind of ``conf/train_data`` file (Hydra refuses an unknown key or a wrong
type while composing). ``datasets`` lists the readers (``_target_`` and the reader's own arguments, which the
reader checks); the files that read a path the user gives take it as ``train_data.path`` (or ``root``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class TrainDataConfig:
    """The project's sets (``mlqa_r``, ``xquad_r``, ``squad_mt``, ``mlqa_r_squad_mt``) and readers of your own."""

    datasets: list[Any] = field(default_factory=list)
    holdout: Optional[Any] = None              # {dataset: mlqa_r, groups: N, seed: S}: the selection split


@dataclass
class TrainDataFileConfig(TrainDataConfig):
    """A file or folder of pairs (``jsonl``, ``parquet``)."""

    path: str = "???"


@dataclass
class TrainDataHfConfig(TrainDataFileConfig):
    """A Hugging Face dataset (``hf``)."""

    split: str = "train"


@dataclass
class TrainDataMmarcoConfig(TrainDataConfig):
    """mMARCO's published layout (``mmarco``)."""

    root: str = "???"


SCHEMAS = {"train_data": TrainDataConfig, "train_data_file": TrainDataFileConfig, "train_data_hf": TrainDataHfConfig,
           "train_data_mmarco": TrainDataMmarcoConfig}
