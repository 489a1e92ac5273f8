"""Privacy planning and one hospital's accountant, kept as plain data between rounds."""

from __future__ import annotations

import base64
import json
import math
import struct
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
            # a one-off release is a mechanism with sampling rate 1, where PRV's log(1 - q)
            # is -inf on purpose (its np.where picks the other branch there)
            warnings.filterwarnings(
                "ignore", message="divide by zero encountered in log", category=RuntimeWarning
            )
        yield


def default_delta(n: int) -> float:
    """delta = 1/(10 n), capped at 1e-5."""
    return min(1.0 / (10.0 * max(n, 1)), 1e-5)


def check_delta(
    delta: float, num_examples: int, who: str = "this hospital", unit: str = "images"
) -> None:
    """Refuses a delta of 1/n or more: at such a delta a mechanism that publishes one of the
    n records outright is (0, delta)-DP, so the guarantee says nothing about a patient (or,
    for central DP, whose records are whole hospitals, ``unit="hospitals"``, about a
    hospital).

    Raises:
        ValueError: One line naming the number of records and the fix.
    """
    if delta > 0 and delta * num_examples >= 1.0:
        record = "a patient's image" if unit == "images" else "one hospital's update"
        raise ValueError(
            f"privacy.delta {delta:g} is not below 1 / {num_examples} ({who}'s {unit}): at "
            f"that delta the guarantee allows publishing {record} outright; set it "
            "well below 1/n (e.g. 1e-5), or 0 for 1/(10 n) capped at 1e-5"
        )


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

    A hospital with no more images than the batch samples at q = 1: every step sees every
    image, nothing is amplified by sampling, and sigma is calibrated for that (at epsilon 10
    over 400 steps about 10, where a hospital of 941 images at q = 0.125 needs 1.46).

    Raises:
        ValueError: If the hospital has fewer than 2 images.
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


def release_epsilon(noise_multiplier: float, delta: float, accountant: str = "prv") -> float:
    """Epsilon of one Gaussian release of sensitivity 1 at ``noise_multiplier`` (what
    :meth:`HospitalAccountant.release` charges)."""
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, 1.0, 1)]
    with _quiet_prv_domain(accountant):
        return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=64)
def _calibrate_after(
    cfg: PrivacySection,
    *,
    delta: float,
    sample_rate: float,
    planned_steps: int,
    spent: tuple[tuple[float, float, int], ...],
) -> float:
    """The smallest sigma (to Opacus's tolerance: epsilon within 0.01 under the target) whose
    ``planned_steps`` composed with the mechanisms already ``spent`` stay within
    ``target_epsilon``. Epsilon is smooth in sigma, so secant steps take a few PRV
    evaluations where Opacus's bisection takes about twenty (each composes the whole plan:
    about a second). Cached: the hospitals of a simulation that share a process ask the same
    question.

    Raises:
        ValueError: If what is spent already leaves no budget for the steps.
    """
    from opacus.accountants import create_accountant

    def excess(sigma: float) -> float:
        acc = create_accountant(cfg.accountant)
        acc.history = [*spent, (sigma, sample_rate, planned_steps)]
        with _quiet_prv_domain(cfg.accountant):
            return float(acc.get_epsilon(delta=delta)) - cfg.target_epsilon

    alone = create_accountant(cfg.accountant)
    alone.history = list(spent)
    with _quiet_prv_domain(cfg.accountant):
        already = float(alone.get_epsilon(delta=delta))
    if already >= cfg.target_epsilon - 0.01:
        raise ValueError(
            f"config key 'privacy.embedding_noise': the embedding's release alone spends "
            f"epsilon {already:.2f} of privacy.target_epsilon={cfg.target_epsilon}; raise "
            "privacy.embedding_noise or set train.embedding_weight=0"
        )
    # Secant steps on log(epsilon) against log(sigma), which is nearly a line of slope -1,
    # aimed just under the target; the first guess assumes that slope from sigma = 1.
    aim = math.log(cfg.target_epsilon - 0.004)
    x_prev = 0.0
    y_prev = math.log(cfg.target_epsilon + excess(1.0))
    x = x_prev + (y_prev - aim)
    for _ in range(30):
        epsilon = cfg.target_epsilon + excess(math.exp(x))
        if cfg.target_epsilon - 0.01 <= epsilon <= cfg.target_epsilon:
            return math.exp(x)
        y = math.log(epsilon)
        slope = (y - y_prev) / (x - x_prev) if x != x_prev else -1.0
        if not math.isfinite(slope) or slope >= -1e-3:
            slope = -1.0
        x_prev, y_prev, x = x, y, x + (aim - y) / slope
    raise RuntimeError(  # not seen: epsilon is smooth and decreasing in sigma
        f"could not calibrate sigma for epsilon {cfg.target_epsilon} after the releases {spent}"
    )


