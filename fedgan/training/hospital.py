"""One hospital's round of local training, from received weights to weights to send back.

Flower-free: the ClientApp converts records to and from what this module takes and returns.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from fedgan.config import Config
from fedgan.models import FAMILIES, ImageShape, build_networks, load_state, pack_state
from fedgan.training.loop import LocalStats, make_optimizers, resolve_device, train_local


def image_shape(dataset: TensorDataset) -> ImageShape:
    """The shape a model needs for ``dataset`` (channels, side), read from the data."""
    _, c, h, w = dataset.tensors[0].shape
    if h != w:
        raise ValueError(f"images must be square, got {h}x{w}")
    return ImageShape(int(c), int(h))


def config_shape(cfg: Config) -> ImageShape:
    return ImageShape(cfg.data.channels, cfg.data.image_size)


@dataclass(frozen=True)
class RoundResult:
    """What a hospital sends back (``state``) and keeps (``optimizer_state``)."""

    state: dict[str, torch.Tensor]
    optimizer_state: bytes
    stats: LocalStats
    num_examples: int


def serialize_optimizers(optimizers: Mapping[str, torch.optim.Optimizer]) -> bytes:
    buf = io.BytesIO()
    torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, buf)
    return buf.getvalue()


def restore_optimizers(optimizers: Mapping[str, torch.optim.Optimizer], blob: bytes) -> None:
    saved = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    for name, opt in optimizers.items():
        if name in saved:
            opt.load_state_dict(saved[name])


def local_round(
    cfg: Config,
    dataset: TensorDataset,
    global_state: Mapping[str, torch.Tensor],
    optimizer_state: bytes | None,
    *,
    round_: int,
    hospital: int,
) -> RoundResult:
    """Trains the global networks on one hospital's data for ``train.local_steps`` iterations.

    Args:
        cfg: The experiment config.
        dataset: This hospital's images in [-1, 1].
        global_state: The global networks (``generator.`` / ``discriminator.`` keys).
        optimizer_state: This hospital's optimizer state from its previous round, if any.
        round_: The (absolute) round number; with ``hospital`` it seeds batches and noise.
        hospital: This hospital's index.

    Raises:
        ValueError: If the data's image shape does not match the model config.
    """
    shape = image_shape(dataset)
    if shape != config_shape(cfg):
        raise ValueError(
            f"this hospital's images are {shape.channels}x{shape.size}x{shape.size} but the "
            f"model expects {cfg.data.channels}x{cfg.data.image_size}x{cfg.data.image_size}; "
            "set data.image_size / data.channels to match"
        )
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    nets = build_networks(cfg.model, shape, seed=cfg.run.seed)
    load_state(nets, global_state)
    for net in nets.values():
        net.to(device)
    optimizers = make_optimizers(nets, cfg.train)
    if optimizer_state:
        restore_optimizers(optimizers, optimizer_state)
    stats = train_local(
        FAMILIES.get(cfg.model.family),
        nets,
        optimizers,
        dataset,
        cfg.train,
        steps=cfg.train.local_steps,
        seed=cfg.run.seed * 1_000_003 + round_ * 1009 + hospital,
        device=device,
    )
    return RoundResult(
        state=pack_state(nets),
        optimizer_state=serialize_optimizers(optimizers),
        stats=stats,
        num_examples=len(dataset),
    )
