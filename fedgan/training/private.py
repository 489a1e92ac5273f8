"""DP-SGD for one hospital round of any objective: what the loop swaps in.

Two routes, chosen by the objective's structure, never by its name:

- one private phase that updates only the ``discriminator`` (synthesis with any DP-ready
  family): Opacus on the discriminator (:func:`fedgan.privacy.make_private_discriminator`,
  paired ghost clipping by default);
- anything else (the image-to-image tasks, whose generators read real images too): every
  data-reading phase through :class:`fedgan.privacy.per_sample.GaussianMechanism`.

Either way the hospital's one accountant continues across rounds, each private phase step
takes its own Poisson-sampled batch and is charged once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, TensorDataset

from fedgan.config import PrivacySection
from fedgan.privacy import HospitalAccountant, PrivacyPlan, make_private_discriminator
from fedgan.privacy.engine import check_discriminator, require_secure_rng
from fedgan.privacy.per_sample import GaussianMechanism, check_rowwise
from fedgan.training.loop import RealBatches
from fedgan.training.objectives.base import Batch, LossFn, Nets, Objective, StepContext


def _clipped(module: Any, max_rows: int = 0) -> Callable[[LossFn, Nets, Batch], torch.Tensor]:
    """The backward of paired ghost clipping; with ``max_rows``, a logical batch larger than
    that runs as physical batches of ``max_rows`` pairs whose clipped sums add up in ``.grad``
    (each pair is clipped on its own, so the step is the same; only memory is bounded)."""

    def backward(loss_fn: LossFn, nets: Nets, batch: Batch) -> torch.Tensor:
        if not max_rows or len(batch) <= max_rows:
            loss = loss_fn(nets, batch)
            module.clipped_backward(loss, len(batch))
            return loss.detach()
        total = torch.zeros(())
        for part in batch.split(max_rows):
            loss = loss_fn(nets, part)
            module.clipped_backward(loss, len(part))
            total = total + loss.detach().cpu() * len(part)
        return total / len(batch)

    return backward


def step_context(
    discriminator: nn.Module | None, device: torch.device, noise: torch.Generator | None
) -> StepContext:
    """The context of a synthesis step: a discriminator under paired ghost clipping brings its
    own backward and sees real and fake images in one forward."""
    clipped = getattr(discriminator, "clipped_backward", None)
    if clipped is None:
        return StepContext(device=device, noise=noise, cpu=torch.Generator())
    return StepContext(device=device, noise=noise, cpu=torch.Generator(),
                       backward=_clipped(discriminator), paired_forward=True)  # fmt: skip


@dataclass
class PrivateRound:
    """What DP-SGD swaps into one round.

    Attributes:
        nets: The networks to train (private wrappers where needed).
        optimizers: Their optimizers (Opacus's DP optimizer on the Opacus route).
        real_batches: Poisson-sampled real batches.
        backends: The backward of each private phase.
        paired_forward: The discriminator sees real and fake in one forward (ghost clipping).
        history: The accountant's history after training.
        close: Removes per-sample hooks (the networks are plain modules again).
        plain_optimizers: The optimizers whose state the hospital keeps.
    """

    nets: dict[str, Any]
    optimizers: dict[str, Optimizer]
    real_batches: RealBatches
    backends: dict[str, Callable[[LossFn, Nets, Batch], torch.Tensor]]
    paired_forward: bool
    history: Callable[[], list[tuple[float, float, int]]]
    close: Callable[[], None] = lambda: None
    plain_optimizers: dict[str, Optimizer] = field(default_factory=dict)


def _poisson(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, sample_rate: float,
    generator: torch.Generator | None, device: torch.device,
) -> RealBatches:  # fmt: skip
    from opacus.data_loader import DPDataLoader

    loader = DPDataLoader.from_data_loader(
        DataLoader(TensorDataset(images.cpu(), labels.cpu()), batch_size=batch_size),
        generator=generator,
    )
    if abs(loader.sample_rate - sample_rate) > 1e-12:
        raise RuntimeError(f"sampling rate mismatch: loader {loader.sample_rate} vs {sample_rate}")
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), None


def privatize(
    objective: Objective,
    nets: Mapping[str, nn.Module],
    optimizers: Mapping[str, Optimizer],
    dataset: TensorDataset,
    plan: PrivacyPlan,
    accountant: HospitalAccountant,
    cfg: PrivacySection,
    *,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> PrivateRound:
    """Makes one round of ``objective`` differentially private at sample level.

    Raises:
        ValueError: If a network that reads data cannot be privatized (e.g. BatchNorm).
    """
    objective.check_private()
    private_phases = [p for p in objective.phases if p.reads_data]
    if [p.networks for p in private_phases] == [("discriminator",)]:
        check_discriminator(nets["discriminator"])
        private = make_private_discriminator(
            nets["discriminator"],
            optimizers["discriminator"],
            dataset.tensors[0],
            dataset.tensors[1],
            plan,
            accountant,
            batch_size=batch_size,
            secure_mode=cfg.secure_mode,
            seed=seed,
            device=device,
            grad_sample_mode=cfg.grad_sample_mode,
        )
        paired = getattr(private.module, "clipped_backward", None) is not None
        name = private_phases[0].name
        return PrivateRound(
            nets={**nets, "discriminator": private.module},
            optimizers={**optimizers, "discriminator": private.optimizer},
            real_batches=((x, y, None) for x, y in private.batches),
            backends={name: _clipped(private.module, cfg.max_physical_batch)} if paired else {},
            paired_forward=paired,
            history=private.history,
            close=private.close,
            plain_optimizers={
                **optimizers,
                "discriminator": private.optimizer.original_optimizer,
            },
        )
    for phase in private_phases:
        for name in phase.networks:
            check_rowwise(nets[name], name)
    from opacus.accountants import create_accountant

    acc = create_accountant(plan.accountant)
    acc.history = list(accountant.history)
    if cfg.secure_mode:
        require_secure_rng()
        import torchcsprng  # type: ignore[import-not-found]

        sampling = noise = torchcsprng.create_random_device_generator("/dev/urandom")
    else:
        sampling = torch.Generator().manual_seed(seed)
        noise = torch.Generator(device=device).manual_seed(seed + 1)
    n = len(dataset)
    mechanism = GaussianMechanism(
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=max(1, int(n * plan.sample_rate)),
        sample_rate=plan.sample_rate,
        accountant=acc,
        generator=noise,
    )
    return PrivateRound(
        nets=dict(nets),
        optimizers=dict(optimizers),
        real_batches=_poisson(
            dataset.tensors[0], dataset.tensors[1], batch_size, plan.sample_rate, sampling, device
        ),
        backends={p.name: mechanism.backward(p.networks) for p in private_phases},
        paired_forward=False,
        history=lambda: [tuple(h) for h in acc.history],  # type: ignore[misc]
        plain_optimizers=dict(optimizers),
    )


__all__ = ["PrivateRound", "privatize", "step_context"]
