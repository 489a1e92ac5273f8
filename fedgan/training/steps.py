"""One discriminator step and one generator step, as pure functions of networks and a batch."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer

from fedgan.models.base import GanFamily


def d_step(
    family: GanFamily,
    generator: nn.Module,
    discriminator: nn.Module,
    opt_d: Optimizer,
    real: torch.Tensor,
    z: torch.Tensor,
) -> torch.Tensor:
    """Updates the discriminator on one real batch and one generated batch.

    The real and fake losses are summed before a single backward (under DP-SGD each sample's
    gradient is then clipped once, not twice), and the gradients are cleared right after the
    step so nothing carries over into the next step.

    Returns:
        The detached loss (no host sync, so GPU steps are not serialized).
    """
    with torch.no_grad():
        fake = generator(z)
    loss = family.d_loss(discriminator(real), discriminator(fake))
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    opt_d.zero_grad(set_to_none=True)
    return loss.detach()


def g_step(
    family: GanFamily,
    generator: nn.Module,
    discriminator: nn.Module,
    opt_g: Optimizer,
    z: torch.Tensor,
) -> torch.Tensor:
    """Updates the generator through the (fixed) discriminator.

    Gradients also reach the discriminator's parameters; they are cleared afterwards so that
    they never leak into the discriminator's next step.
    """
    # Under DP-SGD the discriminator carries per-sample gradient hooks: they would cost about
    # 2x here and spend nothing, so they are off for the generator step.
    hooks = getattr(discriminator, "disable_hooks", None)
    if hooks is not None:
        hooks()
    discriminator.requires_grad_(False)
    try:
        loss = family.g_loss(discriminator(generator(z)))
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
    finally:
        discriminator.requires_grad_(True)
        if hooks is not None:
            discriminator.enable_hooks()  # type: ignore[operator]
    return loss.detach()
