"""Shared test fixtures: real data location, determinism, one torch thread per xdist worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: Real datasets (MNIST, CIFAR-10 JPEG, N-MNIST subset); override with BESTFORMER_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("BESTFORMER_SHARED_DATA", REPO.parent / "shared" / "data"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def shared_data() -> Path:
    """The real-data folder; tests that need it skip with the reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set BESTFORMER_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