def _plan(
    cfg: PrivacySection,
    *,
    num_examples: int,
    batch_size: int,
    planned_steps: int,
    sigma: float | None = None,
    spent: tuple[tuple[float, float, int], ...] = (),
) -> PrivacyPlan:
    if num_examples < 2:
        raise ValueError(
            f"DP-SGD needs at least 2 training images, this hospital has {num_examples}"
        )
    q = sample_rate(num_examples, batch_size)
    delta = cfg.delta or default_delta(num_examples)
    check_delta(delta, num_examples)
    if cfg.noise_multiplier > 0:
        sigma = cfg.noise_multiplier
    elif sigma is None and spent:
        sigma = _calibrate_after(cfg, delta=delta, sample_rate=q, planned_steps=planned_steps,
                                 spent=spent)  # fmt: skip
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

    Besides the DP-SGD steps it keeps the hospital's one-off releases (:meth:`release`): a
    vector published once with Gaussian noise, such as the generator's embedding target
    (``train.embedding_weight``). Each is charged as one Gaussian mechanism, ``(sigma, 1, 1)``
    in Opacus's terms, composed with the steps in every epsilon and every calibration; the
    noisy vector itself is kept here, so a later round reuses it instead of spending again.
    It is a differentially private release, so it may travel with the history.

    Args:
        mechanism: ``rdp`` or ``prv``.
        history: Earlier rounds' ``(noise_multiplier, sample_rate, steps)`` entries.
        releases: Earlier releases by name: ``(noise_multiplier, values)``.
    """

    def __init__(
        self,
        mechanism: str,
        history: list[tuple[float, float, int]] | None = None,
        calibrated: dict[str, float] | None = None,
        releases: dict[str, tuple[float, list[float]]] | None = None,
    ) -> None:
        self.mechanism = mechanism
        self.history = [(float(s), float(q), int(n)) for s, q, n in (history or [])]
        self.calibrated = dict(calibrated or {})
        self.releases = {k: (float(s), list(v)) for k, (s, v) in (releases or {}).items()}
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
        spent = self._one_offs()
        if spent:  # the same question only with the same releases before it
            key += ":after=" + ",".join(f"{s!r}" for s, _, _ in spent)
        plan = _plan(cfg, num_examples=num_examples, batch_size=batch_size,
                     planned_steps=planned_steps, sigma=self.calibrated.get(key),
                     spent=spent)  # fmt: skip
        self.calibrated[key] = plan.noise_multiplier
        return plan

    @property
    def steps(self) -> int:
        """DP-SGD steps taken (releases are not steps)."""
        return sum(n for _, _, n in self.history)

    def _one_offs(self) -> tuple[tuple[float, float, int], ...]:
        return tuple((sigma, 1.0, 1) for sigma, _ in self.releases.values())

    def release(self, name: str, noise_multiplier: float, noisy: list[float]) -> None:
        """Records that ``noisy`` was published once as ``name``: a sum with sensitivity 1
        (under adding or removing one image) plus Gaussian noise of ``noise_multiplier``.

        Raises:
            ValueError: If ``name`` was released before (a second draw would spend again).
        """
        if name in self.releases:
            raise ValueError(f"{name!r} was already released; reuse it (released({name!r}))")
        # kept as it will be restored (float32), so every round uses the same values
        self.releases[name] = (float(noise_multiplier), _unpack(_pack(list(noisy))))

    def released(self, name: str) -> list[float] | None:
        """The noisy values of an earlier release, or None."""
        kept = self.releases.get(name)
        return None if kept is None else list(kept[1])

    def _epsilon(self, history: list[tuple[float, float, int]], delta: float) -> float:
        history = [*history, *self._one_offs()]
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
        data: dict = {
            "mechanism": self.mechanism,
            "history": self.history,
            "calibrated": self.calibrated,
        }
        if self.releases:  # float32 values as base64: a 2,000-feature embedding is ~11 kB
            data["releases"] = {
                name: {"noise_multiplier": sigma, "values": _pack(values)}
                for name, (sigma, values) in self.releases.items()
            }
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> HospitalAccountant:
        data = json.loads(text)
        releases = {
            name: (kept["noise_multiplier"], _unpack(kept["values"]))
            for name, kept in (data.get("releases") or {}).items()
        }
        return cls(
            data["mechanism"],
            [tuple(h) for h in data["history"]],
            data.get("calibrated") or {},
            releases,
        )


def _pack(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def _unpack(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def plan_dict(plan: PrivacyPlan) -> dict[str, float]:
    return {k: v for k, v in asdict(plan).items() if not isinstance(v, str)}
