"""Server optimizers for GANs: the averaged update of a round taken as a pseudo-gradient.

FedAvgM (Hsu et al. 2019) and FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021), written for
networks rather than for one flat vector:

- only trainable parameters take the server step; buffers (BatchNorm's running statistics and
  counters, spectral norm's power-iteration vectors) are plainly averaged, since a running
  variance pushed by momentum or a learning rate above 1 can turn negative;
- each key keeps its own state and its own step count, so a network that is averaged only
  every k rounds (``federation.share_discriminator``) or never is handled exactly;
- ``federation.server_networks: generator`` steps the generators and averages the rest.

Flower-free numpy (tensors only in the state a checkpoint keeps); the strategy in
:mod:`fedgan.federated.strategies` calls :meth:`step` after its weighted average.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

KINDS = ("momentum", "adam", "yogi", "adagrad")


@dataclass
class ServerOptimizer:
    """One server optimizer over named arrays.

    With ``delta = average - current`` (the round's averaged update, the negative
    pseudo-gradient) for each stepped key:

    - ``momentum``: ``m = momentum * m + delta`` (``m = delta`` the first time), then
      ``new = current + lr * m``. ``lr = 1, momentum = 0`` is FedAvg.
    - ``adam``: ``m = b1 m + (1 - b1) delta``, ``v = b2 v + (1 - b2) delta^2``,
      ``new = current + lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + tau)``, with ``t``
      the key's own step count (Adam's bias correction).
    - ``yogi``: as adam with ``v = v - (1 - b2) delta^2 sign(v - delta^2)``.
    - ``adagrad``: ``v = v + delta^2``, no bias correction.

    Attributes:
        kind: One of :data:`KINDS`.
        lr: Server learning rate (FedAvgM's ``avgm_lr``, FedOpt's ``eta``).
        stepped: The keys that take the step (None: every floating-point key); every other
            key takes the plain average.
        momentum: FedAvgM's server momentum.
        beta1: First-moment decay of the adaptive kinds.
        beta2: Second-moment decay of the adaptive kinds.
        tau: Adaptivity: the floor added to ``sqrt(v)``.
    """

    kind: str
    lr: float
    stepped: Collection[str] | None = None
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)
    t: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"server optimizer must be one of {KINDS}, got {self.kind!r}")
        if self.stepped is not None:
            self.stepped = frozenset(self.stepped)

    def state_dict(self) -> dict[str, Any]:
        """The moving state (moments and per-key step counts) a resumed run must carry on
        from, as tensors and numbers, so a checkpoint read with ``weights_only=True`` holds it.
        Without it a resumed FedAvgM or FedAdam run would restart its momentum at zero and
        train differently from the uninterrupted one."""
        return {
            "kind": self.kind,
            "m": {k: torch.from_numpy(np.array(a, copy=True)) for k, a in self.m.items()},
            "v": {k: torch.from_numpy(np.array(a, copy=True)) for k, a in self.v.items()},
            "t": dict(self.t),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from :meth:`state_dict`'s output.

        Raises:
            ValueError: If the state is another kind of optimizer's (the strategy changed
                between the run and its resume: its moments mean something else).
        """
        if state.get("kind") != self.kind:
            raise ValueError(
                f"the checkpoint holds a {state.get('kind')!r} server optimizer's state but the "
                f"config asks for {self.kind!r}; resume with the run's own "
                "federation.strategy, or start a new run"
            )
        self.m = {k: t.double().numpy().copy() for k, t in state["m"].items()}
        self.v = {k: t.double().numpy().copy() for k, t in state["v"].items()}
        self.t = {k: int(n) for k, n in state["t"].items()}

    def step(
        self, current: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The new global values of ``averaged``'s keys, given the global ``current`` ones."""
        out: dict[str, np.ndarray] = {}
        for key, avg in averaged.items():
            avg = np.asarray(avg)
            if avg.dtype.kind != "f" or (self.stepped is not None and key not in self.stepped):
                out[key] = avg
                continue
            x = np.asarray(current[key], dtype=np.float64)
            delta = avg.astype(np.float64) - x
            out[key] = (x + self._direction(key, delta)).astype(avg.dtype)
        return out

    def _direction(self, key: str, delta: np.ndarray) -> np.ndarray:
        t = self.t[key] = self.t.get(key, 0) + 1
        if self.kind == "momentum":
            m = self.m[key] = delta if key not in self.m else self.momentum * self.m[key] + delta
            return self.lr * m
        m = self.m.get(key, np.zeros_like(delta))
        m = self.m[key] = self.beta1 * m + (1 - self.beta1) * delta
        v = self.v.get(key, np.zeros_like(delta))
        sq = delta * delta
        if self.kind == "adam":
            v = self.beta2 * v + (1 - self.beta2) * sq
        elif self.kind == "yogi":
            v = v - (1 - self.beta2) * sq * np.sign(v - sq)
        else:  # adagrad
            v = v + sq
        self.v[key] = v
        if self.kind == "adagrad":
            rate = self.lr
        else:
            rate = self.lr * np.sqrt(1 - self.beta2**t) / (1 - self.beta1**t)
        return rate * m / (np.sqrt(v) + self.tau)
