"""The centralized baseline: the same objective and loop on the pooled data, with the same
number of training examples per round as the federation sees."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import TensorDataset

from fedgan.config import Config
from fedgan.data import pooled_dataset
from fedgan.device import resolve_device
from fedgan.models import load_state, pack_state
from fedgan.runs.recorder import RunRecorder
from fedgan.runs.records import RoundRecord
from fedgan.training import (
    StepContext,
    make_optimizers,
    networks_for,
    round_seed,
    set_round_lr,
    shuffled_batches,
    train,
)
from fedgan.training.embedding import set_embedding_target
from fedgan.training.hospital import restore_optimizers, serialize_optimizers

#: Where a pooled run's checkpoint keeps its optimizers' (and critic schedule's) state, so that
#: a resumed run goes on as the uninterrupted one would.
OPTIMIZERS_KEY = "optimizers"


def steps_per_round(cfg: Config) -> int:
    """Iterations of one centralized round: what every sampled hospital runs in a federated
    round, added up (same batch size, so the same examples seen)."""
    return cfg.train.local_steps * cfg.federation.sampled


def train_centralized(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Trains on the union of every hospital's data and writes a run directory like a
    federated run's.

    Returns:
        The run's summary.
    """
    recorder = RunRecorder(cfg, "centralized", log=log)
    state = recorder.start()
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    dataset = pooled_dataset(cfg.data, cfg.run.seed, cfg.federation.num_hospitals)
    nets = networks_for(cfg, recorder.objective)
    load_state(nets, state)
    for net in nets.values():
        net.to(device)
    try:
        _train_rounds(cfg, recorder, nets, dataset, device)
    finally:  # a run that fails still keeps every round it trained
        recorder.flush()
    return recorder.finish()


def _train_rounds(
    cfg: Config,
    recorder: RunRecorder,
    nets: dict[str, torch.nn.Module],
    dataset: TensorDataset,
    device: torch.device,
) -> None:
    """The rounds still to train, each handed to ``recorder``."""
    objective = recorder.objective
    optimizers = make_optimizers(nets, cfg.train)
    steps = steps_per_round(cfg)
    schedule = objective.critic_schedule()  # the hospitals' critic schedule, if any
    kept = recorder.resumed_meta.get(OPTIMIZERS_KEY)
    if kept:  # a resumed run goes on with its Adam moments and critic schedule
        critic = restore_optimizers(optimizers, kept)
        if schedule is not None:
            schedule.restore(critic)
    set_embedding_target(objective, cfg, dataset, None, seed=cfg.run.seed)
    for round_ in range(recorder.start_round + 1, cfg.federation.num_rounds + 1):
        set_round_lr(optimizers, cfg.train, round_, cfg.federation.num_rounds)
        seed = round_seed(cfg.run.seed, round_)
        ctx = StepContext.seeded(seed, device)
        source = shuffled_batches(dataset, cfg.train.batch_size, ctx, seed=seed,
                                  unpaired=objective.unpaired)  # fmt: skip
        stats = train(objective, nets, optimizers, source, steps=steps, ctx=ctx,
                      schedule=schedule)  # fmt: skip
        record = RoundRecord.centralized(
            round_,
            num_examples=len(dataset),
            examples_seen=stats.examples,
            d_loss=stats.d_loss,
            g_loss=stats.g_loss,
            train_seconds=stats.seconds,
            generator_steps=stats.steps,
            d_steps=stats.d_steps,
            critic=stats.critic,
        )
        kept = serialize_optimizers(optimizers, schedule.state() if schedule else None)
        recorder.end_round(record, pack_state(nets), {OPTIMIZERS_KEY: kept})
