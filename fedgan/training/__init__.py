"""Training: one objective per task (``objectives/``), one local loop (``loop``), one hospital
round (``hospital``) and what DP-SGD swaps into it (``private``). No Flower, no run
bookkeeping, no evaluation."""

from fedgan.training.loop import (
    LocalStats,
    ProximalTerm,
    batches,
    make_optimizers,
    phase_step,
    round_lr_scale,
    round_seed,
    set_round_lr,
    shuffled_batches,
    train,
)
from fedgan.training.objectives import (
    Objective,
    StepContext,
    make_objective,
    networks_for,
    settle,
)
from fedgan.training.objectives.synthesis import d_step, g_step

__all__ = [
    "LocalStats",
    "Objective",
    "ProximalTerm",
    "StepContext",
    "batches",
    "d_step",
    "g_step",
    "make_objective",
    "make_optimizers",
    "networks_for",
    "phase_step",
    "round_lr_scale",
    "round_seed",
    "set_round_lr",
    "settle",
    "shuffled_batches",
    "train",
]
