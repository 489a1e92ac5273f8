"""Conditional DCGAN: a label-embedding generator and a projection discriminator (Miyato &
Koyama 2018), for class-balanced synthetic data. BatchNorm-free discriminator: DP-SGD applies."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fedgan.models.base import FAMILIES, GanFamily, ImageShape
from fedgan.models.dcgan import Discriminator, Generator, bce_d_loss, bce_g_loss

if TYPE_CHECKING:
    from fedgan.config import ModelSection


class ConditionalGenerator(nn.Module):
    """``G(z, y)``: the DCGAN generator fed ``[z, embed(y)]``.

    Attributes:
        latent_dim: Noise size (what callers sample).
        num_classes: Number of classes.
    """

    def __init__(self, latent_dim: int, num_classes: int, shape: ImageShape, base: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.body = Generator(2 * latent_dim, shape, base)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([z, self.embed(labels)], dim=1))


class ProjectionDiscriminator(nn.Module):
    """``D(x, y) = head(phi(x)) + <embed(y), sum_hw phi(x)>``."""

    def __init__(self, num_classes: int, shape: ImageShape, base: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.body = Discriminator(shape, base)
        self.embed = nn.Embedding(num_classes, self.body.feature_channels)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.body.features(x)
        unconditional = self.body.head(h).flatten()
        # [B, 1] labels: Opacus's ExpandedWeights embedding needs a (batch, sequence) input.
        class_vectors = self.embed(labels[:, None])[:, 0]
        return unconditional + (class_vectors * h.sum(dim=(2, 3))).sum(dim=1)


def build(cfg: ModelSection, shape: ImageShape) -> dict[str, nn.Module]:
    return {
        "generator": ConditionalGenerator(
            cfg.latent_dim, cfg.num_classes, shape, cfg.base_channels
        ),
        "discriminator": ProjectionDiscriminator(cfg.num_classes, shape, cfg.base_channels),
    }


FAMILIES.add("cgan", GanFamily("cgan", build, bce_d_loss, bce_g_loss, conditional=True))
