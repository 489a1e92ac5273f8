"""The typed records of a run: what a hospital reports after a round, and one round's line of
``metrics.jsonl``.

A hospital's report crosses Flower as a flat metric record (``to_metrics``) and is read back
on the server (``from_metrics``): the keys are written and parsed in this one place.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

NAN = float("nan")


@dataclass(frozen=True)
class PrivacySpent:
    """A hospital's DP-SGD spending so far (its accountant's view)."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    dp_steps: int
    budget: float
    max_grad_norm: float
    #: The noise of its one-off releases (the generator's embedding target), 0 if none.
    release_noise: float = 0.0


@dataclass(frozen=True)
class HospitalReport:
    """One hospital's round.

    Attributes:
        hospital: The hospital's index (its partition, or its SuperNode's ``hospital-id``).
        num_examples: Its training images (FedAvg's weight).
        examples_seen: Real images its networks trained on this round.
        steps: Local iterations.
        d_loss: Mean discriminator loss.
        g_loss: Mean generator loss.
        train_seconds: Wall time of local training.
        optimizer_steps: Steps its discriminator's optimizer has taken in this run, all rounds
            together (its state survives rounds, and a resumed study).
        privacy: Under DP-SGD, what it has spent so far.
        node_id: The SuperNode that sent it (known on the server only).
        startup_seconds: On a deployed site, seconds from the start of the round's ClientApp
            process to the start of its work: the interpreter, Flower's and fedgan's imports,
            the app's installation, the message's transfer (0 where the process outlives the
            round, as a simulation's workers do).
        data_seconds: Seconds it took to load the site's data this round (from the site cache
            after the first round of a deployed site).
        d_steps: Discriminator steps this round.
        critic_steps: Under a critic schedule, n_D (discriminator steps per generator step)
            at the end of the round; 0 without one.
        critic_accuracy: Under a critic schedule, the moving average of the discriminator's
            accuracy on generated images (what the adaptive schedule watches).
    """

    hospital: int
    num_examples: int
    examples_seen: int
    steps: int
    d_loss: float
    g_loss: float
    train_seconds: float
    optimizer_steps: int = 0
    privacy: PrivacySpent | None = None
    node_id: int = -1
    startup_seconds: float = 0.0
    data_seconds: float = 0.0
    d_steps: int = 0
    critic_steps: int = 0
    critic_accuracy: float = NAN

    #: The metric-record key of ``num_examples`` (what Flower's FedAvg weighs by).
    WEIGHT_KEY = "num-examples"

    def to_metrics(self) -> dict[str, int | float]:
        """The flat metric record a ClientApp replies with (``-`` in keys, Flower's style)."""
        out: dict[str, int | float] = {
            k.replace("_", "-"): v
            for k, v in asdict(self).items()
            if k not in ("privacy", "node_id")
        }
        if self.privacy is not None:
            out.update({f"privacy-{k.replace('_', '-')}": v
                        for k, v in asdict(self.privacy).items()})  # fmt: skip
        return out

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any], node_id: int = -1) -> HospitalReport:
        """The inverse of :meth:`to_metrics`.

        Raises:
            ValueError: If a key is missing (a reply that is not a hospital's report).
        """
        try:
            values = {
                f.name: metrics[f.name.replace("_", "-")]
                for f in fields(cls)
                if f.name not in ("privacy", "node_id")
                and (f.name.replace("_", "-") in metrics or f.default is MISSING)
            }
            privacy = None
            if "privacy-epsilon" in metrics:
                privacy = PrivacySpent(**{  # type: ignore[arg-type]
                    f.name: metrics[f"privacy-{f.name.replace('_', '-')}"]
                    for f in fields(PrivacySpent)
                    if f"privacy-{f.name.replace('_', '-')}" in metrics or f.default is MISSING
                })  # fmt: skip
        except KeyError as missing:
            raise ValueError(f"hospital report lacks {missing}") from None
        ints = {"hospital", "num_examples", "examples_seen", "steps", "optimizer_steps",
                "d_steps", "critic_steps"}  # fmt: skip
        cast = {k: int(v) if k in ints else float(v) for k, v in values.items()}
        if privacy is not None:
            privacy = PrivacySpent(**{  # type: ignore[arg-type]
                k: int(v) if k == "dp_steps" else float(v) for k, v in asdict(privacy).items()
            })  # fmt: skip
        return cls(**cast, privacy=privacy, node_id=node_id)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        return f"hospital_{self.hospital}" if self.hospital >= 0 else f"node_{self.node_id}"

    def row(self) -> dict[str, float | int]:
        """This hospital's entry in the round's record."""
        out: dict[str, float | int] = {
            "node_id": self.node_id,
            "num_examples": self.num_examples,
            "examples_seen": self.examples_seen,
            "d_loss": self.d_loss,
            "g_loss": self.g_loss,
            "train_seconds": self.train_seconds,
            "optimizer_steps": self.optimizer_steps,
        }
        if self.startup_seconds or self.data_seconds:
            out["startup_seconds"] = self.startup_seconds
            out["data_seconds"] = self.data_seconds
        if self.critic_steps:
            out["d_steps"] = self.d_steps
            out["critic_steps"] = self.critic_steps
            out["critic_accuracy"] = self.critic_accuracy
        if self.privacy is not None:
            out.update(asdict(self.privacy))
        return out


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit|Interrupt)\w*): (\S.*)$")
_RELAYED = re.compile(r"^<class '(?:[\w.]+\.)?([\w()]+)'>:<'(.*)$", re.S)


