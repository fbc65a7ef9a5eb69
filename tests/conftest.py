"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder holding the datasets (xquad-r/, mlqa-r/, ...): $HYBRID_RETRIEVAL_DATA or <repo>/../shared/data."""
    root = Path(os.environ.get("HYBRID_RETRIEVAL_DATA") or REPO_ROOT.parent / "shared" / "data")
    if not root.is_dir():
        pytest.skip(f"data folder {root} not found; set HYBRID_RETRIEVAL_DATA")
    return root
