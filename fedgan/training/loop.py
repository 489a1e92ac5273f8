"""The local training loop shared by every hospital and by the centralized baseline."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim import Adam, Optimizer
from torch.utils.data import TensorDataset

from fedgan.models.base import GanFamily
from fedgan.training.steps import d_step, g_step

if TYPE_CHECKING:
    from fedgan.config import TrainSection


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given.

    Raises:
        ValueError: If CUDA is asked for on a machine without it.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but CUDA is not available; use auto or cpu")
    return device


def make_optimizers(nets: Mapping[str, nn.Module], cfg: TrainSection) -> dict[str, Optimizer]:
    """Adam for each network with the configured (TTUR-capable) learning rates."""
    # Image-to-image tasks have more networks ("generator_ba", "discriminator_a"): the
    # prefix picks the learning rate.
    return {
        name: Adam(
            net.parameters(),
            lr=cfg.lr_g if name.startswith("generator") else cfg.lr_d,
            betas=(cfg.beta1, cfg.beta2),
        )
        for name, net in nets.items()
    }


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


def round_seed(seed: int, round_: int, hospital: int = 0) -> int:
    """The seed of one hospital's (or the pooled baseline's) training in one round."""
    return seed * 1_000_003 + round_ * 1009 + hospital


def critic_steps(family: GanFamily, cfg: TrainSection) -> int:
    """Discriminator steps per generator step: ``train.n_critic``, or the family's default."""
    return cfg.n_critic or family.n_critic


@dataclass(frozen=True)
class LocalStats:
    """What one stretch of local training reports.

    Attributes:
        steps: GAN iterations run.
        examples: Real images the discriminator saw (``n_critic`` batches per iteration).
        d_loss: Mean discriminator loss.
        g_loss: Mean generator loss.
        seconds: Wall time of the loop.
    """

    steps: int
    examples: int
    d_loss: float
    g_loss: float
    seconds: float


def train_local(
    family: GanFamily,
    nets: Mapping[str, nn.Module],
    optimizers: Mapping[str, Optimizer],
    dataset: TensorDataset,
    cfg: TrainSection,
    *,
    steps: int,
    seed: int,
    device: torch.device,
    real_batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> LocalStats:
    """Runs ``steps`` GAN iterations (``n_critic`` D steps and one G step each) on ``dataset``.

    Args:
        family: Losses of the GAN family.
        nets: ``{"generator": G, "discriminator": D}``, already on ``device``.
        optimizers: One optimizer per network (state kept by the caller across calls).
        dataset: Images in [-1, 1] (first tensor of the data set).
        cfg: Batch size and the rest of the training settings.
        steps: Number of iterations.
        seed: Seeds batch order and noise.
        device: Where to train.
        real_batches: Where ``(images, labels)`` batches come from (e.g. Poisson sampling
            under DP-SGD); shuffled fixed-size batches of ``dataset`` by default.
        augment: Applied to every real batch (``fedgan.data.transforms.augmenter``), seeded.

    Returns:
        Loss means, examples seen and wall time.
    """
    start = time.perf_counter()
    generator, discriminator = nets["generator"], nets["discriminator"]
    generator.train()
    discriminator.train()
    cpu_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    latent: int = generator.latent_dim  # type: ignore[assignment]
    num_classes = int(getattr(generator, "num_classes", 0))
    if real_batches is None:
        x_all, y_all = dataset.tensors[0], dataset.tensors[1]
        real_batches = batches(x_all.to(device), y_all.to(device), cfg.batch_size, cpu_gen)
    n_critic = critic_steps(family, cfg)
    d_total = torch.zeros((), device=device)
    g_total = torch.zeros((), device=device)
    examples = 0
    for _ in range(steps):
        for _ in range(n_critic):
            real, labels = next(real_batches)
            if augment is not None and len(real):
                real = augment(real, cpu_gen)
            y = check_labels(labels, num_classes) if family.conditional else None
            z = torch.randn(len(real), latent, device=device, generator=noise_gen)
            d_total += d_step(
                family,
                generator,
                discriminator,
                optimizers["discriminator"],
                real,
                z,
                y,
                gp_weight=cfg.gp_weight,
                noise=noise_gen,
            )
            examples += len(real)
        size = cfg.batch_size
        z = torch.randn(size, latent, device=device, generator=noise_gen)
        y = (
            torch.randint(0, num_classes, (size,), device=device, generator=noise_gen)
            if family.conditional
            else None
        )
        g_total += g_step(family, generator, discriminator, optimizers["generator"], z, y)
    return LocalStats(
        steps=steps,
        examples=examples,
        d_loss=float(d_total) / max(steps * n_critic, 1),
        g_loss=float(g_total) / max(steps, 1),
        seconds=time.perf_counter() - start,
    )


def check_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels of a conditional family, checked against ``model.num_classes``.

    Raises:
        ValueError: If a label is outside ``0..num_classes-1``.
    """
    if len(labels) and (int(labels.max()) >= num_classes or int(labels.min()) < 0):
        raise ValueError(
            f"class label {int(labels.max())} is outside 0..{num_classes - 1}: set "
            "model.num_classes to the number of classes in the data"
        )
    return labels.long()
