"""The centralized baseline: the same model and loop on the pooled data, with the same number
of training examples per round as the federation sees."""

from __future__ import annotations

import math
from collections.abc import Callable

from fedgan.config import Config
from fedgan.data import pooled_dataset
from fedgan.models import load_state, pack_state
from fedgan.training.loop import make_optimizers, resolve_device, round_seed
from fedgan.training.recorder import RunRecorder
from fedgan.training.tasks import networks_for, train_steps


def steps_per_round(cfg: Config) -> int:
    """GAN iterations of one centralized round: what every sampled hospital runs in a
    federated round, added up (same batch size, so the same examples seen)."""
    fed = cfg.federation
    hospitals = fed.min_hospitals or max(1, math.ceil(fed.fraction_train * fed.num_hospitals))
    return cfg.train.local_steps * hospitals


def train_centralized(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Trains on the union of every hospital's data and writes a run directory like a
    federated run's.

    Returns:
        The run's summary.
    """
    recorder = RunRecorder(cfg, "centralized", log=log)
    state = recorder.start()
    if cfg.train.num_threads > 0:
        import torch

        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    dataset = pooled_dataset(cfg.data, cfg.run.seed, cfg.federation.num_hospitals)
    nets = networks_for(cfg)
    load_state(nets, state)
    for net in nets.values():
        net.to(device)
    optimizers = make_optimizers(nets, cfg.train)
    steps = steps_per_round(cfg)
    for round_ in range(recorder.start_round + 1, cfg.federation.num_rounds + 1):
        stats = train_steps(
            cfg,
            nets,
            optimizers,
            dataset,
            steps=steps,
            seed=round_seed(cfg.run.seed, round_),
            device=device,
        )
        record = {
            "hospitals": {},
            "aggregate": {
                "hospitals": 0,
                "num_examples": len(dataset),
                "examples_seen": stats.examples,
                "d_loss": stats.d_loss,
                "g_loss": stats.g_loss,
                "train_seconds": stats.seconds,
            },
            "bytes_down": 0,
            "bytes_up": 0,
        }
        recorder.end_round(round_, pack_state(nets), record)
    return recorder.finish()
