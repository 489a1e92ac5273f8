"""GAN families by name (one module each, imported when its name is first used; see
``fedgan.catalog``); networks travel as one state dict with per-network key prefixes."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedgan.models.base import FAMILIES, GanFamily, ImageShape, build_networks

__all__ = [
    "FAMILIES",
    "GanFamily",
    "ImageShape",
    "build_networks",
    "load_state",
    "pack_state",
]


def pack_state(nets: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """One flat state dict for several networks: ``{"generator.net.0.weight": ..., ...}``.

    Tensors are detached CPU copies, so later training never changes what was packed.
    """
    return {
        f"{name}.{key}": value.detach().cpu().clone()
        for name, net in nets.items()
        for key, value in net.state_dict().items()
    }


def load_state(nets: Mapping[str, nn.Module], state: Mapping[str, torch.Tensor]) -> None:
    """Loads a :func:`pack_state` dict back into ``nets`` (strictly: every key must match).

    Values are cast to each parameter's dtype, since aggregation may return float64 counters.

    Raises:
        ValueError: If keys are missing or unexpected (e.g. a checkpoint of another model).
    """
    for name, net in nets.items():
        prefix = f"{name}."
        own = net.state_dict()
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = set(own) - set(sub), set(sub) - set(own)
        if missing or unexpected:
            raise ValueError(
                f"weights do not fit the {name}: missing {sorted(missing)[:3]}, unexpected "
                f"{sorted(unexpected)[:3]}; was the checkpoint made with another model config?"
            )
        wrong = [k for k, v in sub.items() if tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            k = wrong[0]
            raise ValueError(
                f"weights do not fit the {name}: {k} has shape {tuple(sub[k].shape)}, the model "
                f"expects {tuple(own[k].shape)}; was the checkpoint made with another model config?"
            )
        net.load_state_dict(
            {k: torch.as_tensor(v).to(dtype=own[k].dtype) for k, v in sub.items()}, strict=True
        )
    known = {n + "." for n in nets}
    stray = [k for k in state if not any(k.startswith(p) for p in known)]
    if stray:
        raise ValueError(f"weights hold networks this model lacks: {stray[:3]}")
