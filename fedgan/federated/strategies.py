"""Aggregation strategies by name, each wrapped to record what every hospital reported."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from fedgan.catalog import STRATEGIES
from fedgan.federated.records import from_arrays, in_full_precision, nbytes, pack, to_arrays, unpack
from fedgan.federated.server_opt import ServerOptimizer
from fedgan.federated.sharing import SharingPlan
from fedgan.models import ModelKeys
from fedgan.runs.records import HospitalReport, one_line_reason

if TYPE_CHECKING:
    from fedgan.config import FederationSection, PrivacySection

StrategyFactory = Callable[
    [dict[str, Any], "FederationSection", "RoundLog", SharingPlan | None], Strategy
]


class ServerOptFedAvg(FedAvg):
    """FedAvg's example-weighted average, then a :class:`ServerOptimizer` step from the global
    weights sent this round (``current_arrays``, set by the recording wrapper)."""

    def __init__(self, *, server_optimizer: ServerOptimizer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server_optimizer = server_optimizer
        self.current_arrays: ArrayRecord | None = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None or self.current_arrays is None:
            return averaged, metrics
        current = {k: np.asarray(getattr(a, "numpy", lambda a=a: a)())
                   for k, a in self.current_arrays.items() if k in averaged}  # fmt: skip
        new = self.server_optimizer.step(current, {k: a.numpy() for k, a in averaged.items()})
        return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in new.items()}), metrics


def _stepped(cfg: FederationSection, plan: SharingPlan | None) -> frozenset[str] | None:
    """Keys the server optimizer steps (None: every floating-point key, when the model's keys
    are not known)."""
    if plan is None:
        return None
    keys = plan.keys
    if cfg.server_networks == "generator":
        return frozenset(k for k in keys.parameters if keys.network_of(k).startswith("generator"))
    return keys.parameters


def _register(
    name: str, base: type[Strategy], **params: Callable[[FederationSection], Any]
) -> None:
    """Registers ``base`` under ``name``; ``params`` map its keyword arguments to the config
    keys they come from."""

    def factory(
        common: dict[str, Any], cfg: FederationSection, log: RoundLog, plan: SharingPlan | None
    ) -> Strategy:
        wrapped = _recording(base, log, cfg.max_update_ratio, cfg.message_dtype, plan,
                             cfg.pack_messages)  # fmt: skip
        return wrapped(**common, **{k: get(cfg) for k, get in params.items()})

    STRATEGIES.add(name, factory)


def _register_server_opt(
    name: str, kind: str, **params: Callable[[FederationSection], Any]
) -> None:
    """Registers :class:`ServerOptFedAvg` with a ``kind`` of :class:`ServerOptimizer`."""

    def factory(
        common: dict[str, Any], cfg: FederationSection, log: RoundLog, plan: SharingPlan | None
    ) -> Strategy:
        optimizer = ServerOptimizer(kind=kind, stepped=_stepped(cfg, plan),
                                    **{k: get(cfg) for k, get in params.items()})  # fmt: skip
        wrapped = _recording(ServerOptFedAvg, log, cfg.max_update_ratio, cfg.message_dtype,
                             plan, cfg.pack_messages)  # fmt: skip
        return wrapped(**common, server_optimizer=optimizer)

    STRATEGIES.add(name, factory)


_register("fedavg", FedAvg)
_register_server_opt("fedavgm", "momentum", lr=lambda c: c.avgm_lr,
                     momentum=lambda c: c.avgm_momentum)  # fmt: skip
_register("fedmedian", FedMedian)
_register("fedtrimmedavg", FedTrimmedAvg, beta=lambda c: c.trim_beta)
for _name in ("fedadam", "fedyogi", "fedadagrad"):
    _register_server_opt(_name, _name.removeprefix("fed"), lr=lambda c: c.server_lr,
                         tau=lambda c: c.server_tau)  # fmt: skip
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
        failures: ``(node id, reason)`` of replies that were errors or were rejected.
        names: Hospital names of the nodes that replied (where their report said).
        kept: Why the round's updates were not aggregated and the global model was kept
            (fewer than the quorum arrived); empty when they were.
    """

    sent: int = 0
    bytes_down: int = 0
    reports: list[HospitalReport] = field(default_factory=list)
    bytes_up: int = 0
    accountants: dict[int, str] = field(default_factory=dict)
    failures: list[tuple[int, str]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    kept: str = ""

    def reset(self, sent: int, bytes_down: int) -> None:
        self.sent, self.bytes_down, self.bytes_up = sent, bytes_down, 0
        self.reports, self.failures, self.accountants = [], [], {}
        self.kept = ""


REJECTED = "rejected"


def reply_problem(msg: Message, reference: ArrayRecord | None) -> str | None:
    """Why a hospital's reply cannot be aggregated (None when it can): no weights, keys or
    shapes other than the global model's, values that are not finite.

    Args:
        msg: The reply.
        reference: The global weights sent this round (None: only finiteness is checked).
    """
    arrays = msg.content.array_records.get("arrays")
    if arrays is None:
        return "the reply holds no weights"
    if reference is not None:
        missing = sorted(set(reference) - set(arrays))
        extra = sorted(set(arrays) - set(reference))
        if missing or extra:
            return (f"its weights do not match the global model's keys (missing {missing[:3]}, "
                    f"unexpected {extra[:3]})")  # fmt: skip
        for key, array in arrays.items():
            if tuple(array.shape) != tuple(reference[key].shape):
                return (f"{key} has shape {tuple(array.shape)}, the global model's is "
                        f"{tuple(reference[key].shape)}")  # fmt: skip
    for key, array in arrays.items():
        values = array.numpy()
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            return f"{bad} non-finite value(s) in {key}"
    return None


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """``||w - w_global||`` over every floating-point array."""
    total = 0.0
    for key, array in arrays.items():
        values = array.numpy()
        if values.dtype.kind == "f":
            diff = values.astype(np.float64) - reference[key].numpy().astype(np.float64)
            total += float(np.square(diff).sum())
    return math.sqrt(total)


def screen_replies(
    replies: list[Message], reference: ArrayRecord | None, max_ratio: float
) -> tuple[list[Message], list[tuple[Message, str]]]:
    """Splits the round's replies into those to aggregate and those rejected, with the reason.

    A reply is rejected when :func:`reply_problem` finds one, when its report is malformed,
    or when its update norm exceeds ``max_ratio`` times the round's median (the lower median,
    so that one wild hospital of two cannot raise it); ``max_ratio`` 0 turns that check off.
    """
    accepted: list[Message] = []
    rejected: list[tuple[Message, str]] = []
    for msg in replies:
        problem = reply_problem(msg, reference)
        if problem is None:
            try:
                metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
                HospitalReport.from_metrics(metrics)
            except (ValueError, TypeError) as err:
                problem = f"malformed report: {err}"
        if problem is None:
            accepted.append(msg)
        else:
            rejected.append((msg, problem))
    if max_ratio > 0 and reference is not None and accepted:
        norms = [update_norm(m.content.array_records["arrays"], reference) for m in accepted]
        median = sorted(norms)[(len(norms) - 1) // 2]
        limit = max_ratio * max(median, 1e-12)
        kept = []
        for msg, norm in zip(accepted, norms, strict=True):
            if norm > limit:
                why = (f"update norm {norm:.3g} exceeds {max_ratio:g}x the round's median "
                       f"{median:.3g} (federation.max_update_ratio)")  # fmt: skip
                rejected.append((msg, why))
            else:
                kept.append(msg)
        accepted = kept
    return accepted, rejected


def _subset(arrays: ArrayRecord, keys: frozenset[str]) -> ArrayRecord:
    return ArrayRecord({k: a for k, a in arrays.items() if k in keys})


def _recording(
    base: type[Strategy],
    round_log: RoundLog,
    max_update_ratio: float = 10.0,
    message_dtype: str = "float32",
    plan: SharingPlan | None = None,
    packed: bool = False,
) -> Callable[..., Strategy]:
    """A subclass of ``base`` that screens each round's replies (:func:`screen_replies`)
    before ``base`` aggregates them, and keeps the per-hospital reports in ``round_log``.

    With a ``message_dtype`` other than float32, the global weights travel rounded to it and
    the replies, which arrive in it, are turned back to float32 before anything reads them:
    the server keeps, screens and aggregates in full precision (``base`` never sees a half).

    With a ``plan`` that keeps weights at the hospitals, only the round's shared keys travel
    (:class:`SharingPlan`); ``base`` averages what comes back and the global model keeps its
    other keys as they were.

    With ``packed``, the arrays travel as one (:func:`~fedgan.federated.records.pack`); replies
    are unpacked before anything reads them (a malformed one is recorded as a failure)."""

    class Recording(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.round_log = round_log
            self.global_arrays: ArrayRecord | None = None
            self.full_arrays: ArrayRecord | None = None
            self.sent_to: list[int] = []

        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> Iterable[Message]:
            self.full_arrays = self.current_arrays = arrays
            reference = arrays
            if plan is not None and not plan.shares_everything:
                round_ = server_round + int(config.get("round-offset", 0))  # type: ignore[arg-type]
                reference = _subset(arrays, plan.returned(round_))
                arrays = _subset(arrays, plan.sent(round_))
            messages = list(super().configure_train(server_round, arrays, config, grid))
            travelling = arrays
            if message_dtype != "float32":
                travelling = to_arrays(from_arrays(arrays), message_dtype)
            if packed:
                travelling = pack(travelling)
            if travelling is not arrays:
                for msg in messages:
                    msg.content["arrays"] = travelling
            self.round_log.reset(sent=len(messages),
                                 bytes_down=nbytes(travelling) * len(messages))  # fmt: skip
            self.global_arrays = reference
            self.sent_to = [m.metadata.dst_node_id for m in messages]
            return messages

        def aggregate_train(
            self, server_round: int, replies: Iterable[Message]
        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            sent = set(self.sent_to)
            replied = {m.metadata.src_node_id for m in replies}
            missing = [n for n in self.sent_to if n not in replied]
            # The SuperLink answers for a node it has lost ("Node Unavailable"), under its own
            # id: with one node missing, that answer is the missing node's.
            orphans = [m for m in replies if sent and m.metadata.src_node_id not in sent]
            attributed = len(missing) == 1 and len(orphans) == 1 and orphans[0].has_error()
            for node in missing:
                reason = "no reply before the round's deadline (federation.round_timeout)"
                if attributed:
                    reason = one_line_reason(str(orphans[0].error.reason))
                self.round_log.failures.append((node, reason))
            answered = []
            received: dict[int, int] = {}  # bytes each reply carried, by id
            for msg in replies:
                node = msg.metadata.src_node_id
                if msg.has_error():
                    if not (attributed and msg is orphans[0]):
                        reason = one_line_reason(str(msg.error.reason))
                        self.round_log.failures.append((node, reason))
                    continue
                received[id(msg)] = sum(nbytes(a) for a in msg.content.array_records.values())
                arrays = msg.content.array_records.get("arrays")
                if arrays is not None:
                    try:
                        arrays = unpack(arrays)
                    except ValueError as bad:
                        self.round_log.failures.append((node, f"{REJECTED}: {bad}"))
                        continue
                    if message_dtype != "float32":
                        arrays = in_full_precision(arrays, message_dtype)
                    msg.content["arrays"] = arrays
                answered.append(msg)
            replies, rejected = screen_replies(answered, self.global_arrays, max_update_ratio)
            for msg, reason in rejected:
                node = msg.metadata.src_node_id
                metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
                if "hospital" in metrics:
                    hospital = metrics["hospital"]
                    if isinstance(hospital, (int, float)):
                        self.round_log.names[node] = f"hospital_{int(hospital)}"
                self.round_log.failures.append((node, f"{REJECTED}: {reason}"))
            if not replies:
                return None, None
            reports = [
                HospitalReport.from_metrics(
                    next(iter(msg.content.metric_records.values()), MetricRecord()),
                    node_id=msg.metadata.src_node_id,
                )
                for msg in replies
            ]
            # Averaged in hospital order, not in the order the replies arrived: a float sum
            # depends on its order, and a GAN turns the last bits into different figures
            # within a few rounds, so a seeded study would not repeat.
            pairs = sorted(zip(replies, reports, strict=True),
                           key=lambda p: (p[1].hospital, p[1].node_id))  # fmt: skip
            replies = [msg for msg, _ in pairs]
            for msg, report in pairs:
                node = msg.metadata.src_node_id
                self.round_log.reports.append(report)
                self.round_log.names[node] = report.name
                self.round_log.bytes_up += received[id(msg)]
                privacy = msg.content.config_records.get("privacy")
                if privacy is not None:
                    self.round_log.accountants[report.hospital] = str(privacy["accountant"])
            # The quorum a round starts with is also the fewest updates it is averaged from:
            # FedAvg of one small hospital's update would replace the global model with it.
            need = int(getattr(self, "min_train_nodes", 1) or 1)
            if len(replies) < need:
                self.round_log.kept = (
                    f"{len(replies)} of {self.round_log.sent} hospitals' updates arrived, fewer "
                    f"than the quorum ({need}, federation.min_hospitals): the global model is kept"
                )
                return None, None
            aggregated, metrics = super().aggregate_train(server_round, replies)
            full = self.full_arrays
            if aggregated is None or full is None or set(aggregated) == set(full):
                return aggregated, metrics
            merged = ArrayRecord({k: aggregated.get(k, a) for k, a in full.items()})
            return merged, metrics

    Recording.__name__ = Recording.__qualname__ = base.__name__
    return Recording


def build_strategy(
    cfg: FederationSection,
    round_log: RoundLog | None = None,
    privacy: PrivacySection | None = None,
    keys: ModelKeys | None = None,
    resumed: Mapping[str, Any] | None = None,
    rounds_left: int | None = None,
) -> Strategy:
    """The configured strategy; server-side only (no federated evaluation round).

    Args:
        cfg: The federation section.
        round_log: Filled with each round's per-hospital replies (a fresh one if omitted; the
            strategy's ``round_log`` attribute holds it either way).
        privacy: With ``mode: central-dp``, FedAvg is wrapped in Flower's fixed-clipping DP
            with its accountant.
        keys: The model's keys, which the server optimizers and the sharing plan need (without
            them every key travels every round and every floating-point one is stepped).
        resumed: What :func:`server_state` returned at the checkpoint a resumed run continues
            from: the server optimizer goes on with its moments, and central DP's accountant
            starts from the releases already made (its noise is calibrated for the rest).
        rounds_left: The rounds still to train (default ``cfg.num_rounds``).
    """
    plan = SharingPlan.from_config(cfg, keys) if keys is not None else None
    min_train = cfg.sampled
    # A round starts once the quorum is connected and trains the sampled share of whoever is:
    # a site that went down never makes it wait (Flower's sampling waits without a limit).
    common = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": min(cfg.quorum, min_train),
        "min_evaluate_nodes": 0,
        "min_available_nodes": cfg.quorum,
    }
    round_log = round_log or RoundLog()
    resumed = resumed or {}
    if privacy is not None and privacy.mode == "central-dp":
        from fedgan.federated.central_dp import central_dp_strategy, releases_from_state

        return central_dp_strategy(
            lambda base: _recording(base, round_log, cfg.max_update_ratio, cfg.message_dtype),
            common,
            privacy,
            num_hospitals=cfg.num_hospitals,
            sampled=min_train,
            rounds=cfg.num_rounds if rounds_left is None else rounds_left,
            prior=releases_from_state(resumed.get("central_releases")),
        )
    strategy = STRATEGIES.get(cfg.strategy)(common, cfg, round_log, plan)
    optimizer = getattr(strategy, "server_optimizer", None)
    if optimizer is not None and "server_optimizer" in resumed:
        optimizer.load_state_dict(resumed["server_optimizer"])
    return strategy


def server_state(strategy: Strategy) -> dict[str, Any]:
    """What a resumed run needs of the server besides the global weights, checkpoint-safe:
    the server optimizer's moments, and the releases central DP's accountant has counted."""
    state: dict[str, Any] = {}
    optimizer = getattr(strategy, "server_optimizer", None)
    if optimizer is not None:
        state["server_optimizer"] = optimizer.state_dict()
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None:
        from fedgan.federated.central_dp import releases_state

        state["central_releases"] = releases_state(accountant)
    return state
