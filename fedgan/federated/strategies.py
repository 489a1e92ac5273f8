"""Aggregation strategies by name, each wrapped to record what every hospital reported."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedgan.catalog import STRATEGIES
from fedgan.federated.records import nbytes
from fedgan.runs.records import HospitalReport

if TYPE_CHECKING:
    from fedgan.config import FederationSection, PrivacySection

StrategyFactory = Callable[[dict[str, Any], "FederationSection", "RoundLog"], Strategy]


def _register(
    name: str, base: type[Strategy], **params: Callable[[FederationSection], Any]
) -> None:
    """Registers Flower's ``base`` under ``name``; ``params`` map its keyword arguments to the
    config keys they come from."""

    def factory(common: dict[str, Any], cfg: FederationSection, log: RoundLog) -> Strategy:
        return _recording(base, log)(**common, **{k: get(cfg) for k, get in params.items()})

    STRATEGIES.add(name, factory)


_register("fedavg", FedAvg)
_register("fedavgm", FedAvgM, server_learning_rate=lambda c: c.avgm_lr,
          server_momentum=lambda c: c.avgm_momentum)  # fmt: skip
_register("fedmedian", FedMedian)
_register("fedtrimmedavg", FedTrimmedAvg, beta=lambda c: c.trim_beta)
for _name, _base in (("fedadam", FedAdam), ("fedyogi", FedYogi), ("fedadagrad", FedAdagrad)):
    _register(_name, _base, eta=lambda c: c.server_lr, tau=lambda c: c.server_tau)
_register("fedprox", FedProx, proximal_mu=lambda c: c.proximal_mu)
_register("krum", Krum, num_malicious_nodes=lambda c: c.malicious_hospitals)
_register("multikrum", MultiKrum, num_malicious_nodes=lambda c: c.malicious_hospitals,
          num_nodes_to_select=lambda c: c.krum_select)  # fmt: skip
_register("bulyan", Bulyan, num_malicious_nodes=lambda c: c.malicious_hospitals)


@dataclass
class RoundLog:
    """What the recording wrapper saw in the latest round (reset when a round is configured).

    Attributes:
        sent: Training messages sent.
        bytes_down: Their payload.
        reports: Each hospital's report, as received.
        bytes_up: Payload received.
        accountants: Under DP-SGD, each reporting hospital's accountant history, by hospital.
        failures: ``(node id, reason)`` of replies that were errors.
    """

    sent: int = 0
    bytes_down: int = 0
    reports: list[HospitalReport] = field(default_factory=list)
    bytes_up: int = 0
    accountants: dict[int, str] = field(default_factory=dict)
    failures: list[tuple[int, str]] = field(default_factory=list)

    def reset(self, sent: int, bytes_down: int) -> None:
        self.sent, self.bytes_down, self.bytes_up = sent, bytes_down, 0
        self.reports, self.failures, self.accountants = [], [], {}


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
                report = HospitalReport.from_metrics(metrics, node_id=node)
                self.round_log.reports.append(report)
                self.round_log.bytes_up += sum(
                    nbytes(a) for a in msg.content.array_records.values()
                )
                privacy = msg.content.config_records.get("privacy")
                if privacy is not None:
                    self.round_log.accountants[report.hospital] = str(privacy["accountant"])
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
    min_train = cfg.sampled
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
