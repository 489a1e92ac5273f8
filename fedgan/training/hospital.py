"""One hospital's round of local training, from received weights to weights to send back.

Flower-free: the ClientApp converts records to and from what this module takes and returns.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils.data import TensorDataset

from fedgan.config import Config
from fedgan.device import resolve_device
from fedgan.models import ImageShape, load_state, pack_state
from fedgan.privacy import HospitalAccountant
from fedgan.training.embedding import set_embedding_target
from fedgan.training.loop import (
    LocalStats,
    ProximalTerm,
    make_optimizers,
    round_seed,
    set_round_lr,
    shuffled_batches,
    train,
)
from fedgan.training.objectives import StepContext, make_objective, networks_for
from fedgan.training.private import privatize


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
    """What a hospital sends back (``state``, ``privacy``) and keeps (``optimizer_state``,
    ``accountant``).

    Attributes:
        privacy: Under DP-SGD, what the hospital has spent so far (epsilon, delta, sigma, q,
            steps, budget); empty otherwise.
        accountant: Under DP-SGD, the accountant's whole history as JSON.
    """

    state: dict[str, torch.Tensor]
    optimizer_state: bytes
    stats: LocalStats
    num_examples: int
    optimizer_steps: int = 0
    privacy: dict[str, float] = field(default_factory=dict)
    accountant: str = ""


#: Where the critic schedule's state sits among the kept optimizer states.
CRITIC_KEY = "critic_schedule"


def serialize_optimizers(
    optimizers: Mapping[str, torch.optim.Optimizer], critic: Mapping[str, Any] | None = None
) -> bytes:
    """The hospital's optimizer states (and its critic schedule's, if one runs) as bytes."""
    buf = io.BytesIO()
    saved: dict[str, Any] = {name: opt.state_dict() for name, opt in optimizers.items()}
    if critic:
        saved[CRITIC_KEY] = dict(critic)
    torch.save(saved, buf)
    return buf.getvalue()


def restore_optimizers(
    optimizers: Mapping[str, torch.optim.Optimizer], blob: bytes, skip: Collection[str] = ()
) -> dict[str, Any]:
    """Loads :func:`serialize_optimizers`' state into ``optimizers``, except those in ``skip``
    (which start fresh); returns the critic schedule's state (empty if none was kept)."""
    saved = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    for name, opt in optimizers.items():
        if name in saved and name not in skip:
            opt.load_state_dict(saved[name])
    return dict(saved.get(CRITIC_KEY, {}))


def serialize_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """A :func:`~fedgan.models.pack_state` dict as bytes (a hospital's kept weights)."""
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


