"""One discriminator step and one generator step, as pure functions of networks and a batch."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer

from fedgan.models.base import GanFamily


def forward(net: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``net(x)``, or ``net(x, labels)`` for a conditional network."""
    return net(x) if labels is None else net(x, labels)


def gradient_penalty(
    discriminator: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """WGAN-GP's penalty: ``(||grad_x D(x_hat)|| - 1)^2`` at random interpolates of real and
    fake images (Gulrajani et al. 2017)."""
    alpha = torch.rand(len(real), 1, 1, 1, device=real.device, generator=generator)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(
        forward(discriminator, mixed, labels).sum(), mixed, create_graph=True
    )
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def d_step(
    family: GanFamily,
    generator: nn.Module,
    discriminator: nn.Module,
    opt_d: Optimizer,
    real: torch.Tensor,
    z: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    gp_weight: float = 10.0,
    noise: torch.Generator | None = None,
) -> torch.Tensor:
    """Updates the discriminator on one real batch and one generated batch.

    The real and fake losses are summed before a single backward (under DP-SGD each sample's
    gradient is then clipped once, not twice), and the gradients are cleared right after the
    step so nothing carries over into the next step. A discriminator with ``clipped_backward``
    (paired ghost clipping) sees ``cat([real, fake])`` in one forward, row ``i`` and ``n + i``
    forming the pair that is clipped together. A conditional family generates fakes of the
    real batch's labels; a WGAN-GP family adds the gradient penalty (``gp_weight``).

    Returns:
        The detached loss (no host sync, so GPU steps are not serialized).
    """
    with torch.no_grad():
        fake = forward(generator, z, labels)
    clipped_backward = getattr(discriminator, "clipped_backward", None)
    if clipped_backward is not None:  # DP-SGD, paired ghost clipping (fedgan.privacy.ghost)
        n = len(real)
        both = forward(discriminator, torch.cat([real, fake]),
                       None if labels is None else torch.cat([labels, labels]))  # fmt: skip
        loss = family.d_loss(both[:n], both[n:])
    else:
        loss = family.d_loss(
            forward(discriminator, real, labels), forward(discriminator, fake, labels)
        )
    if family.gradient_penalty:
        loss = loss + gp_weight * gradient_penalty(discriminator, real, fake, labels, noise)
    opt_d.zero_grad(set_to_none=True)
    if clipped_backward is not None:
        clipped_backward(loss)
    else:
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
    labels: torch.Tensor | None = None,
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
        loss = family.g_loss(forward(discriminator, forward(generator, z, labels), labels))
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
    finally:
        discriminator.requires_grad_(True)
        if hooks is not None:
            discriminator.enable_hooks()  # type: ignore[operator]
    return loss.detach()
