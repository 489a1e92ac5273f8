"""WGAN-GP (Gulrajani et al. 2017): a Wasserstein critic (the DCGAN discriminator's layout,
GroupNorm, no sigmoid) with a gradient penalty and n_critic critic steps per generator step."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fedgan.models.base import FAMILIES, GanFamily, ImageShape
from fedgan.models.dcgan import Discriminator, Generator

if TYPE_CHECKING:
    from fedgan.config import ModelSection


def critic_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """``E[D(G(z))] - E[D(x)]`` (the penalty is added by the step)."""
    return fake.mean() - real.mean()


def generator_loss(fake: torch.Tensor) -> torch.Tensor:
    """``-E[D(G(z))]``."""
    return -fake.mean()


def build(cfg: ModelSection, shape: ImageShape) -> dict[str, nn.Module]:
    return {
        "generator": Generator(cfg.latent_dim, shape, cfg.base_channels),
        "discriminator": Discriminator(shape, cfg.base_channels, cfg.d_norm),
    }


FAMILIES.add(
    "wgan-gp",
    GanFamily(
        "wgan-gp",
        build,
        critic_loss,
        generator_loss,
        n_critic=5,
        gradient_penalty=True,
        decision_boundary=None,  # a critic's scores drift freely: no real/fake boundary
        dp_incompatibility=(
            "the gradient penalty differentiates the critic with respect to its inputs inside "
            "the private step (a double backward), which Opacus's per-sample gradients do not "
            "support"
        ),
    ),
)
