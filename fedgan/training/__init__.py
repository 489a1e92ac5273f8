"""Pure GAN step functions and the local training loop (no Flower imports)."""

from fedgan.training.loop import (
    LocalStats,
    batches,
    critic_steps,
    make_optimizers,
    resolve_device,
    train_local,
)
from fedgan.training.steps import d_step, g_step

__all__ = [
    "LocalStats",
    "batches",
    "critic_steps",
    "d_step",
    "g_step",
    "make_optimizers",
    "resolve_device",
    "train_local",
]