def one_line_reason(reason: str, limit: int = 300) -> str:
    """Why a hospital did not train, in one line of at most ``limit`` characters. Flower and
    Ray relay a ClientApp's crash as its whole traceback (``<class '...RayTaskError'>:<'...``);
    this keeps the exception that started it (``RuntimeError: ...``), or the first sentence
    of a long one-line message (Ray's out-of-memory kill, with what to lower). A reason
    fedgan wrote itself (one line) is kept as it is."""
    text = _ANSI.sub("", reason).strip()
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    if len(lines) > 1:
        raised = next((m for s in lines if (m := _RAISED.match(s))), None)
        text = (
            f"{raised.group(1)}: {raised.group(2).rstrip(chr(39) + '>')}" if raised else lines[-1]
        )
    elif (relayed := _RELAYED.match(text)) is not None:
        name, body = relayed.groups()
        text = f"{name}: {body.split('. ')[0].rstrip(chr(39) + '>')}"
    if "OutOfMemoryError" in text:
        text += " (lower train.batch_size or federation.concurrent_hospitals)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Failure:
    """A hospital that did not train in a round, and why."""

    node_id: int
    reason: str
    hospital: str = ""
    budget_exhausted: bool = False


@dataclass
class RoundRecord:
    """One line of ``metrics.jsonl``.

    Attributes:
        round: The round (1-based, absolute across resumes).
        mode: ``federated`` or ``centralized``.
        hospitals: Each reporting hospital's row, by name.
        aggregate: Totals and example-weighted means over the hospitals (or the pooled run).
        failures: Hospitals that did not train.
        bytes_down: Bytes sent to hospitals.
        bytes_up: Bytes received from them.
        round_seconds: Wall time since the server received the previous round (the round's
            training, its messages, and whatever else was on its path).
        eval: The central evaluation's metrics (rounds where it was due).
        eval_seconds: Its wall time (in the evaluation process with ``eval.background``).
    """

    round: int
    mode: str
    hospitals: dict[str, dict[str, float | int]] = field(default_factory=dict)
    aggregate: dict[str, float | int] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    round_seconds: float = NAN
    eval: dict[str, float] | None = None
    eval_seconds: float | None = None

    @classmethod
    def federated(
        cls, round_: int, reports: list[HospitalReport], failures: list[Failure],
        *, bytes_down: int, bytes_up: int,
    ) -> RoundRecord:  # fmt: skip
        """The record of a federated round from its reports."""
        total = sum(r.num_examples for r in reports)
        aggregate: dict[str, float | int] = {
            "hospitals": len(reports),
            "num_examples": total,
            "examples_seen": sum(r.examples_seen for r in reports),
            # sequential generator updates: hospitals train side by side
            "generator_steps": max((r.steps for r in reports), default=0),
        }
        if total:
            aggregate["d_loss"] = sum(r.d_loss * r.num_examples for r in reports) / total
            aggregate["g_loss"] = sum(r.g_loss * r.num_examples for r in reports) / total
        eps = [r.privacy.epsilon for r in reports if r.privacy is not None]
        if eps:
            aggregate["max_epsilon"] = max(eps)
        critics = [r for r in reports if r.critic_steps]
        if critics:
            aggregate["d_steps"] = max(r.d_steps for r in critics)
            aggregate["critic_steps"] = max(r.critic_steps for r in critics)
            aggregate["critic_accuracy"] = sum(r.critic_accuracy for r in critics) / len(critics)
        return cls(
            round=round_,
            mode="federated",
            hospitals={r.name: r.row() for r in reports},
            aggregate=aggregate,
            failures=list(failures),
            bytes_down=bytes_down,
            bytes_up=bytes_up,
        )

    @classmethod
    def centralized(
        cls, round_: int, *, num_examples: int, examples_seen: int, d_loss: float,
        g_loss: float, train_seconds: float, generator_steps: int = 0,
        d_steps: int = 0, critic: Mapping[str, Any] | None = None,
    ) -> RoundRecord:  # fmt: skip
        """The record of a round of the pooled baseline (``critic``: its critic schedule's
        state, if one ran)."""
        aggregate: dict[str, float | int] = {
            "hospitals": 0,
            "num_examples": num_examples,
            "examples_seen": examples_seen,
            "generator_steps": generator_steps,
            "d_loss": d_loss,
            "g_loss": g_loss,
            "train_seconds": train_seconds,
        }
        if critic:
            aggregate["d_steps"] = d_steps
            aggregate["critic_steps"] = int(critic["n_d"])
            aggregate["critic_accuracy"] = float(critic.get("accuracy", NAN))
        return cls(round=round_, mode="centralized", aggregate=aggregate)

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` object (evaluation keys only where it ran)."""
        out = asdict(self)
        for key in ("eval", "eval_seconds"):
            if out[key] is None:
                del out[key]
        return out
