"""Training objectives, one per task (``task.name``), each registering itself in
``fedgan.catalog.TASKS``: synthesis with any GAN family, enhance, super-resolution, translate.
A new task is one module here (an :class:`Objective` subclass) plus its line in the catalog."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fedgan.catalog import TASKS
from fedgan.training.objectives.base import (
    Batch,
    LossFn,
    Nets,
    Objective,
    Phase,
    StepContext,
    plain_backward,
)

if TYPE_CHECKING:
    from fedgan.config import Config

__all__ = [
    "TASKS",
    "Batch",
    "LossFn",
    "Nets",
    "Objective",
    "Phase",
    "StepContext",
    "make_objective",
    "networks_for",
    "plain_backward",
    "settle",
]


def make_objective(cfg: Config) -> Objective:
    """The registered objective of ``cfg.task.name``, bound to ``cfg``."""
    return TASKS.get(cfg.task.name)(cfg)  # type: ignore[no-any-return]


def networks_for(cfg: Config, objective: Objective | None = None) -> dict[str, nn.Module]:
    """Every network of the configured task, initialized from ``run.seed``."""
    objective = objective or make_objective(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        return objective.build()


def settle(cfg: Config, objective: Objective | None = None) -> Config:
    """``cfg`` with the settings it left to a default rule (``-1``, ``0``, ``auto``) set to
    what the rule gives (:meth:`Objective.settled`): the config a run records, and the one
    a resumed or reused run is compared on. Settling a settled config changes nothing."""
    from fedgan.config import with_changes

    sections: dict[str, dict[str, object]] = {}
    for key, value in (objective or make_objective(cfg)).settled().items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return with_changes(cfg, **sections)
