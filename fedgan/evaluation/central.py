"""The server-side evaluator: fixed-noise sample grids of the global generator."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torchvision.utils import save_image

from fedgan.models import ImageShape, build_networks, load_state

if TYPE_CHECKING:
    from fedgan.config import Config


class CentralEvaluator:
    """Evaluates packed global networks round after round.

    Args:
        cfg: The experiment config (model, seed, eval settings).
        shape: Image shape of the data.
        samples_dir: Where sample grids go (``round_<k>.png``).
    """

    def __init__(self, cfg: Config, shape: ImageShape, samples_dir: Path) -> None:
        self.cfg = cfg
        self.shape = shape
        self.samples_dir = samples_dir
        g = torch.Generator().manual_seed(cfg.run.seed + 424_242)
        self.fixed_noise = torch.randn(cfg.eval.grid_size, cfg.model.latent_dim, generator=g)

    @torch.no_grad()
    def generate(self, state: dict[str, torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from the generator in ``state`` (eval mode, CPU)."""
        nets = build_networks(self.cfg.model, self.shape, seed=self.cfg.run.seed)
        generator = nets["generator"]
        load_state(
            {"generator": generator}, {k: v for k, v in state.items() if k.startswith("generator.")}
        )
        generator.eval()
        return generator(noise)

    def sample_grid(self, round_: int, state: dict[str, torch.Tensor]) -> Path:
        """Writes the fixed-noise grid of ``round_`` and returns its path."""
        images = self.generate(state, self.fixed_noise)
        path = self.samples_dir / f"round_{round_:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        nrow = max(1, int(len(images) ** 0.5))
        save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1), padding=1)
        return path

    def evaluate(self, round_: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per-round evaluation: the sample grid, and the generated images' pixel statistics
        (a cheap sanity signal: a collapsed or saturated generator shows at once)."""
        self.sample_grid(round_, state)
        images = self.generate(state, self.fixed_noise)
        return {
            "gen_pixel_mean": float(images.mean()),
            "gen_pixel_std": float(images.std()),
            "gen_batch_diversity": float(images.flatten(1).std(0).mean()),
        }
