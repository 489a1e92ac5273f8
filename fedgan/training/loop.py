"""The one local training loop: every task, every hospital, the centralized baseline, with or
without DP-SGD.

An iteration runs the objective's phases in order; a phase step clears its networks'
gradients, freezes the others, lets the objective accumulate gradients, and steps its
optimizers (adding FedProx's proximal term where asked). DP-SGD changes only where real
batches come from (Poisson sampling) and how a private phase's loss becomes gradients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.optim import Adam, Optimizer

from fedgan.training.objectives.base import Batch, Nets, Objective, Phase, StepContext
from fedgan.training.schedule import CriticSchedule, iterations

if TYPE_CHECKING:
    from torch.utils.data import TensorDataset

    from fedgan.config import TrainSection

#: Real ``(images, labels, other)`` batches; ``other`` is a second, independent batch for
#: unpaired tasks, or None.
RealBatches = Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def make_optimizers(nets: Mapping[str, nn.Module], cfg: TrainSection) -> dict[str, Optimizer]:
    """Adam for each network with the configured (TTUR-capable) learning rates."""
    # Image-to-image tasks have more networks ("generator_ba", "discriminator_a"): the
    # prefix picks the learning rate.
    return {
        name: Adam(net.parameters(), lr=cfg.lr_for(name), betas=(cfg.beta1, cfg.beta2))
        for name, net in nets.items()
    }


def round_lr_scale(cfg: TrainSection, round_: int, num_rounds: int) -> float:
    """The share of the configured learning rates that round ``round_`` (1-based) of
    ``num_rounds`` trains at (``train.lr_schedule``)."""
    if cfg.lr_schedule == "constant" or num_rounds <= 1:
        return 1.0
    progress = min(max(round_ - 1, 0) / (num_rounds - 1), 1.0)
    return cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * progress))


def set_round_lr(
    optimizers: Mapping[str, Optimizer], cfg: TrainSection, round_: int, num_rounds: int
) -> None:
    """Sets every optimizer's learning rate for ``round_`` (after any restored state, whose
    param groups carry the previous round's rate)."""
    scale = round_lr_scale(cfg, round_, num_rounds)
    for name, opt in optimizers.items():
        for group in opt.param_groups:
            group["lr"] = cfg.lr_for(name) * scale


def batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled ``(images, labels)`` batches (each epoch a new permutation; no partial
    batch unless the whole set is smaller than one batch)."""
    n = len(images)
    if n == 0:
        raise ValueError("cannot train on an empty data set")
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator).to(images.device)
        for start in range(0, n - size + 1, size):
            idx = order[start : start + size]
            yield images[idx], labels[idx]


def shuffled_batches(
    dataset: TensorDataset,
    batch_size: int,
    ctx: StepContext,
    *,
    seed: int,
    unpaired: bool = False,
) -> RealBatches:
    """Shuffled fixed-size batches of ``dataset`` on ``ctx.device`` (the order from
    ``ctx.cpu``); with ``unpaired``, a second batch from an independent order (``seed + 1``)."""
    images = dataset.tensors[0].to(ctx.device)
    labels = dataset.tensors[1].to(ctx.device)
    real = batches(images, labels, batch_size, ctx.cpu)
    other = (
        batches(images, labels, batch_size, torch.Generator().manual_seed(seed + 1))
        if unpaired
        else None
    )
    for x, y in real:
        yield x, y, (next(other)[0] if other is not None else None)


def round_seed(seed: int, round_: int, hospital: int = 0) -> int:
    """The seed of one hospital's (or the pooled baseline's) training in one round."""
    return seed * 1_000_003 + round_ * 1009 + hospital


@dataclass(frozen=True)
class LocalStats:
    """What one stretch of local training reports.

    Attributes:
        steps: Iterations run.
        examples: Real images the networks trained on (every batch drawn).
        d_loss: Mean discriminator loss.
        g_loss: Mean generator loss.
        seconds: Wall time of the loop.
        d_steps: Discriminator steps taken.
        critic: The critic schedule's state at the end (n_D, accuracy average), if one ran.
    """

    steps: int
    examples: int
    d_loss: float
    g_loss: float
    seconds: float
    d_steps: int = 0
    critic: dict[str, Any] = field(default_factory=dict)


class ProximalTerm:
    """FedProx (Li et al. 2020): ``mu/2 ||w - w_global||^2`` on every network, added as its
    gradient ``mu (w - w_global)`` right before each optimizer step (after DP-SGD's clipping
    and noise: it depends on no data).

    Args:
        mu: The proximal weight.
        nets: The networks as received from the server (their weights are the anchors).
    """

    def __init__(self, mu: float, nets: Mapping[str, nn.Module]) -> None:
        self.mu = mu
        self.anchors = {
            name: [p.detach().clone() for p in net.parameters()] for name, net in nets.items()
        }

    def add_gradient(self, name: str, net: nn.Module) -> None:
        for p, anchor in zip(net.parameters(), self.anchors[name], strict=True):
            pull = self.mu * (p.detach() - anchor)
            p.grad = pull if p.grad is None else p.grad + pull


def _optimizer_step(opt: Optimizer, before_update: Any = None) -> None:
    """``opt.step()``, with ``before_update()`` run on the final gradients: for Opacus's DP
    optimizers that is after clipping and noise (the same two calls as its ``step``)."""
    pre_step = getattr(opt, "pre_step", None)
    if pre_step is not None and hasattr(opt, "original_optimizer"):
        if pre_step():
            if before_update is not None:
                before_update()
            opt.original_optimizer.step()
        return
    if before_update is not None:
        before_update()
    opt.step()


@contextmanager
def frozen(nets: Iterable[nn.Module]) -> Iterator[None]:
    """Networks that a phase does not update: no gradients, and no per-sample gradient hooks
    (under DP they would cost about 2x and spend nothing)."""
    nets = list(nets)
    for net in nets:
        hooks = getattr(net, "disable_hooks", None)
        if hooks is not None:
            hooks()
        net.requires_grad_(False)
    try:
        yield
    finally:
        for net in nets:
            net.requires_grad_(True)
            hooks = getattr(net, "enable_hooks", None)
            if hooks is not None:
                hooks()


def phase_step(
    objective: Objective,
    phase: Phase,
    nets: Nets,
    optimizers: Mapping[str, Optimizer],
    batch: Batch,
    ctx: StepContext,
    proximal: ProximalTerm | None = None,
) -> torch.Tensor:
    """One update of ``phase``'s networks on ``batch``; returns the detached loss. Gradients
    are cleared before and after, so nothing carries over into another phase."""
    opts = [optimizers[name] for name in phase.networks]
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    with frozen(net for name, net in nets.items() if name not in phase.networks):
        loss = objective.accumulate_gradients(phase.name, nets, batch, ctx)
    for name in phase.networks:
        pull = None
        if proximal is not None:

            def pull(n=name):
                return (proximal.add_gradient(n, nets[n]))  # fmt: skip

        _optimizer_step(optimizers[name], pull)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    return loss


def _plan(
    objective: Objective, steps: int, schedule: CriticSchedule | None
) -> Iterator[list[tuple[Phase, int]]]:
    """Each iteration's phases and how many times each runs: every phase its ``repeats``
    for ``steps`` iterations, or under a critic schedule blocks of n_D discriminator steps,
    each followed by one generator step, until the round's discriminator steps are taken."""
    if schedule is None:
        for _ in range(steps):
            yield [(p, p.repeats) for p in objective.phases]
        return
    d_phase, g_phase = objective.phases
    for block in iterations(objective.private_steps(steps), schedule):
        yield [(d_phase, block), (g_phase, 1)]


