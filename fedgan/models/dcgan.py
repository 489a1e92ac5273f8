"""DCGAN (Radford et al. 2016) with a BatchNorm-free discriminator, so DP-SGD can apply to it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedgan.models.base import FAMILIES, GanFamily, ImageShape

if TYPE_CHECKING:
    from fedgan.config import ModelSection


def num_upsamplings(size: int) -> int:
    """How many x2 stages take a 4x4 map to ``size`` (the architecture preset by resolution)."""
    depth = int(math.log2(size)) - 2
    if size < 16 or 4 * 2**depth != size:
        raise ValueError(f"image size must be a power of two >= 16, got {size}")
    return depth


def init_weights(module: nn.Module) -> None:
    """DCGAN initialization: conv weights ~ N(0, 0.02), norm scales ~ N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """z -> image: a 4x4 projection, then x2 transposed-conv stages to the image size.

    Args:
        latent_dim: Noise size.
        shape: Output channels and side.
        base_channels: Channels of the last hidden stage; each earlier stage doubles them.
    """

    def __init__(self, latent_dim: int, shape: ImageShape, base_channels: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        depth = num_upsamplings(shape.size)
        ch = base_channels * 2 ** (depth - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, ch, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(),
        ]
        for _ in range(depth - 1):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(),
            ]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, shape.channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.latent_dim, 1, 1))


class Discriminator(nn.Module):
    """image -> one logit: x2 strided-conv stages down to 4x4, GroupNorm, LeakyReLU (not in-place).

    GroupNorm instead of BatchNorm keeps every sample's gradient its own (Opacus needs that);
    ``norm="none"`` leaves the inner stages unnormalized (``model.d_norm``).
    ``features`` ends at the 4x4 map, so conditional variants can add a projection.
    """

    def __init__(self, shape: ImageShape, base_channels: int, norm: str = "group") -> None:
        super().__init__()
        depth = num_upsamplings(shape.size)
        ch = base_channels
        layers: list[nn.Module] = [nn.Conv2d(shape.channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        for _ in range(depth - 1):
            if norm == "group":
                layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False),
                           nn.GroupNorm(min(8, ch * 2), ch * 2)]  # fmt: skip
            else:
                layers.append(nn.Conv2d(ch, ch * 2, 4, 2, 1))
            layers.append(nn.LeakyReLU(0.2))
            ch *= 2
        self.features = nn.Sequential(*layers)
        self.feature_channels = ch
        self.head = nn.Conv2d(ch, 1, 4, 1, 0)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).flatten()


class Encoder(nn.Module):
    """image -> latent code: the discriminator's body with a ``latent_dim`` head (the
    encoder of f-AnoGAN, Schlegl et al. 2019). GroupNorm, like the discriminator."""

    def __init__(self, latent_dim: int, shape: ImageShape, base_channels: int) -> None:
        super().__init__()
        body = Discriminator(shape, base_channels)
        self.features = body.features
        self.head = nn.Conv2d(body.feature_channels, latent_dim, 4, 1, 0)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).flatten(1)


def bce_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator BCE: real -> 1, fake -> 0, summed over the two halves (one backward)."""
    return F.binary_cross_entropy_with_logits(
        real, torch.ones_like(real)
    ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def bce_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: -log D(G(z))."""
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


def build(cfg: ModelSection, shape: ImageShape) -> dict[str, nn.Module]:
    return {
        "generator": Generator(cfg.latent_dim, shape, cfg.base_channels),
        "discriminator": Discriminator(shape, cfg.base_channels, cfg.d_norm),
    }


FAMILIES.add("dcgan", GanFamily("dcgan", build, bce_d_loss, bce_g_loss))
