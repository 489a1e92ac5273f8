"""Shared fixtures: toy configs and the ../shared material (skipped cleanly where absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedgan.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FEDGAN_SHARED", REPO.parent / "shared"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def toy_config(tmp_path: Path) -> Config:
    """A config small enough for unit tests: 16 px phantoms, narrow networks, few steps."""
    return load_config(
        None,
        [
            f"run.output_dir={tmp_path / 'runs'}",
            "run.name=toy",
            "data.image_size=16",
            "data.num_images=96",
            "model.base_channels=8",
            "model.latent_dim=16",
            "train.batch_size=8",
            "train.local_steps=2",
            "federation.num_hospitals=3",
            "federation.num_rounds=2",
            "eval.grid_size=16",
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
