"""What every entry point shares: ``run.py`` and the ``python -m hybrid_retrieval.<command>`` drivers.

* :func:`hydra_main` — the ``main`` skeleton: Hydra's entry, the third-party noise filters, and the one error
  block for the project's own input errors (config, data, model, resume, tracking): the message (what was wrong,
  the option or file, what to set) and a non-zero exit, without a traceback. ``HYDRA_FULL_ERROR=1`` shows the
  whole stack; an unexpected exception keeps its traceback.
* :func:`quiet_third_party` — the one place where library warnings that tell this project's user nothing are
  dropped, each by its message and category (never a blanket ignore).

Drivers compose these and library code; no driver imports another.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from hybrid_retrieval.config_error import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
DEBUG_ENV = "HYDRA_FULL_ERROR"  # Hydra's own switch: set to 1, every error shows its full stack
R = TypeVar("R")

# ---------------------------------------------------------------------------------------------------- errors


class InputError(CompactHydraException):
    """The project's own error as Hydra prints it: the message alone, no traceback (Hydra writes the job's
    overrides above it and the ``HYDRA_FULL_ERROR=1`` hint below, and exits with status 1)."""


def own_error(error: BaseException) -> BaseException | None:
    """The project's own input error in ``error`` (a :class:`~hybrid_retrieval.config_error.UserError`, or another
    exception class the project defines for its input, such as ``DataNotFoundError``): itself, or what Hydra's
    ``instantiate`` (or OmegaConf) wrapped; None for anything else (a bug, a library failure)."""
    candidates = [error]
    if error.__cause__ is not None and type(error).__module__.split(".")[0] in ("hydra", "omegaconf"):
        candidates.append(error.__cause__)
    for candidate in candidates:
        if isinstance(candidate, Exception) and any(kind.__module__.split(".")[0] == PACKAGE_DIR.name
                                                    for kind in type(candidate).__mro__):
            return candidate
    return None


def _config_key(cfg: DictConfig, wrapper: BaseException) -> str | None:
    """The option whose ``_target_`` failed, from Hydra's ``full_key: train_data.datasets0`` (Hydra drops the dot
    before a list index; the key is written as a user types it: ``train_data.datasets.0``)."""
    found = re.search(r"full_key: (\S+)", str(wrapper))
    if found is None:
        return None
    key = found.group(1)
    parent, _, last = key.rpartition(".")
    indexed = re.fullmatch(r"(.*\D)(\d+)", last)
    if indexed and OmegaConf.is_list(OmegaConf.select(cfg, f"{parent}.{indexed.group(1)}" if parent else indexed.group(1))):
        return f"{parent}.{indexed.group(1)}.{indexed.group(2)}" if parent else f"{indexed.group(1)}.{indexed.group(2)}"
    return key


def error_block(error: BaseException, cause: BaseException, cfg: DictConfig | None = None) -> str:
    """The message a user reads: ``<Kind>: <message>``, and the option being built when Hydra's ``instantiate``
    wrapped it."""
    name = cause.shown_name() if isinstance(cause, UserError) else type(cause).__name__
    text = f"{name}: {cause}"
    if cause is not error and cfg is not None:
        key = _config_key(cfg, error)
        if key:
            text += f"\n(while building {key})"
    return text


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


# ------------------------------------------------------------------------------------------------ the noise


class _DropMessages(logging.Filter):
    def __init__(self, *parts: str) -> None:
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


_LIGHTNING_TIPS = _DropMessages("litlogger")


def quiet_third_party(resuming: bool = False) -> None:
    """Drop the library messages that say nothing to this project's user, each by message and category."""
    # torch 2.13 deprecated `LeafSpec`; Lightning 2.6 still builds one in its own `_pytree` helper on every
    # optimiser step. Nothing a user of this project can change (it goes when Lightning updates).
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    # Validation metrics come from embeddings gathered across ranks: every rank holds the same values already.
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level")
    # An advertisement for a cloud logger, logged by every Trainer.
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _LIGHTNING_TIPS not in logger.filters:
            logger.addFilter(_LIGHTNING_TIPS)
    # faiss reports which SIMD build it loaded at INFO.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if resuming:
        # train.resume continues in the run folder it names: its checkpoints/ holds last.ckpt and best.ckpt on
        # purpose. (A fresh run into a used folder still gets Lightning's warning.)
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty",
                                category=UserWarning)
        # Lightning warns that a mid-epoch resume with a loader that has no state_dict is unreliable. Here it is
        # exact: the datamodule's state (saved in last.ckpt) makes the batch sampler skip exactly the finished
        # batches, and the RNG states are restored at the first batch; the SIGKILL-and-resume test checks that the
        # resumed run ends with the uninterrupted run's metrics.
        warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended",
                                category=UserWarning)


