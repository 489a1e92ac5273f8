"""Central (hospital-level) DP through Flower's fixed-clipping wrappers and its RDP accountant.

Each round releases the average of clipped hospital updates plus Gaussian noise, so the
guarantee covers whole hospitals. It is meaningful only with many hospitals per round (the
noise is calibrated to one hospital's clipped update, and a handful of hospitals drown in it);
with a few hospitals, per-sample DP-SGD (``privacy.mode: dp-sgd``) is the one to use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedgan.config import PrivacySection
from fedgan.privacy.accounting import check_delta, default_delta

#: Every hospital reports this metric as 1: Flower's accounted central DP averages with
#: equal weights (a weight that depends on a hospital's data would leak it).
UNIT_WEIGHT = "unit-weight"


Releases = Sequence[tuple[GaussianPrivacyEvent, int]]


def releases_state(accountant: RdpAccountant) -> list[dict[str, Any]]:
    """The releases an accountant has composed, as plain numbers for a checkpoint."""
    return list(accountant.state_dict()["compositions"])  # type: ignore[call-overload]


def releases_from_state(state: Any) -> list[tuple[GaussianPrivacyEvent, int]]:
    """:func:`releases_state`'s output back as Flower's events and their counts."""
    return [(GaussianPrivacyEvent(**row["event"]), int(row["count"])) for row in state or []]


def central_accountant(
    cfg: PrivacySection, num_hospitals: int, prior: Releases = ()
) -> RdpAccountant:
    """Flower's RDP accountant for releases over all hospitals (no sampling amplification),
    with the ``prior`` releases of the rounds a resumed run already trained composed in, so
    its budget guard counts the whole run.

    Raises:
        ValueError: If ``privacy.delta`` is 1 / ``num_hospitals`` or more: its records are
            whole hospitals, so such a delta allows publishing one hospital's update.
    """
    check_delta(cfg.delta, num_hospitals, "the federation", unit="hospitals")
    acc = RdpAccountant(
        PrivacyConfig(
            target_delta=cfg.delta or default_delta(num_hospitals),
            population_size=num_hospitals,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=cfg.target_epsilon,
        )
    )
    for event, count in prior:
        acc.compose(event, count)
    return acc


def central_noise(
    cfg: PrivacySection,
    *,
    num_hospitals: int,
    sampled: int,
    rounds: int,
    prior: Releases = (),
) -> float:
    """The configured sigma, or the smallest that keeps ``rounds`` more releases, after the
    ``prior`` ones, within the budget by Flower's own accountant (bisection), so the run is
    not cut short by rounding.

    Raises:
        ValueError: If the budget is out of reach: the prior releases have spent it, or no
            sigma fits ``rounds`` releases.
    """
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    if prior:
        acc = central_accountant(cfg, num_hospitals, prior)
        spent = float(acc.get_epsilon(acc.config.target_delta))
        if spent >= cfg.target_epsilon:
            raise ValueError(
                f"the run's {acc.num_releases} earlier rounds already spent central epsilon "
                f"{spent:.3f} of privacy.target_epsilon={cfg.target_epsilon}; keep the run as "
                "it is, or resume it with a larger budget"
            )

    def epsilon(sigma: float) -> float:
        acc = central_accountant(cfg, num_hospitals, prior)
        acc.compose(GaussianPrivacyEvent(sigma, sampled, num_hospitals), count=rounds)
        return float(acc.get_epsilon(acc.config.target_delta))

    low, high = 1e-3, 1.0
    while epsilon(high) > cfg.target_epsilon:
        high *= 2.0
        if high > 1e6:
            raise ValueError(
                f"privacy.target_epsilon={cfg.target_epsilon} is out of reach for {rounds} rounds"
            )
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (low, mid) if epsilon(mid) <= cfg.target_epsilon else (mid, high)
    return high


def valid_statistics(arrays: ArrayRecord) -> ArrayRecord:
    """Noise on the averaged update also lands on BatchNorm statistics, which can make a
    variance negative (and the generator emit NaN). Clamping them back into their valid range
    is post-processing of the private release: it costs no privacy."""
    fixed = {}
    for key, array in arrays.items():
        value = array.numpy()
        if key.endswith("running_var"):
            value = np.maximum(value, 1e-5).astype(value.dtype)
        elif key.endswith("num_batches_tracked"):
            value = np.maximum(np.round(value), 0).astype(value.dtype)
        fixed[key] = Array(np.array(value, copy=True))  # keeps 0-d counters 0-d
    return ArrayRecord(fixed)


def central_dp_strategy(
    wrap: Callable[[type], Callable[..., Any]],
    common: dict[str, Any],
    cfg: PrivacySection,
    *,
    num_hospitals: int,
    sampled: int,
    rounds: int,
    prior: Releases = (),
) -> Any:
    """FedAvg (equal weights) inside Flower's server- or client-side fixed-clipping wrapper,
    with the wrapper class passed through ``wrap`` (fedgan's reply recording). ``rounds`` are
    the releases still to come; ``prior`` those a resumed run already made, which its
    accountant starts from."""
    inner = FedAvg(**common, weighted_by_key=UNIT_WEIGHT)
    base = (
        DifferentialPrivacyServerSideFixedClipping
        if cfg.central_clipping == "server"
        else DifferentialPrivacyClientSideFixedClipping
    )

    class ValidStatistics(base):  # type: ignore[valid-type, misc]
        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            arrays, metrics = super().aggregate_train(server_round, replies)
            return (valid_statistics(arrays) if arrays is not None else None), metrics

    ValidStatistics.__name__ = ValidStatistics.__qualname__ = base.__name__
    return wrap(ValidStatistics)(
        inner,
        noise_multiplier=central_noise(
            cfg, num_hospitals=num_hospitals, sampled=sampled, rounds=rounds, prior=prior
        ),
        clipping_norm=cfg.max_grad_norm,
        num_sampled_clients=sampled,
        accountant=central_accountant(cfg, num_hospitals, prior),
    )


def client_clipping_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """Flower's ``fixedclipping_mod`` where the server asked for client-side clipping (its
    config carries the clipping norm); a plain pass-through otherwise."""
    config = msg.content.config_records.get("config")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
