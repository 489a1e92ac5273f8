"""GAN families by name (one module each, imported when its name is first used; see
``fedgan.catalog``); networks travel as one state dict with per-network key prefixes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from fedgan.models.base import FAMILIES, GanFamily, ImageShape, build_networks

__all__ = [
    "FAMILIES",
    "GanFamily",
    "ImageShape",
    "ModelKeys",
    "build_networks",
    "load_state",
    "mean_state",
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


def mean_state(states: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The plain mean of several :func:`pack_state` dicts of the same networks (e.g. the
    global weights of consecutive rounds); integer buffers (BatchNorm's batch counter) take
    the last dict's value. Floats are summed in float64 and cast back.

    Raises:
        ValueError: If ``states`` is empty or their keys differ.
    """
    if not states:
        raise ValueError("mean_state needs at least one state")
    keys = set(states[0])
    if any(set(s) != keys for s in states[1:]):
        raise ValueError("mean_state: the states hold different networks")
    out: dict[str, torch.Tensor] = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            total = torch.stack([s[key].double() for s in states]).sum(0)
            out[key] = (total / len(states)).to(last.dtype)
        else:
            out[key] = last.clone()
    return out


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


_NORMS = (_NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class ModelKeys:
    """The :func:`pack_state` keys of a set of networks, by what they are.

    Attributes:
        networks: Each network's keys, by network name.
        parameters: Keys of trainable parameters (the rest are buffers: running statistics,
            counters, spectral-norm vectors).
        norms: Keys of normalisation layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm, and
            modules that declare ``is_normalization``): weights and statistics alike.
    """

    networks: dict[str, frozenset[str]]
    parameters: frozenset[str]
    norms: frozenset[str]

    @classmethod
    def of(cls, nets: Mapping[str, nn.Module]) -> ModelKeys:
        networks, parameters, norms = {}, set(), set()
        for name, net in nets.items():
            networks[name] = frozenset(f"{name}.{k}" for k in net.state_dict())
            parameters |= {f"{name}.{k}" for k, _ in net.named_parameters()}
            for mod_name, module in net.named_modules():
                if isinstance(module, _NORMS) or getattr(module, "is_normalization", False):
                    prefix = f"{name}.{mod_name}." if mod_name else f"{name}."
                    norms |= {f"{prefix}{k}" for k in module.state_dict()}
        return cls(networks, frozenset(parameters), frozenset(norms))

    @property
    def all(self) -> frozenset[str]:
        return frozenset().union(*self.networks.values())

    def network_of(self, key: str) -> str:
        """The network that ``key`` belongs to."""
        return key.split(".", 1)[0]
