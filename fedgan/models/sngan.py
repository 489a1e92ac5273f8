"""SNGAN as in MedGAN practice: a spectral-normalized discriminator (LeakyReLU, no
normalization layers) with the hinge loss, and the DCGAN generator (transposed convolutions,
BatchNorm, ReLU, Tanh)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from fedgan.models.base import FAMILIES, GanFamily, ImageShape
from fedgan.models.dcgan import Generator, num_upsamplings

if TYPE_CHECKING:
    from fedgan.config import ModelSection


class SNDiscriminator(nn.Module):
    """image -> one logit; every convolution spectral-normalized; per stage a 3x3 conv and a
    4x4 stride-2 conv (the SNGAN/MedGAN discriminator), down to 4x4."""

    def __init__(self, shape: ImageShape, base_channels: int) -> None:
        super().__init__()
        depth = num_upsamplings(shape.size)
        ch, c_in = base_channels, shape.channels
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [
                spectral_norm(nn.Conv2d(c_in, ch, 3, 1, 1)),
                nn.LeakyReLU(0.1),
                spectral_norm(nn.Conv2d(ch, ch * 2, 4, 2, 1)),
                nn.LeakyReLU(0.1),
            ]
            c_in, ch = ch * 2, ch * 2
        layers.append(spectral_norm(nn.Conv2d(c_in, 1, 4, 1, 0)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """``E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]``."""
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """``-E[D(G(z))]``."""
    return -fake.mean()


def build(cfg: ModelSection, shape: ImageShape) -> dict[str, nn.Module]:
    return {
        "generator": Generator(cfg.latent_dim, shape, cfg.base_channels),
        "discriminator": SNDiscriminator(shape, max(cfg.base_channels // 2, 4)),
    }


FAMILIES.add(
    "sngan",
    GanFamily(
        "sngan",
        build,
        hinge_d_loss,
        hinge_g_loss,
        dp_incompatibility=(
            "spectral normalization rescales every weight by a power-iteration estimate shared "
            "by the whole batch, which Opacus cannot give per-sample gradients for"
        ),
    ),
)