def train(
    objective: Objective,
    nets: Nets,
    optimizers: Mapping[str, Optimizer],
    real_batches: RealBatches,
    *,
    steps: int,
    ctx: StepContext,
    proximal: ProximalTerm | None = None,
    private: Mapping[str, Any] | None = None,
    schedule: CriticSchedule | None = None,
) -> LocalStats:
    """Runs ``steps`` iterations of ``objective``.

    Args:
        objective: The task.
        nets: Its networks, on ``ctx.device`` (private wrappers where DP-SGD applies).
        optimizers: One per network (state kept by the caller across calls).
        real_batches: Where real images come from (shuffled, or Poisson-sampled under DP).
        steps: Iterations (with ``schedule``: what fixes the round's discriminator steps,
            :meth:`Objective.private_steps`).
        ctx: Device, seeded generators, and the default backward.
        proximal: FedProx's term, if any.
        private: Under DP-SGD, the backward of each private phase by phase name; every
            data-reading phase step then takes its own batch.
        schedule: A critic schedule (its state carries over from earlier rounds): before
            each generator step it sees the discriminator's accuracy on generated images.

    Returns:
        Loss means, examples seen, steps and wall time.
    """
    start = time.perf_counter()
    for net in nets.values():
        net.train()
    contexts = {
        p.name: replace(ctx, backward=private[p.name]) if private and p.name in private else ctx
        for p in objective.phases
    }
    share = objective.share_batch and not private
    totals = {p.name: torch.zeros((), device=ctx.device) for p in objective.phases}
    counts = dict.fromkeys(totals, 0)
    examples = 0
    iterations_run = 0
    for iteration in _plan(objective, steps, schedule):
        iterations_run += 1
        batch: Batch | None = None
        for phase, repeats in iteration:
            if schedule is not None and not phase.reads_data:
                for net in nets.values():
                    net.eval()
                schedule.observe(objective.critic_accuracy(nets, ctx))
                for net in nets.values():
                    net.train()
            for _ in range(repeats):
                if phase.reads_data and (batch is None or not share):
                    real, labels, other = next(real_batches)
                    batch = objective.make_batch(real, labels, other, ctx)
                    examples += len(real)
                step_batch = (
                    cast(Batch, batch)  # a data-reading phase has just drawn or shared one
                    if phase.reads_data
                    else objective.free_batch(phase.name, batch, ctx)
                )
                loss = phase_step(objective, phase, nets, optimizers, step_batch,
                                  contexts[phase.name], proximal)  # fmt: skip
                totals[phase.name] += loss
                counts[phase.name] += 1
    means = {k: float(v) / max(counts[k], 1) for k, v in totals.items()}
    return LocalStats(
        steps=iterations_run,
        examples=examples,
        d_loss=means.get("D", float("nan")),
        g_loss=means.get("G", float("nan")),
        seconds=time.perf_counter() - start,
        d_steps=counts.get("D", 0),
        critic=schedule.state() if schedule is not None else {},
    )
