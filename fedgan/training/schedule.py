"""How many discriminator steps each generator step waits for: fixed, or adaptive as in Bie,
Kamath & Zhang, "Private GANs, revisited" (TMLR 2023).

Under DP-SGD only the discriminator's steps read real images, so only they cost privacy; the
paper's main finding is that a private GAN should spend its budget on many discriminator steps
per generator step, more as training goes on. The adaptive schedule watches the moving average
of the discriminator's accuracy on *generated* images, measured on a fresh generated batch
before each generator step: it reads no real image, so it is post-processing of the private
discriminator and costs no privacy. When that average falls to the threshold (the generator is
winning), n_D climbs one rung of :data:`LADDER`. With a ceiling it also steps back down one rung
(never below where it started) when the average rises to the ceiling: the discriminator is
winning, and the generator, starved of steps, can fall behind for good (simulations/README.md,
study 40: a 40-round epsilon = 1 run whose largest hospital climbed to n_D = 50 diverged).
A cap (``top``) stops the climb at a rung, so that each round still buys the hospital some
generator steps (study 42).

The schedule is plain data: the hospital keeps it between rounds with its optimizer state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: The rungs the adaptive schedule climbs (the paper's).
LADDER = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass
class CriticSchedule:
    """n_D, the discriminator steps before each generator step, and what decides it.

    Attributes:
        n_d: Discriminator steps before the next generator step.
        adaptive: Climb :data:`LADDER` when the accuracy average falls to ``threshold``.
        threshold: See above.
        beta: Decay of the moving average (one update per generator step).
        grace: Generator steps after a change of n_D (and at the start) before the next.
        ceiling: When above ``threshold``, the adaptive schedule steps one rung down when the
            average rises to it, never below ``floor``; 0 (or anything not above the
            threshold): it only climbs.
        floor: The lowest n_D a step down reaches (the schedule's start).
        top: The highest n_D a climb reaches (the highest rung not above it); 0: no cap.
        accuracy: The moving average of the discriminator's accuracy on generated images
            (None before the first generator step).
        since_climb: Generator steps since n_D last changed (or the start).
        generator_steps: Generator steps under this schedule, all rounds together.
    """

    n_d: int
    adaptive: bool
    threshold: float = 0.6
    beta: float = 0.99
    grace: int = 25
    ceiling: float = 0.0
    floor: int = 1
    top: int = 0
    accuracy: float | None = None
    since_climb: int = 0
    generator_steps: int = 0

    def observe(self, accuracy: float) -> None:
        """Takes the discriminator's accuracy on generated images before a generator step."""
        previous = accuracy if self.accuracy is None else self.accuracy
        self.accuracy = self.beta * previous + (1 - self.beta) * accuracy
        self.since_climb += 1
        self.generator_steps += 1
        if not self.adaptive or self.since_climb < self.grace:
            return
        if self.accuracy <= self.threshold:
            higher = next((n for n in LADDER if n > self.n_d), self.n_d)
            if self.top <= 0 or higher <= self.top:
                self.n_d = higher
            self.since_climb = 0
        elif self.ceiling > self.threshold and self.accuracy >= self.ceiling:
            lower = max((n for n in LADDER if n < self.n_d), default=self.floor)
            if max(lower, self.floor) < self.n_d:
                self.n_d = max(lower, self.floor)
                self.since_climb = 0

    def state(self) -> dict[str, Any]:
        """What the hospital keeps between rounds (plain numbers)."""
        settings = ("threshold", "beta", "grace", "ceiling", "floor", "top")
        return {k: v for k, v in asdict(self).items() if v is not None and k not in settings}

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continues from :meth:`state` of an earlier round: its n_D, average and counters
        (the thresholds, ceiling, floor and cap stay this run's)."""
        if not state:
            return
        self.n_d = int(state["n_d"])
        self.accuracy = float(state["accuracy"]) if "accuracy" in state else None
        self.since_climb = int(state.get("since_climb", 0))
        self.generator_steps = int(state.get("generator_steps", 0))


def iterations(n_d_steps: int, schedule: CriticSchedule) -> Any:
    """The discriminator-step counts of one round's iterations: blocks of ``schedule.n_d``
    (read lazily, after the previous block's generator step may have raised it), the last one
    cut to what is left of ``n_d_steps``. Each block is followed by one generator step."""
    left = n_d_steps
    while left > 0:
        block = min(schedule.n_d, left)
        left -= block
        yield block


__all__ = ["LADDER", "CriticSchedule", "iterations"]
