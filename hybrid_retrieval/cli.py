"""What every entry point shares: ``run.py`` and the ``python -m hybrid_retrieval.<command>`` drivers.

* :func:`hydra_main` — the ``main`` skeleton: Hydra's entry, the third-party noise filters, and the one error
  block for the project's own input errors (config, data, model, resume, tracking): the message (what was wrong,
  the option or file, what to set) and a non-zero exit, without a traceback. ``HYDRA_FULL_ERROR=1`` shows the
  whole stack; an unexpected exception keeps its traceback.
* :func:`quiet_third_party` — the one place where library warnings that tell this project's user nothing are
  dropped, each by its message and category (never a blanket ignore).
* The model a command encodes with (``checkpoint=`` or ``model=``) and the folder it writes into.

Drivers compose these and library code; no driver imports another.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from hybrid_retrieval.config_checks import ConfigError, projection_options

PACKAGE_DIR = Path(__file__).resolve().parent
ENTRY_POINT = PACKAGE_DIR.parent / "run.py"
DEBUG_ENV = "HYDRA_FULL_ERROR"  # Hydra's own switch: set to 1, every error shows its full stack
R = TypeVar("R")

# ---------------------------------------------------------------------------------------------------- errors

# Built-in exception types the project's checks raise with a message meant for the user (``raise ValueError(...)``
# in a check); the same types raised anywhere else are bugs and keep their traceback.
CHECK_TYPES = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class InputError(CompactHydraException):
    """The project's own error as Hydra prints it: the message alone, no traceback (Hydra writes the job's
    overrides above it and the ``HYDRA_FULL_ERROR=1`` hint below, and exits with status 1)."""


def _defined_in_project(error: BaseException) -> bool:
    return any(kind.__module__.split(".")[0] == PACKAGE_DIR.name for kind in type(error).__mro__)


def _raised_by_a_check(error: BaseException) -> bool:
    """A built-in error whose ``raise`` statement is the project's own code (not a library's, not a failed call)."""
    import linecache

    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    file = Path(tb.tb_frame.f_code.co_filename).resolve()
    if PACKAGE_DIR not in file.parents and file != ENTRY_POINT:
        return False
    return linecache.getline(str(file), tb.tb_lineno).strip().startswith("raise ")


def own_error(error: BaseException) -> BaseException | None:
    """The project's own input error in ``error``: itself, or what Hydra's ``instantiate`` (or OmegaConf) wrapped;
    None for anything else (a bug, a library failure)."""
    candidates = [error]
    if error.__cause__ is not None and type(error).__module__.split(".")[0] in ("hydra", "omegaconf"):
        candidates.append(error.__cause__)
    for candidate in candidates:
        if isinstance(candidate, Exception) and (
                _defined_in_project(candidate) or (isinstance(candidate, CHECK_TYPES) and _raised_by_a_check(candidate))):
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
    text = f"{type(cause).__name__}: {cause}"
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
                check_known_keys(cfg)
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


# Options renamed since earlier versions: old name -> new. A command line that uses an old name is refused before
# Hydra composes (which would only say the key is unknown), naming the new one.
RENAMED_OPTIONS = {"out": "output"}


def refuse_renamed_options(overrides: Sequence[str]) -> None:
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in RENAMED_OPTIONS:
            raise SystemExit(f"ConfigError: {key}= is now {RENAMED_OPTIONS[key]}= (one name for the output folder "
                             f"of every command): write {override.replace(key, RENAMED_OPTIONS[key], 1)}")


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


# ------------------------------------------------------------------------------------------------ the model


def check_model_source(cfg: DictConfig) -> None:
    """The model must be loadable: ``checkpoint`` an existing file, else ``model`` a valid config (a given
    ``model.path`` an existing model folder with its tokenizer)."""
    from hybrid_retrieval.config_checks import check_model
    from hybrid_retrieval.run_folder import check_checkpoint_file

    if cfg.get("checkpoint"):
        check_checkpoint_file(cfg.checkpoint)
        projection_options(cfg.get("model"))  # checked here too: the checkpoint brings its model, not these options
        return
    check_model(cfg.model)
    if cfg.model.get("path"):
        from hybrid_retrieval.models.loading import check_tokenizer_files, resolve_hub_folder

        check_tokenizer_files(resolve_hub_folder(cfg.model.name, None, cfg.model.path))


def load_model(cfg: DictConfig) -> Any:
    """The encoder of ``checkpoint`` if set, else of the ``model`` config, in eval mode on ``hardware``'s device."""
    from hybrid_retrieval.hardware import torch_device

    if cfg.get("checkpoint"):
        from hybrid_retrieval.models.checkpoint import encoder_from_checkpoint, merge_with_start, read_checkpoint

        ratio = merge_ratio(cfg)
        checkpoint = read_checkpoint(cfg.checkpoint)
        encoder = encoder_from_checkpoint(checkpoint)
        if ratio is not None:  # WiSE-FT with the run's starting model
            encoder = merge_with_start(encoder, checkpoint, ratio)
        truncate_dim = cfg.get("model", {}).get("truncate_dim")
        if truncate_dim is not None:  # the command line's size wins over the one the checkpoint was trained with
            from hybrid_retrieval.models.encoder import check_truncate_dim

            check_truncate_dim(truncate_dim, encoder.embedding_dim)
            encoder.truncate_dim = int(truncate_dim)
    else:
        from hydra.utils import instantiate

        encoder = instantiate(cfg.model)
    encoder = encoder.to(torch_device(cfg.hardware)).eval()
    options = projection_options(cfg.get("model"))
    if options is not None:
        from hybrid_retrieval.hardware import encode_dtype
        from hybrid_retrieval.models.language_projection import fit_for_encoder

        projection = fit_for_encoder(encoder, options, batch_size=cfg.hardware.encode_batch_size,
                                     dtype=encode_dtype(cfg.hardware))
        projection.save(run_folder())
        encoder.language_projection = projection
    return encoder


