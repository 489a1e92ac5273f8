"""Aggregation strategies by name, each wrapped to record what every hospital reported."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

from fedgan.federated.records import nbytes
from fedgan.registry import Registry

if TYPE_CHECKING:
    from fedgan.config import FederationSection, PrivacySection

StrategyFactory = Callable[[dict[str, Any], "FederationSection", "RoundLog"], Strategy]

STRATEGIES: Registry[StrategyFactory] = Registry("aggregation strategy")

STRATEGIES.add("fedavg", lambda common, cfg, log: _recording(FedAvg, log)(**common))
STRATEGIES.add(
    "fedavgm", lambda common, cfg, log: _recording(FedAvgM, log)(**common, server_learning_rate=1.0)
)
STRATEGIES.add("fedmedian", lambda common, cfg, log: _recording(FedMedian, log)(**common))
STRATEGIES.add(
    "fedtrimmedavg", lambda common, cfg, log: _recording(FedTrimmedAvg, log)(**common, beta=0.2)
)
STRATEGIES.add(
    "fedadam", lambda common, cfg, log: _recording(FedAdam, log)(**common, eta=cfg.server_lr)
)
STRATEGIES.add(
    "fedyogi", lambda common, cfg, log: _recording(FedYogi, log)(**common, eta=cfg.server_lr)
)
STRATEGIES.add(
    "fedadagrad", lambda common, cfg, log: _recording(FedAdagrad, log)(**common, eta=cfg.server_lr)
)


@dataclass
class HospitalReport:
    """One hospital's training reply as the server saw it."""

    node_id: int
    metrics: dict[str, float]
    bytes_up: int
    accountant: str = ""


@dataclass
class RoundLog:
    """What the recording wrapper saw in the latest round (reset when a round is configured)."""

    sent: int = 0
    bytes_down: int = 0
    reports: list[HospitalReport] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)

    def reset(self, sent: int, bytes_down: int) -> None:
        self.sent, self.bytes_down = sent, bytes_down
        self.reports, self.failures = [], []


def _recording(base: type[Strategy], round_log: RoundLog) -> Callable[..., Strategy]:
    """A subclass of ``base`` that keeps each round's per-hospital replies in ``round_log``."""

    class Recording(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.round_log = round_log

        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> Iterable[Message]:
            messages = list(super().configure_train(server_round, arrays, config, grid))
            self.round_log.reset(sent=len(messages), bytes_down=nbytes(arrays) * len(messages))
            return messages

        def aggregate_train(
            self, server_round: int, replies: Iterable[Message]
        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            for msg in replies:
                node = msg.metadata.src_node_id
                if msg.has_error():
                    self.round_log.failures.append((node, str(msg.error.reason)))
                    continue
                metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
                up = sum(nbytes(a) for a in msg.content.array_records.values())
                privacy = msg.content.config_records.get("privacy")
                self.round_log.reports.append(
                    HospitalReport(
                        node,
                        {k: float(v) for k, v in metrics.items()},  # type: ignore[arg-type]
                        up,
                        str(privacy["accountant"]) if privacy is not None else "",
                    )
                )
            return super().aggregate_train(server_round, replies)

    Recording.__name__ = Recording.__qualname__ = base.__name__
    return Recording


def build_strategy(
    cfg: FederationSection,
    round_log: RoundLog | None = None,
    privacy: PrivacySection | None = None,
) -> Strategy:
    """The configured strategy; server-side only (no federated evaluation round).

    Args:
        cfg: The federation section.
        round_log: Filled with each round's per-hospital replies (a fresh one if omitted; the
            strategy's ``round_log`` attribute holds it either way).
        privacy: With ``mode: central-dp``, FedAvg is wrapped in Flower's fixed-clipping DP
            with its accountant.
    """
    min_train = cfg.min_hospitals or max(1, math.ceil(cfg.fraction_train * cfg.num_hospitals))
    common = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": min_train,
        "min_evaluate_nodes": 0,
        "min_available_nodes": cfg.min_hospitals or cfg.num_hospitals,
    }
    round_log = round_log or RoundLog()
    if privacy is not None and privacy.mode == "central-dp":
        from fedgan.federated.central_dp import central_dp_strategy

        return central_dp_strategy(
            lambda base: _recording(base, round_log),
            common,
            privacy,
            num_hospitals=cfg.num_hospitals,
            sampled=min_train,
            rounds=cfg.num_rounds,
        )
    return STRATEGIES.get(cfg.strategy)(common, cfg, round_log)