def deserialize_state(blob: bytes) -> dict[str, torch.Tensor]:
    return dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """Steps an Adam-like optimizer has taken (0 before its first)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def local_round(
    cfg: Config,
    dataset: TensorDataset,
    global_state: Mapping[str, torch.Tensor],
    optimizer_state: bytes | None,
    *,
    round_: int,
    hospital: int,
    accountant: str | None = None,
    proximal_mu: float = 0.0,
    kept_state: Mapping[str, torch.Tensor] | None = None,
    reset_optimizers: bool = False,
) -> RoundResult:
    """Trains the global networks on one hospital's data for ``train.local_steps`` iterations.

    Args:
        cfg: The experiment config.
        dataset: This hospital's images in [-1, 1].
        global_state: The global networks (``generator.`` / ``discriminator.`` keys): all
            of them, or the round's shared keys when some weights stay at the hospitals.
        optimizer_state: This hospital's optimizer state from its previous round, if any.
        round_: The (absolute) round number; with ``hospital`` it seeds batches and noise.
        hospital: This hospital's index.
        accountant: Under DP-SGD, this hospital's accountant history (JSON) from earlier rounds.
        proximal_mu: FedProx's proximal weight (0: none), as the server's strategy sends it.
        kept_state: The weights this hospital trained last round (all of them); it trains
            from them wherever ``global_state`` has no key (a local discriminator, FedBN's
            normalisation layers). Keys in neither start from the model's seeded initial
            weights, as they do at every hospital.
        reset_optimizers: A network that received any weights from ``global_state`` starts
            with fresh optimizer state (``federation.optimizer_state: reset``).

    Raises:
        ValueError: If the data's image shape does not match the model config, or a network
            that reads data cannot be privatized.
        BudgetExhausted: Under DP-SGD, if this round would take the hospital past its budget
            (nothing is trained, nothing is spent).
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
    objective = make_objective(cfg)
    nets = networks_for(cfg, objective)
    start = dict(global_state)
    own_keys = {f"{name}.{key}" for name, net in nets.items() for key in net.state_dict()}
    if set(start) != own_keys:  # some weights stay here: start from them
        start = {**pack_state(nets), **(kept_state or {}), **start}
    load_state(nets, start)
    for net in nets.values():
        net.to(device)
    optimizers = make_optimizers(nets, cfg.train)
    schedule = objective.critic_schedule()
    if optimizer_state:
        received = {key.split(".", 1)[0] for key in global_state}
        kept_critic = restore_optimizers(
            optimizers, optimizer_state, skip=received if reset_optimizers else ()
        )
        if schedule is not None:
            schedule.restore(kept_critic)
    set_round_lr(optimizers, cfg.train, round_, cfg.federation.num_rounds)
    seed = round_seed(cfg.run.seed, round_, hospital)
    ctx = StepContext.seeded(seed, device)
    proximal = ProximalTerm(proximal_mu, nets) if proximal_mu > 0 else None
    steps = cfg.train.local_steps
    if cfg.privacy.mode != "dp-sgd":
        set_embedding_target(objective, cfg, dataset, None, seed=seed)
        stats = train(
            objective, nets, optimizers,
            shuffled_batches(dataset, cfg.train.batch_size, ctx, seed=seed,
                             unpaired=objective.unpaired),
            steps=steps, ctx=ctx, proximal=proximal, schedule=schedule,
        )  # fmt: skip
        return RoundResult(
            state=pack_state(nets),
            optimizer_state=serialize_optimizers(optimizers, stats.critic),
            stats=stats,
            num_examples=len(dataset),
            optimizer_steps=optimizer_steps(optimizers["discriminator"]),
        )

    # DP-SGD: only the real-batch source and the private phases' networks change.
    private_steps = objective.private_steps(steps)  # charged this round
    acc = (
        HospitalAccountant.from_json(accountant)
        if accountant
        else HospitalAccountant(cfg.privacy.accountant)
    )
    # the embedding's one release (first round) comes before the plan, which composes it
    set_embedding_target(objective, cfg, dataset, acc, seed=seed)
    plan = acc.plan(
        cfg.privacy,
        num_examples=len(dataset),
        batch_size=cfg.train.batch_size,
        planned_steps=cfg.federation.num_rounds * private_steps,
    )
    acc.check_budget(plan, private_steps)  # refuses before anything is spent
    private = privatize(objective, nets, optimizers, dataset, plan, acc, cfg.privacy,
                        batch_size=cfg.train.batch_size, seed=seed, device=device)  # fmt: skip
    ctx.paired_forward = private.paired_forward
    stats = train(objective, private.nets, private.optimizers, private.real_batches,
                  steps=steps, ctx=ctx, proximal=proximal, private=private.backends,
                  schedule=schedule)  # fmt: skip
    # The discriminator's loss on real images is not covered by the accounting: it stays
    # here. Its accuracy on generated images (the schedule's) is post-processing: it travels.
    stats = replace(stats, d_loss=float("nan"))
    before = acc.steps
    acc.history = private.history()
    if acc.steps != before + private_steps:
        raise RuntimeError(
            f"accountant counted {acc.steps - before} DP steps, expected {private_steps}"
        )
    state = pack_state(nets)
    private.close()  # removes per-sample hooks
    return RoundResult(
        state=state,
        optimizer_state=serialize_optimizers(private.plain_optimizers, stats.critic),
        stats=stats,
        num_examples=len(dataset),
        optimizer_steps=optimizer_steps(private.plain_optimizers["discriminator"]),
        privacy={
            "epsilon": acc.epsilon(plan.delta),
            "delta": plan.delta,
            "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate,
            "dp_steps": acc.steps,
            "budget": plan.budget,
            "max_grad_norm": plan.max_grad_norm,
            "release_noise": sum(sigma for sigma, _ in acc.releases.values()),
        },
        accountant=acc.to_json(),
    )