# ------------------------------------------------------------------------------------------------ the entry


def hydra_main(config_name: str, config_path: str = "../conf") -> Callable[[Callable[[DictConfig], R]],
                                                                           Callable[[], R]]:
    """``@hydra_main("encode")`` over a ``task(cfg)``: Hydra's entry with the project's error block and noise
    filters. ``config_path`` is relative to the file of ``task``, as with ``hydra.main``."""
    import hydra

    from hybrid_retrieval.schemas import check_known_keys, register

    register()  # before Hydra composes: the config groups' YAML files name their schemas

    def decorate(task: Callable[[DictConfig], R]) -> Callable[[], R]:
        @functools.wraps(task)  # Hydra takes the job's name and the config folder from the task's module
        def guarded(cfg: DictConfig) -> R:
            quiet_third_party(resuming=bool(OmegaConf.select(cfg, "train.resume", default=None)))
            try:
                check_known_keys(cfg, command_line_additions(), config_groups(Path(task.__code__.co_filename).parent
                                                                              / config_path))
                return task(cfg)
            except Exception as error:
                cause = own_error(error)
                if sweep_reports_failures():
                    # The other jobs still run; the sweep's end lists this one and exits non-zero.
                    report_failed_job(error if cause is None or debugging() else error_block(error, cause, cfg))
                    return math.nan  # type: ignore[return-value]
                if cause is None or debugging():
                    raise
                raise InputError(error_block(error, cause, cfg)) from None

        main = hydra.main(version_base="1.3", config_path=config_path, config_name=config_name)(guarded)

        @functools.wraps(main)
        def entry() -> R:
            refuse_renamed_options(sys.argv[1:])
            return main()

        return entry

    return decorate


def command_line_additions() -> list[str]:
    """This job's ``+key=value`` overrides (none outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task if str(o).startswith("+")]


def config_groups(conf: Path) -> set[str]:
    """The config groups a command can add with ``+group=option``: the folders of its config directory."""
    return {p.name for p in conf.resolve().iterdir() if p.is_dir()} if conf.is_dir() else set()


def refuse_renamed_options(overrides: Sequence[str]) -> None:
    """A command line with an option renamed since (``upgrade.RENAMED_OPTIONS``) is refused before Hydra composes
    (which would only say the key is unknown), naming the new one."""
    from hybrid_retrieval.upgrade import RENAMED_OPTIONS

    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in RENAMED_OPTIONS:
            new, why = RENAMED_OPTIONS[key]
            raise SystemExit(f"ConfigError: {key}= is now {new}= ({why}): write "
                             f"{override.replace(key, new, 1).lstrip('+')}")


def sweep_reports_failures() -> bool:
    """True in a multirun whose end lists the jobs that did not finish (``reporting.sweep.SweepReport``, in
    ``conf/config.yaml``): a failing job then ends alone instead of stopping the sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return False
    return any(node is not None and str(node.get("_target_", "")).endswith(".SweepReport")
               for node in (hydra_cfg.callbacks or {}).values())


def report_failed_job(error: BaseException | str) -> None:
    """A failed sweep job's message as Hydra prints it for a single run: its overrides, then the error block (a
    user's error) or the traceback (anything else)."""
    import sys
    import traceback

    from hydra.core.hydra_config import HydraConfig

    from hybrid_retrieval.reporting.sweep import record_failed_job

    hydra_cfg = HydraConfig.get()
    text = error if isinstance(error, str) else "".join(traceback.format_exception(error))
    print(f"Error executing job with overrides: {list(hydra_cfg.overrides.task)}\n{text}", file=sys.stderr)
    summary = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    record_failed_job(Path(hydra_cfg.sweep.dir).resolve(), hydra_cfg.runtime.output_dir, hydra_cfg.overrides.task,
                      summary)
