"""Privacy planning and one hospital's accountant, kept as plain data between rounds."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedgan.config import PrivacySection

BUDGET_EXHAUSTED = "privacy-budget-exhausted"


class BudgetExhausted(RuntimeError):
    """A hospital's next round would spend more than its privacy budget."""

    def __init__(self, spent: float, would_spend: float, budget: float) -> None:
        super().__init__(
            f"{BUDGET_EXHAUSTED}: epsilon spent {spent:.4f}, the next round would reach "
            f"{would_spend:.4f}, budget {budget:.4f}"
        )
        self.spent, self.would_spend, self.budget = spent, would_spend, budget


#: What Opacus's RDP analysis warns when its best order is the largest one it tries.
RDP_ORDER_WARNING = "Optimal order is the largest alpha"


@contextmanager
def _quiet_prv_domain(accountant: str) -> Iterator[None]:
    """Silences, under ``prv`` only, the RDP order warning Opacus's PRV accountant raises from
    inside: it bounds the domain it discretizes with an internal RDP accountant
    (``opacus/accountants/analysis/prv/domain.py``), where a looser bound only widens that
    domain, so the warning says nothing about the epsilon fedgan reports and nothing a user
    can act on. Under ``rdp`` it stays: there it says the reported epsilon may be loose."""
    with warnings.catch_warnings():
        if accountant == "prv":
            warnings.filterwarnings("ignore", message=RDP_ORDER_WARNING)
        yield


def default_delta(n: int) -> float:
    """delta = 1/(10 n), capped at 1e-5."""
    return min(1.0 / (10.0 * max(n, 1)), 1e-5)


def sample_rate(num_examples: int, batch_size: int) -> float:
    """The Poisson sampling rate Opacus uses for a loader of this size (1 / batches per epoch)."""
    return 1.0 / math.ceil(num_examples / batch_size)


@dataclass(frozen=True)
class PrivacyPlan:
    """What one hospital's DP-SGD runs with.

    Attributes:
        noise_multiplier: sigma.
        sample_rate: Poisson sampling rate q.
        delta: Target delta.
        budget: The epsilon the hospital must never exceed.
        accountant: ``rdp`` or ``prv``.
        max_grad_norm: Per-sample clip norm.
        planned_steps: D steps the plan covers (rounds x local steps).
    """

    noise_multiplier: float
    sample_rate: float
    delta: float
    budget: float
    accountant: str
    max_grad_norm: float
    planned_steps: int


@lru_cache(maxsize=256)
def plan_privacy(
    cfg: PrivacySection, *, num_examples: int, batch_size: int, planned_steps: int
) -> PrivacyPlan:
    """Fixes sigma for a hospital: the configured one, or the smallest that keeps the whole
    planned training within ``target_epsilon`` (a binary search, so results are cached: every
    round of a hospital asks the same question).

    Raises:
        ValueError: If the data set is too small for the batch size to give a sampling rate < 1.
    """
    return _plan(cfg, num_examples=num_examples, batch_size=batch_size,
                 planned_steps=planned_steps)  # fmt: skip


def calibration_key(
    cfg: PrivacySection, *, num_examples: int, batch_size: int, planned_steps: int
) -> str:
    """What a calibrated sigma depends on, as text (the accountant remembers sigma by it)."""
    q = sample_rate(num_examples, batch_size)
    delta = cfg.delta or default_delta(num_examples)
    return f"{cfg.accountant}:eps={cfg.target_epsilon!r}:delta={delta!r}:q={q!r}:T={planned_steps}"


def _plan(
    cfg: PrivacySection,
    *,
    num_examples: int,
    batch_size: int,
    planned_steps: int,
    sigma: float | None = None,
) -> PrivacyPlan:
    if num_examples < 2:
        raise ValueError(
            f"DP-SGD needs at least 2 training images, this hospital has {num_examples}"
        )
    q = sample_rate(num_examples, batch_size)
    delta = cfg.delta or default_delta(num_examples)
    if cfg.noise_multiplier > 0:
        sigma = cfg.noise_multiplier
    elif sigma is None:
        # Opacus is imported where it is used: it costs ~2.5 s, which each ClientApp process
        # of a non-private deployment would otherwise pay every round.
        from opacus.accountants.utils import get_noise_multiplier

        with _quiet_prv_domain(cfg.accountant):
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=cfg.target_epsilon,
                    target_delta=delta,
                    sample_rate=q,
                    steps=planned_steps,
                    accountant=cfg.accountant,
                )
            )
    return PrivacyPlan(
        noise_multiplier=sigma,
        sample_rate=q,
        delta=delta,
        budget=cfg.target_epsilon,
        accountant=cfg.accountant,
        max_grad_norm=cfg.max_grad_norm,
        planned_steps=planned_steps,
    )


