"""The generator's moment-matching term: a random-feature mean embedding of a hospital's images
(DP-MERF, Harder et al. 2021, "DP-MERF: Differentially private mean embeddings with random
features for practical privacy-preserving data generation", AISTATS).

Random Fourier features ``phi(x) = sqrt(2/D) [cos(W x), sin(W x)]`` with ``W ~ N(0, 1/h^2)``
approximate a Gaussian kernel of bandwidth ``h`` on the pixels, and ``||phi(x)|| = 1`` for
every image. The squared distance between two sets' mean embeddings estimates their MMD, which
grows whenever the generator leaves a part of the data undrawn: the pull a private
discriminator's noisy gradient is too weak to give.

Under DP-SGD the hospital publishes the sum of its images' features once, with Gaussian noise
(adding or removing one image moves that sum by at most 1, so sigma is in units of that), and
its accountant charges the release (:meth:`fedgan.privacy.HospitalAccountant.release`). The
projection ``W`` is drawn from ``run.seed`` alone, so it reads no data. Dividing by the
hospital's image count is no further release: the count travels with every round's update
(FedAvg's weight).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from fedgan.privacy.engine import require_secure_rng

if TYPE_CHECKING:
    from torch.utils.data import TensorDataset

    from fedgan.config import Config
    from fedgan.privacy import HospitalAccountant

#: The release's name in the hospital's accountant.
RELEASE = "generator-embedding"

#: ``train.embedding_weight: -1`` under DP-SGD for an unconditional synthesis family:
#: ``DEFAULT_PRIVATE_WEIGHT * sqrt(10 / epsilon)``, at least ``FLOOR_WEIGHT`` at epsilon <= 10
#: and ``FLOOR_WEIGHT * sqrt(10 / epsilon)`` above, up to ``MAX_DEFAULT_WEIGHT``: 5 at epsilon
#: 10, 5.5 at 3, 9.5 at 1. The noisier the discriminator, the more the generator must lean on
#: the embedding (study 34: at epsilon 1, 10 drew chest films where 3 drew noise); at epsilon
#: 10, 5 kept more of the data's variety than 3 on five of six seeds and partitions (study 37),
#: where 10 let the FD drift on one seed of two (study 33).
DEFAULT_PRIVATE_WEIGHT = 3.0
FLOOR_WEIGHT = 5.0
MAX_DEFAULT_WEIGHT = 10.0

#: ``privacy.embedding_noise: 0`` means this over ``target_epsilon``.
AUTO_NOISE_TIMES_EPSILON = 20.0

#: Bandwidth rule when ``train.embedding_bandwidth`` is 0: ``0.15 * sqrt(pixels)``.
BANDWIDTH_PER_SQRT_PIXEL = 0.15


class RandomFeatures:
    """``phi`` for images of ``pixels`` values (channels x height x width).

    Args:
        pixels: Values per image.
        features: D, even (half cosines, half sines).
        bandwidth: The kernel's bandwidth ``h`` (0: ``0.15 * sqrt(pixels)``).
        seed: Draws ``W`` (public: the run's seed).
    """

    def __init__(self, pixels: int, features: int, bandwidth: float, seed: int) -> None:
        if features < 2 or features % 2:
            raise ValueError(f"features must be even and >= 2, got {features}")
        self.bandwidth = bandwidth or BANDWIDTH_PER_SQRT_PIXEL * math.sqrt(pixels)
        generator = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(pixels, features // 2, generator=generator) / self.bandwidth
        self.scale = math.sqrt(2.0 / features)

    @classmethod
    def for_config(cls, cfg: Config) -> RandomFeatures:
        t = cfg.train
        pixels = cfg.data.channels * cfg.data.image_size**2
        return cls(pixels, t.embedding_features, t.embedding_bandwidth, cfg.run.seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """One unit-norm feature row per image (on ``images``' device)."""
        proj = images.flatten(1) @ self.projection.to(images.device, images.dtype)
        return torch.cat([proj.cos(), proj.sin()], dim=1) * self.scale

    def total(self, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """The sum of ``images``' feature rows (in chunks: bounded memory)."""
        out = torch.zeros(self.projection.shape[1] * 2, dtype=torch.float64)
        for part in images.split(chunk):
            out += self(part.float()).sum(0).double().cpu()
        return out


def embedding_loss(
    features: RandomFeatures, fake: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """``||mean phi(fake) - target||^2``: differentiable in ``fake``."""
    return (features(fake).mean(0) - target.to(fake.device, fake.dtype)).pow(2).sum()


def embedding_weight(cfg: Config, conditional: bool) -> float:
    """``train.embedding_weight`` with its default rule applied. -1: under DP-SGD for task
    synthesis with an unconditional family, ``3 * sqrt(10 / epsilon)`` but at least 5 (5 *
    sqrt(10 / epsilon) above epsilon 10), up to 10: 5 at epsilon 10, 5.5 at 3, 9.5 at 1,
    3.5 at 20; 0 otherwise."""
    weight = cfg.train.embedding_weight
    if weight >= 0:
        return weight
    default = cfg.privacy.mode == "dp-sgd" and cfg.task.name == "synthesis" and not conditional
    if not default:
        return 0.0
    scale = math.sqrt(10.0 / cfg.privacy.target_epsilon)
    floor = FLOOR_WEIGHT * min(1.0, scale)
    return min(max(DEFAULT_PRIVATE_WEIGHT * scale, floor), MAX_DEFAULT_WEIGHT)


def embedding_noise(cfg: Config) -> float:
    """The release's sigma: ``privacy.embedding_noise``, or 0's rule ``20 / target_epsilon``
    (2 at epsilon 10, where it raises the DP-SGD sigma by about 1 %; 6.7 at 3)."""
    return cfg.privacy.embedding_noise or AUTO_NOISE_TIMES_EPSILON / cfg.privacy.target_epsilon


def informative(cfg: Config, num_examples: int) -> bool:
    """Whether a hospital of ``num_examples`` images can release an embedding worth its cost:
    the release's noise in the mean has expected norm ``sqrt(D) * sigma / n``, and a mean of
    unit vectors has norm at most 1, so above 1 the noise outweighs anything the data could
    say (PneumoniaMNIST under Dirichlet 0.5 at epsilon 10: 2.0 for its 44-image hospital,
    0.09 for a 942-image one). Such a hospital releases nothing and trains without the term."""
    return num_examples >= smallest_release(cfg)


def smallest_release(cfg: Config) -> int:
    """The fewest images a hospital needs to release its embedding (:func:`informative`):
    ``sqrt(D) * sigma``, rounded up (895 at epsilon 1 with the defaults, 90 at 10)."""
    return max(math.ceil(math.sqrt(cfg.train.embedding_features) * embedding_noise(cfg)), 1)


def hospital_target(
    cfg: Config,
    dataset: TensorDataset,
    accountant: HospitalAccountant | None,
    *,
    noise: torch.Generator | None,
) -> torch.Tensor | None:
    """The mean embedding the generator is pulled towards at this hospital (or in the pooled
    baseline): exact without DP-SGD; under it, the hospital's one noisy release, made on its
    first private round and recorded in ``accountant`` (later rounds reuse it), or None for a
    hospital too small for a release to say anything (:func:`informative`).

    Args:
        cfg: The experiment config.
        dataset: The hospital's images in [-1, 1].
        accountant: Under DP-SGD, the hospital's accountant (None otherwise).
        noise: The release's noise generator (a CSPRNG under ``privacy.secure_mode``).
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot embed an empty data set")
    if accountant is None:
        return (RandomFeatures.for_config(cfg).total(dataset.tensors[0]) / n).float()
    kept = accountant.released(RELEASE)
    if kept is None and not informative(cfg, n):
        return None
    if kept is None:
        total = RandomFeatures.for_config(cfg).total(dataset.tensors[0])
        sigma = embedding_noise(cfg)
        drawn = torch.randn(total.shape, generator=noise, dtype=torch.float64,
                            device=noise.device if noise is not None else "cpu")  # fmt: skip
        accountant.release(RELEASE, sigma, (total + sigma * drawn.cpu()).tolist())
        kept = accountant.released(RELEASE)
    assert kept is not None
    return torch.tensor(kept, dtype=torch.float32) / n


def set_embedding_target(
    objective: Any,
    cfg: Config,
    dataset: TensorDataset,
    accountant: HospitalAccountant | None,
    *,
    seed: int,
) -> None:
    """Gives a synthesis objective with ``train.embedding_weight`` its target: the data's
    mean embedding, released once with noise under DP-SGD (charged to ``accountant``)."""
    if getattr(objective, "embedding", None) is None:
        return
    noise: torch.Generator | None = None
    if accountant is not None:
        if cfg.privacy.secure_mode:
            require_secure_rng()
            import torchcsprng  # type: ignore[import-not-found]

            noise = torchcsprng.create_random_device_generator("/dev/urandom")
        else:
            noise = torch.Generator().manual_seed(seed + 2)
    target = hospital_target(cfg, dataset, accountant, noise=noise)
    if target is None:  # too few images: no release, no term at this hospital
        objective.embedding = None
    objective.embedding_target = target


__all__ = [
    "AUTO_NOISE_TIMES_EPSILON",
    "DEFAULT_PRIVATE_WEIGHT",
    "MAX_DEFAULT_WEIGHT",
    "RELEASE",
    "RandomFeatures",
    "embedding_loss",
    "embedding_noise",
    "embedding_weight",
    "hospital_target",
    "informative",
    "set_embedding_target",
    "smallest_release",
]