def merge_ratio(cfg: DictConfig) -> float | None:
    """``merge_with=start merge_ratio=r`` (checked; only with ``checkpoint=``), or None."""
    from hybrid_retrieval.models.merge import check_merge

    try:
        ratio = check_merge(cfg.get("merge_with"), cfg.get("merge_ratio", 1.0))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if ratio is not None and not cfg.get("checkpoint"):
        raise ConfigError("merge_with=start needs checkpoint=<run folder>/checkpoints/best.ckpt: the checkpoint "
                          "records the model its run started from")
    return ratio


def model_source(cfg: DictConfig) -> str:
    """Where the weights came from, for meta files and MLflow tags."""
    if cfg.get("checkpoint"):
        merged = f" merged with start at {cfg.merge_ratio}" if cfg.get("merge_with") else ""
        return f"checkpoint:{Path(str(cfg.checkpoint)).expanduser().resolve()}{merged}"
    if cfg.model.get("path"):
        return f"path:{Path(str(cfg.model.path)).expanduser().resolve()}"
    return f"{cfg.model.source}:{cfg.model.get('checkpoint') or cfg.model.name}"


def encode_texts(encoder: Any, texts: list[str], kind: str, hardware: DictConfig) -> tuple[np.ndarray, float]:
    """Embeddings (float32, input order) and the seconds it took."""
    from hybrid_retrieval.hardware import encode_dtype

    dtype = encode_dtype(hardware)
    start = time.perf_counter()
    emb = encoder.encode(texts, kind, batch_size=int(hardware.encode_batch_size), dtype=dtype)
    return emb.astype(np.float32, copy=False), time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ the output


def run_folder() -> Path:
    """This job's Hydra run folder (the current folder outside Hydra)."""
    from hybrid_retrieval.tracking import job_context

    return Path(job_context()["output_dir"])


def output_folder(cfg: DictConfig, option: str = "output", subfolder: str | None = None) -> Path:
    """``cfg.<option>``, else the run folder (or its ``subfolder``) when it is null."""
    if cfg.get(option):
        return Path(str(cfg.get(option))).expanduser()
    return run_folder() / subfolder if subfolder else run_folder()


def check_new_folder(folder: Path, option: str, overwrite: bool,
                     error: type[Exception] = ConfigError) -> Path:
    """A folder a command fills: new, empty, or ``overwrite=true``."""
    if folder.exists() and not folder.is_dir():
        raise error(f"{option}={str(folder)!r}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise error(f"{option}={str(folder)!r}: folder exists and is not empty; choose another folder or pass "
                    "overwrite=true to replace it")
    return folder