class HospitalAccountant:
    """One hospital's privacy accountant over the whole run.

    Its history ``[(sigma, q, steps), ...]`` is plain data: it is saved in the ClientApp's
    persistent state after every round (and reported to the server for resumed runs), and
    restored into the Opacus accountant of the next round.

    Args:
        mechanism: ``rdp`` or ``prv``.
        history: Earlier rounds' ``(noise_multiplier, sample_rate, steps)`` entries.
    """

    def __init__(
        self,
        mechanism: str,
        history: list[tuple[float, float, int]] | None = None,
        calibrated: dict[str, float] | None = None,
    ) -> None:
        self.mechanism = mechanism
        self.history = [(float(s), float(q), int(n)) for s, q, n in (history or [])]
        self.calibrated = dict(calibrated or {})
        # Epsilon is a function of the history and delta alone, and under PRV it costs tenths
        # of a second (seconds on a loaded machine): a round asks for the same value twice
        # (the budget check before, the report after), so it is remembered.
        self._known: dict[tuple[tuple[tuple[float, float, int], ...], float], float] = {}

    def plan(
        self, cfg: PrivacySection, *, num_examples: int, batch_size: int, planned_steps: int
    ) -> PrivacyPlan:
        """:func:`plan_privacy`, remembering a calibrated sigma with the history: a deployed
        site's ClientApp is a new process every round, and calibrating with PRV takes
        seconds, so it calibrates once per run (the same question gets the same sigma)."""
        if cfg.noise_multiplier > 0:
            return plan_privacy(cfg, num_examples=num_examples, batch_size=batch_size,
                                planned_steps=planned_steps)  # fmt: skip
        key = calibration_key(
            cfg, num_examples=num_examples, batch_size=batch_size, planned_steps=planned_steps
        )
        plan = _plan(cfg, num_examples=num_examples, batch_size=batch_size,
                     planned_steps=planned_steps, sigma=self.calibrated.get(key))  # fmt: skip
        self.calibrated[key] = plan.noise_multiplier
        return plan

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def _epsilon(self, history: list[tuple[float, float, int]], delta: float) -> float:
        if not history:
            return 0.0
        key = (tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta))
        if key not in self._known:
            from opacus.accountants import create_accountant

            acc = create_accountant(self.mechanism)
            acc.history = list(history)
            with _quiet_prv_domain(self.mechanism):
                self._known[key] = float(acc.get_epsilon(delta=delta))
        return self._known[key]

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far (0 before the first step)."""
        return self._epsilon(self.history, delta)

    def epsilon_after(self, plan: PrivacyPlan, steps: int) -> float:
        """Epsilon this hospital would have spent after ``steps`` more D steps under ``plan``."""
        return self._epsilon(self._merged(plan, steps), plan.delta)

    def check_budget(self, plan: PrivacyPlan, steps: int) -> float:
        """Returns the epsilon after ``steps`` more steps.

        Raises:
            BudgetExhausted: If that would exceed ``plan.budget``.
        """
        after = self.epsilon_after(plan, steps)
        if after > plan.budget:
            raise BudgetExhausted(self.epsilon(plan.delta), after, plan.budget)
        return after

    def _merged(self, plan: PrivacyPlan, steps: int) -> list[tuple[float, float, int]]:
        # Opacus merges consecutive steps of the same (sigma, q) into one entry; doing the same
        # keeps the persisted history short and the epsilon identical.
        history = list(self.history)
        entry = (plan.noise_multiplier, plan.sample_rate)
        if history and history[-1][:2] == entry:
            s, q, n = history[-1]
            history[-1] = (s, q, n + steps)
        else:
            history.append((*entry, steps))
        return history

    def record(self, plan: PrivacyPlan, steps: int) -> None:
        """Adds ``steps`` D steps taken under ``plan``."""
        self.history = self._merged(plan, steps)

    def to_json(self) -> str:
        return json.dumps(
            {"mechanism": self.mechanism, "history": self.history, "calibrated": self.calibrated}
        )

    @classmethod
    def from_json(cls, text: str) -> HospitalAccountant:
        data = json.loads(text)
        return cls(
            data["mechanism"], [tuple(h) for h in data["history"]], data.get("calibrated") or {}
        )


def plan_dict(plan: PrivacyPlan) -> dict[str, float]:
    return {k: v for k, v in asdict(plan).items() if not isinstance(v, str)}
