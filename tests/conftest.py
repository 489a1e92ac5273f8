"""Shared fixtures: toy configs and the ../shared material (skipped cleanly where absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedgan.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FEDGAN_SHARED", REPO.parent / "shared"))

# Under pytest-xdist the cores are shared among the workers: one thread each unless there are
# cores to spare (more threads than cores makes torch's parallel loops spin, not run).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

TOY_OVERRIDES = [  # 16 px images, narrow networks, two short rounds
    "data.image_size=16",
    "model.base_channels=8",
    "model.latent_dim=16",
    "train.batch_size=8",
    "train.local_steps=2",
    "federation.num_rounds=2",
    "eval.grid_size=16",
]


@pytest.fixture
def toy_overrides() -> list[str]:
    """The settings every toy run shares, for tests that add their own (``--set`` style)."""
    return list(TOY_OVERRIDES)


@pytest.fixture
def toy_config(tmp_path: Path) -> Config:
    """A config small enough for unit tests: 16 px phantoms, narrow networks, few steps."""
    return load_config(
        None,
        [
            f"run.output_dir={tmp_path / 'runs'}",
            "run.name=toy",
            *TOY_OVERRIDES,
            "data.num_images=96",
            "federation.num_hospitals=3",
        ],
    )


def _shared(relative: str, what: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set FEDGAN_SHARED to the shared folder)")
    return path


@pytest.fixture
def pneumonia_npz() -> Path:
    return _shared("data/pneumoniamnist.npz", "PneumoniaMNIST")


@pytest.fixture
def inception_weights() -> Path:
    return _shared("weights/fid_inception_2015-12-05.pth", "FID Inception weights")


@pytest.fixture
def independent_epsilon():
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps ``(sigma, q, steps, delta)`` by
    Google's dp-accounting PLD accountant: an implementation independent of Opacus."""

    def epsilon(sigma: float, q: float, steps: int, delta: float, release: float = 0.0) -> float:
        """``release``: the sigma of one Gaussian release composed with the steps (0: none)."""
        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant

        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
        if release:
            acc.compose(dp_accounting.GaussianDpEvent(release))
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        return float(acc.get_epsilon(delta))

    return epsilon
