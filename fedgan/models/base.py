"""The GAN family interface and registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from fedgan.catalog import FAMILIES as _FAMILIES
from fedgan.registry import Registry

if TYPE_CHECKING:
    from fedgan.config import ModelSection


class ImageShape(NamedTuple):
    """Channels and side of the square images a model generates."""

    channels: int
    size: int


@dataclass(frozen=True)
class GanFamily:
    """A GAN family: how to build its networks and the losses its steps minimize.

    Attributes:
        name: Registered name (``model.family``).
        build: ``(model_cfg, shape) -> {"generator": G, "discriminator": D}``.
        d_loss: ``(d(real), d(fake)) -> loss`` minimized by the discriminator.
        g_loss: ``d(fake) -> loss`` minimized by the generator.
        dp_incompatibility: Why Opacus cannot privatize this family's discriminator (empty
            when it can), e.g. spectral norm or a gradient penalty.
        conditional: Generator and discriminator take class labels (``G(z, y)``, ``D(x, y)``).
        n_critic: Discriminator (critic) steps per generator step by default.
        gradient_penalty: The discriminator loss adds a gradient penalty (WGAN-GP).
        decision_boundary: The discriminator's output above which it calls an image real
            (its accuracy is what the adaptive critic schedule watches); None for a critic
            whose scores have no fixed boundary (WGAN).
    """

    name: str
    build: Callable[[ModelSection, ImageShape], dict[str, nn.Module]]
    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    g_loss: Callable[[torch.Tensor], torch.Tensor]
    dp_incompatibility: str = ""
    conditional: bool = False
    n_critic: int = 1
    gradient_penalty: bool = False
    decision_boundary: float | None = 0.0


FAMILIES: Registry[GanFamily] = _FAMILIES  # declared in fedgan.catalog


def build_networks(
    model_cfg: ModelSection, shape: ImageShape, *, seed: int
) -> dict[str, nn.Module]:
    """Builds the family's networks with seeded initial weights."""
    family = FAMILIES.get(model_cfg.family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return family.build(model_cfg, shape)
