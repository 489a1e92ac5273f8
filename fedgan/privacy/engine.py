"""Opacus on the discriminator: validation up front, then one facade that makes it private."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedgan.models.base import GanFamily
from fedgan.privacy.accounting import HospitalAccountant, PrivacyPlan

if TYPE_CHECKING:  # Opacus itself is imported on use (it takes seconds to import)
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer

# The first layer's input (images) never needs a gradient; Opacus's full backward hooks warn
# about that on every step although it is expected.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")


def require_secure_rng() -> None:
    """Raises ``ValueError`` with the fix when ``privacy.secure_mode`` cannot work here."""
    import importlib.util

    if importlib.util.find_spec("torchcsprng") is None:
        raise ValueError(
            "privacy.secure_mode needs the torchcsprng package (cryptographically secure noise), "
            "which is not installed: install a torchcsprng build matching your torch, or set "
            "privacy.secure_mode=false for experiments"
        )


def check_privatizable(family: GanFamily, discriminator: nn.Module) -> None:
    """Refuses, before any training, a discriminator that DP-SGD cannot privatize.

    Raises:
        ValueError: Naming the family or layers that are the problem and what to choose instead.
    """
    if family.dp_incompatibility:
        raise ValueError(
            f"model.family {family.name!r} cannot be trained with DP-SGD: "
            f"{family.dp_incompatibility}"
        )
    check_discriminator(discriminator)


def check_discriminator(discriminator: nn.Module) -> None:
    """Refuses layers Opacus cannot give per-sample gradients (BatchNorm, in-place
    activations).

    Raises:
        ValueError: Naming the layers and what to use instead.
    """
    from opacus.validators import ModuleValidator

    problems = [str(e).split(".")[0] for e in ModuleValidator.validate(discriminator, strict=False)]
    problems += [
        f"in-place activation at {name or 'top'} ({type(m).__name__}(inplace=True)) breaks "
        "per-sample gradient hooks"
        for name, m in discriminator.named_modules()
        if getattr(m, "inplace", False)
    ]
    if problems:
        raise ValueError(
            "the discriminator cannot be made differentially private: "
            + "; ".join(sorted(set(problems)))
            + ". Use GroupNorm/LayerNorm instead of BatchNorm and non-in-place activations."
        )


@dataclass
class PrivateDiscriminator:
    """The discriminator under DP-SGD for one round.

    Attributes:
        module: The discriminator wrapped for per-sample gradients (train with this one).
        optimizer: The DP optimizer (clipping, noise, accounting on every step).
        batches: Endless Poisson-sampled real ``(images, labels)`` on the training device.
        engine: The Opacus engine whose accountant holds the hospital's whole history.
    """

    module: nn.Module
    optimizer: DPOptimizer
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    engine: PrivacyEngine

    def history(self) -> list[tuple[float, float, int]]:
        return [tuple(h) for h in self.engine.accountant.history]  # type: ignore[misc]

    def close(self) -> None:
        """Removes the per-sample hooks from the discriminator (it is the plain module again)."""
        close = getattr(self.module, "close", None) or getattr(self.module, "_close", None)
        if close is not None:
            close()


def _cycle(loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def make_private_discriminator(
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    plan: PrivacyPlan,
    accountant: HospitalAccountant,
    *,
    batch_size: int,
    secure_mode: bool,
    seed: int,
    device: torch.device,
    grad_sample_mode: str = "ew",
) -> PrivateDiscriminator:
    """Wraps the discriminator, its optimizer and the real data for DP-SGD with Poisson
    sampling, continuing ``accountant``'s history (not a fresh one each round).

    Args:
        discriminator: The (validated) discriminator, on ``device``.
        optimizer: Its optimizer, with any state restored from earlier rounds.
        images: This hospital's real images (CPU).
        labels: Their labels (conditional families train on them).
        plan: sigma, q, clip norm.
        accountant: The hospital's history so far; Opacus's accountant continues it.
        batch_size: Expected batch size (q x n).
        secure_mode: Cryptographically secure noise and sampling.
        seed: Seeds sampling and noise when not in secure mode.
        device: Training device.
        grad_sample_mode: ``ghost`` (paired ghost clipping, :mod:`fedgan.privacy.ghost`: no
            per-sample gradients for the large layers), ``ew`` (ExpandedWeights) or ``hooks``
            (Opacus hooks, every layer type Opacus supports). All three give the same update.
    """
    if secure_mode:
        require_secure_rng()
    loader = DataLoader(
        TensorDataset(images.cpu(), labels.cpu()),
        batch_size=batch_size,
        generator=None if secure_mode else torch.Generator().manual_seed(seed),
    )
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=plan.accountant, secure_mode=secure_mode)
    engine.accountant.history = list(accountant.history)
    noise = None if secure_mode else torch.Generator(device=device).manual_seed(seed + 1)
    if grad_sample_mode == "ghost":
        module, dp_optimizer, dp_loader = _paired_ghost(discriminator, optimizer, loader, plan,
                                                        engine, noise)  # fmt: skip
    else:
        module, dp_optimizer, dp_loader = engine.make_private(
            module=discriminator,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise,
            grad_sample_mode=grad_sample_mode,
        )
    if abs(dp_loader.sample_rate - plan.sample_rate) > 1e-12:
        raise RuntimeError(
            f"sampling rate mismatch: loader {dp_loader.sample_rate} vs plan {plan.sample_rate}"
        )
    return PrivateDiscriminator(module, dp_optimizer, _cycle(dp_loader, device), engine)


def _paired_ghost(
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    plan: PrivacyPlan,
    engine: PrivacyEngine,
    noise: torch.Generator | None,
) -> tuple[nn.Module, DPOptimizer, DPDataLoader]:
    """What ``engine.make_private`` assembles, with :class:`PairedClipping` in place of an
    Opacus GradSampleModule: Opacus's Poisson loader, its optimizer for clipped-then-summed
    gradients (it adds the noise and scales) and the engine's accountant hook."""
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from fedgan.privacy.ghost import PairedClipping

    dp_loader = DPDataLoader.from_data_loader(loader, generator=engine.secure_rng)
    dp_optimizer = DPOptimizerFastGradientClipping(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=int(len(loader.dataset) * dp_loader.sample_rate),  # type: ignore[arg-type]
        loss_reduction="mean",
        generator=engine.secure_rng if engine.secure_mode else noise,
        secure_mode=engine.secure_mode,
    )
    dp_optimizer.attach_step_hook(
        engine.accountant.get_optimizer_hook_fn(sample_rate=dp_loader.sample_rate)
    )
    return PairedClipping(discriminator, plan.max_grad_norm), dp_optimizer, dp_loader
