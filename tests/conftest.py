"""Shared test fixtures: real data location, determinism, one torch thread per xdist worker."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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


@pytest.fixture
def plain_neurons() -> Iterator[None]:
    """The reference LIF path (not the fused kernels) for tests about training, restored afterwards."""
    from bestformer.neurons import get_backend, set_backend

    before = get_backend()
    set_backend("plain")
    yield
    set_backend(before)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def digits_losses() -> Callable[[nn.Module], list[float]]:
    """Train ``model`` for 8 AdamW steps on the first 48 real 8x8 digits; return the loss per step."""
    sklearn = pytest.importorskip("sklearn.datasets")
    digits = sklearn.load_digits()
    x = torch.tensor(digits.images[:48], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target[:48])

    def run(model: nn.Module) -> list[float]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(8):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    return run
