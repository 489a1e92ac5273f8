"""The one training abstraction: an objective builds a task's networks, makes its batches and
accumulates the gradients of one phase; the loop (``fedgan.training.loop``) does the rest.

Modelled on StyleGAN2-ADA's ``training/loss.py``: the loop calls only
:meth:`Objective.accumulate_gradients`, and how a loss becomes gradients is the context's
business (:class:`StepContext.backward`): a plain backward, paired ghost clipping, or per-sample
clipping with noise under DP-SGD. An objective therefore never knows whether it is private.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from fedgan.config import Config
    from fedgan.training.schedule import CriticSchedule

Nets = Mapping[str, Any]  # name -> network (or its functional stand-in under per-sample DP)
LossFn = Callable[[Nets, "Batch"], torch.Tensor]


@dataclass
class Batch:
    """One batch of a task: tensors sharing their first dimension, one row per privacy unit
    (a real image and everything made from it).

    Attributes:
        tensors: The rows, by name (``real``, ``labels``, ``z``, ``inputs``, ``targets``...).
        cache: What one phase leaves for the next on the same batch (e.g. generated images);
            never read across batches.
    """

    tensors: dict[str, torch.Tensor]
    cache: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def get(self, key: str) -> torch.Tensor | None:
        return self.tensors.get(key)

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values()))) if self.tensors else 0

    def split(self, size: int) -> list[Batch]:
        """The rows in consecutive batches of at most ``size`` (no cache: each is new)."""
        return [
            Batch({k: v[start : start + size] for k, v in self.tensors.items()})
            for start in range(0, len(self), size)
        ]


@dataclass(frozen=True)
class Phase:
    """One kind of update in an iteration.

    Attributes:
        name: ``"D"`` or ``"G"`` (what :meth:`Objective.accumulate_gradients` is called with).
        networks: The networks this phase updates; the others are frozen while it runs.
        reads_data: Its loss reads real images (so under DP-SGD it must be private, and it
            takes a real batch).
        repeats: How many times it runs per iteration (e.g. critic steps).
    """

    name: str
    networks: tuple[str, ...]
    reads_data: bool
    repeats: int = 1


def plain_backward(loss_fn: LossFn, nets: Nets, batch: Batch) -> torch.Tensor:
    """The loss's gradients by one ordinary backward; returns the detached loss."""
    loss = loss_fn(nets, batch)
    loss.backward()
    return loss.detach()


@dataclass
class StepContext:
    """What a phase step needs besides networks and a batch.

    Attributes:
        device: Where training runs.
        noise: Seeded generator (on ``device``) for latent codes and penalties.
        cpu: Seeded CPU generator for augmentation and degradations.
        backward: Turns a loss function into accumulated gradients (swapped under DP-SGD) and
            returns the detached loss.
        paired_forward: The discriminator must see ``cat([real, fake])`` in one forward, rows
            ``i`` and ``n + i`` forming privacy unit ``i`` (paired ghost clipping).
    """

    device: torch.device
    noise: torch.Generator | None
    cpu: torch.Generator
    backward: Callable[[LossFn, Nets, Batch], torch.Tensor] = plain_backward
    paired_forward: bool = False

    @classmethod
    def seeded(cls, seed: int, device: torch.device, **kwargs: Any) -> StepContext:
        """The context of one stretch of training seeded by ``seed`` (batch order and
        augmentation from ``seed``, noise from ``seed + 1``)."""
        return cls(
            device=device,
            noise=torch.Generator(device=device).manual_seed(seed + 1),
            cpu=torch.Generator().manual_seed(seed),
            **kwargs,
        )


class Objective:
    """What a task trains and how. Subclasses set ``phases`` and implement the methods.

    Attributes:
        phases: The iteration, in order.
        share_batch: Without DP, one real batch serves every phase of an iteration (the
            generator learns from the very images the discriminator judged); else each
            data-reading phase step takes a fresh batch.
        paired: An image-to-image task (evaluated on held-out pairs with baselines).
        unpaired: Its batches join two independent real batches (``make_batch``'s ``other``).
        detects: An anomaly detector (evaluated on images with and without lesions).
    """

    phases: tuple[Phase, ...] = ()
    share_batch: bool = False
    paired: bool = False
    unpaired: bool = False
    detects: bool = False

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.cfg.task.name

    def settled(self) -> dict[str, Any]:
        """The values this objective's default rules gave the settings the config left to
        them (``-1``, ``0``, ``auto``), as ``{"section.key": value}``: what a run records in
        its ``config.yaml``, so that a rule changed by a later fedgan cannot make a resumed or
        reused run train on other settings than the ones it names."""
        return {}

    def build(self) -> dict[str, nn.Module]:
        """The task's networks, freshly initialized (seeding is the caller's)."""
        raise NotImplementedError

    def make_batch(
        self, real: torch.Tensor, labels: torch.Tensor, other: torch.Tensor | None,
        ctx: StepContext,
    ) -> Batch:  # fmt: skip
        """The task's batch from real images (``other``: an independent second batch for
        unpaired tasks; ``None`` under DP-SGD, where every row must come from one image)."""
        raise NotImplementedError

    def accumulate_gradients(
        self, phase: str, nets: Nets, batch: Batch, ctx: StepContext
    ) -> torch.Tensor:
        """Accumulates the gradients of ``phase`` through ``ctx.backward`` and returns the
        loss to report (detached)."""
        raise NotImplementedError

    def check_private(self) -> None:
        """Raises ``ValueError`` if DP-SGD cannot train this objective (nothing by default)."""

    def free_batch(self, phase: str, batch: Batch | None, ctx: StepContext) -> Batch:
        """The batch of a phase that reads no real image (by default the iteration's batch)."""
        return batch if batch is not None else Batch({})

    @property
    def private_steps_per_iteration(self) -> int:
        """Data-reading phase steps per iteration: what DP-SGD charges for."""
        return sum(p.repeats for p in self.phases if p.reads_data)

    def private_steps(self, steps: int) -> int:
        """Data-reading phase steps a round of ``steps`` iterations takes (what DP-SGD is
        calibrated and charged for)."""
        return steps * self.private_steps_per_iteration

    def critic_schedule(self) -> CriticSchedule | None:
        """The schedule of discriminator steps per generator step, for an objective whose
        phases are one data-reading discriminator phase then one generator phase; None: each
        iteration runs every phase ``repeats`` times."""
        return None

    def critic_accuracy(self, nets: Nets, ctx: StepContext) -> float:
        """The discriminator's accuracy on a fresh batch of generated images (what
        :meth:`critic_schedule` watches; it reads no real image)."""
        raise NotImplementedError

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


def bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def lsgan(out: torch.Tensor, target: float) -> torch.Tensor:
    return F.mse_loss(out, torch.full_like(out, target))
