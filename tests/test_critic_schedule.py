"""The discriminator-steps schedule (fixed and adaptive n_D) and what it charges under DP-SGD."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgan.config import Config, load_config, with_changes
from fedgan.data import hospital_dataset
from fedgan.models import build_networks, pack_state
from fedgan.privacy import BudgetExhausted, HospitalAccountant, plan_privacy
from fedgan.training.hospital import config_shape, local_round
from fedgan.training.objectives import make_objective
from fedgan.training.schedule import LADDER, CriticSchedule, iterations


def test_the_ladder_is_climbed_only_after_the_grace_and_at_the_threshold() -> None:
    schedule = CriticSchedule(n_d=1, adaptive=True, threshold=0.6, beta=0.5, grace=3)
    for _ in range(10):  # the discriminator wins: n_D stays
        schedule.observe(1.0)
    assert schedule.n_d == 1 and schedule.accuracy == pytest.approx(1.0)
    seen = []
    for _ in range(12):  # it loses: the average falls to 0.6 at the 2nd step, then climbs
        schedule.observe(0.0)
        seen.append(schedule.n_d)
    # average after k zeros: 0.5**k; at or below 0.6 from k = 1; grace 3 since the start,
    # then 3 generator steps between climbs
    assert seen == [2, 2, 2, 5, 5, 5, 10, 10, 10, 20, 20, 20]
    assert schedule.generator_steps == 22


def test_with_a_ceiling_the_schedule_steps_back_down_but_never_below_its_start() -> None:
    schedule = CriticSchedule(n_d=3, adaptive=True, threshold=0.6, beta=0.5, grace=2,
                              ceiling=0.65, floor=3)  # fmt: skip
    seen = []
    for _ in range(8):  # the generator wins: 3 -> 5 -> 10 -> 20 (a climb every 2 steps)
        schedule.observe(0.0)
        seen.append(schedule.n_d)
    assert seen == [3, 5, 5, 10, 10, 20, 20, 50]
    seen = []
    for _ in range(12):  # the discriminator wins: one rung down every 2 steps, to the start
        schedule.observe(1.0)
        seen.append(schedule.n_d)
    # average after k ones from ~0: 1 - 0.5**k; at the ceiling from k = 2
    assert seen == [50, 20, 20, 10, 10, 5, 5, 3, 3, 3, 3, 3]
    schedule.observe(1.0)  # at the start already: it stays
    assert schedule.n_d == 3
    plain = CriticSchedule(n_d=50, adaptive=True, grace=0, beta=0.0)  # no ceiling: never down
    for _ in range(5):
        plain.observe(1.0)
    assert plain.n_d == 50


def test_a_capped_schedule_climbs_to_the_highest_rung_not_above_its_cap() -> None:
    def climb(top: int) -> list[int]:
        schedule = CriticSchedule(n_d=3, adaptive=True, threshold=0.6, beta=0.0, grace=1,
                                  ceiling=0.65, floor=3, top=top)  # fmt: skip
        seen = []
        for _ in range(8):  # the generator always wins
            schedule.observe(0.0)
            seen.append(schedule.n_d)
        schedule.observe(1.0)  # then the discriminator: one rung down, as without a cap
        return [*seen, schedule.n_d]

    assert climb(10) == [5, 10, 10, 10, 10, 10, 10, 10, 5]
    assert climb(15) == [5, 10, 10, 10, 10, 10, 10, 10, 5]  # 15 is no rung: 10 is the top
    assert climb(20) == [5, 10, 20, 20, 20, 20, 20, 20, 10]
    assert climb(0) == [5, 10, 20, 50, 100, 200, 500, 1000, 500]  # no cap
    assert climb(3) == [3] * 9  # a cap at the start: it never moves


def test_a_fixed_schedule_never_climbs_but_still_reports_the_accuracy() -> None:
    schedule = CriticSchedule(n_d=5, adaptive=False, grace=0)
    for _ in range(50):
        schedule.observe(0.0)
    assert schedule.n_d == 5 and schedule.accuracy == pytest.approx(0.0)


def test_the_schedule_state_round_trips() -> None:
    schedule = CriticSchedule(n_d=1, adaptive=True, beta=0.0, grace=0)
    schedule.observe(0.1)
    again = CriticSchedule(n_d=1, adaptive=True)
    again.restore(schedule.state())
    assert (again.n_d, again.accuracy, again.since_climb, again.generator_steps) == (
        schedule.n_d, schedule.accuracy, schedule.since_climb, schedule.generator_steps
    )  # fmt: skip
    assert again.n_d == LADDER[1]


@settings(max_examples=200, deadline=None)
@given(
    budget=st.integers(1, 2000),
    start=st.sampled_from(LADDER[:6]),
    accuracies=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=50),
    threshold=st.floats(0.0, 1.0),
    grace=st.integers(0, 5),
    ceiling=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    above=st.one_of(st.just(-1), st.integers(0, 300)),
)
def test_a_round_takes_exactly_its_discriminator_steps(
    budget, start, accuracies, threshold, grace, ceiling, above
) -> None:
    top = 0 if above < 0 else start + above  # no cap, or one at or above the start
    schedule = CriticSchedule(n_d=start, adaptive=True, threshold=threshold, beta=0.9,
                              grace=grace, ceiling=ceiling, floor=start, top=top)  # fmt: skip
    blocks = []
    for i, block in enumerate(iterations(budget, schedule)):
        blocks.append(block)
        assert 1 <= block <= schedule.n_d
        schedule.observe(accuracies[i % len(accuracies)])
        assert schedule.n_d >= start  # a step down stops at the start
        assert top == 0 or schedule.n_d <= top  # a climb stops at the cap
    assert sum(blocks) == budget  # whatever the accuracies: the charge is known in advance
    if ceiling <= threshold:  # no ceiling: n_D only climbs; the last block may be cut
        assert blocks[:-1] == sorted(blocks[:-1])


@settings(max_examples=25, deadline=None)
@given(
    budget=st.floats(0.5, 20.0),
    n=st.integers(20, 3000),
    batch=st.integers(4, 128),
    rounds=st.integers(1, 10),
    d_steps=st.integers(1, 200),
    threshold=st.floats(0.0, 1.0),
    sigma=st.one_of(st.just(0.0), st.floats(0.5, 3.0)),
    seed=st.integers(0, 1000),
)
def test_the_adaptive_schedule_never_passes_the_budget(
    budget, n, batch, rounds, d_steps, threshold, sigma, seed
) -> None:
    """Rounds of the adaptive schedule, accuracies at random, run past the plan: the
    hospital's guard stops before the budget, never after; calibrated, the plan fits."""
    overrides = [f"privacy.target_epsilon={budget}", f"privacy.noise_multiplier={sigma}"]
    cfg = load_config(None, ["privacy.mode=dp-sgd", "privacy.accountant=rdp", *overrides])
    plan = plan_privacy(cfg.privacy, num_examples=n, batch_size=batch,
                        planned_steps=rounds * d_steps)  # fmt: skip
    acc = HospitalAccountant(cfg.privacy.accountant)
    schedule = CriticSchedule(n_d=1, adaptive=True, threshold=threshold, grace=1)
    rng = torch.Generator().manual_seed(seed)
    done = 0
    for _ in range(rounds + 3):
        try:
            acc.check_budget(plan, d_steps)
        except BudgetExhausted:
            break
        taken = 0
        for block in iterations(d_steps, schedule):
            taken += block
            schedule.observe(float(torch.rand((), generator=rng)))
        acc.record(plan, taken)
        done += 1
        assert acc.epsilon(plan.delta) <= budget
    if sigma == 0.0:
        assert done >= rounds


@pytest.fixture
def dp_adaptive(toy_config: Config) -> Config:
    return with_changes(
        toy_config,
        privacy={"mode": "dp-sgd", "target_epsilon": 8.0},
        federation={"num_rounds": 3},
        # always "losing": the schedule climbs after every generator step
        train={"local_steps": 3, "d_steps_per_round": 7, "critic_threshold": 1.0,
               "critic_grace": 1, "n_critic": 1},
    )  # fmt: skip


def _rounds(cfg: Config, rounds: int) -> list:
    ds = hospital_dataset(cfg.data, 0, 0, 3)
    state = pack_state(build_networks(cfg.model, config_shape(cfg), seed=0))
    acc, opt, out = None, None, []
    for r in range(1, rounds + 1):
        res = local_round(cfg, ds, state, opt, round_=r, hospital=0, accountant=acc)
        acc, opt, state = res.accountant, res.optimizer_state, res.state
        out.append(res)
    return out


def test_dp_sgd_defaults_to_the_adaptive_schedule(dp_adaptive: Config) -> None:
    assert make_objective(dp_adaptive).schedule_mode == "adaptive"
    default = make_objective(with_changes(dp_adaptive, train={"n_critic": 0}))
    assert default.phase("D").repeats == 3  # the private recipe starts at n_D = 3
    plain = with_changes(dp_adaptive, privacy={"mode": "none", "target_epsilon": 0.0})
    objective = make_objective(plain)
    assert objective.schedule_mode == "fixed" and objective.critic_schedule() is None


@pytest.mark.parametrize(("cap", "n_ds"), [(0, [10, 20, 50]), (-1, [10, 10, 10])])
def test_an_adaptive_private_round_charges_exactly_its_discriminator_steps(
    dp_adaptive: Config, independent_epsilon, cap: int, n_ds: list[int]
) -> None:
    results = _rounds(with_changes(dp_adaptive, train={"critic_max": cap}), 3)
    # n_D climbs after every generator step: round 1 takes D blocks 1, 2, 4 (7 in all, the
    # last cut to what is left), so 3 generator steps, and ends at 10; the state carries into
    # round 2 (a block of 10 cut to 7: 1 generator step) and round 3. Without a cap it goes
    # on climbing; with the default one (10 at epsilon 8) it stays at 10.
    assert [r.stats.d_steps for r in results] == [7, 7, 7]
    assert [r.stats.steps for r in results] == [3, 1, 1]
    assert [r.stats.critic["n_d"] for r in results] == n_ds
    last = results[-1].privacy
    assert last["dp_steps"] == 21  # every D step charged once, and nothing else
    pld = independent_epsilon(last["noise_multiplier"], last["sample_rate"], 21, last["delta"],
                              release=last["release_noise"])  # fmt: skip
    assert pld - 0.02 <= last["epsilon"] <= min(pld + 0.02, 8.0)
    # the discriminator's loss on real images is not released; its accuracy on fakes is
    assert all(r.stats.d_loss != r.stats.d_loss for r in results)  # NaN
    assert all(0.0 <= r.stats.critic["accuracy"] <= 1.0 for r in results)


def test_a_fixed_private_schedule_takes_n_critic_steps_per_generator_step(
    dp_adaptive: Config,
) -> None:
    fixed = with_changes(dp_adaptive, train={"critic_schedule": "fixed", "n_critic": 3})
    (result,) = _rounds(fixed, 1)
    assert (result.stats.steps, result.stats.d_steps) == (3, 9)
    assert result.privacy["dp_steps"] == 9 and result.stats.critic["n_d"] == 3


def test_the_sigma_a_hospital_calibrated_is_remembered(
    dp_adaptive: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    (first,) = _rounds(dp_adaptive, 1)
    import opacus.accountants.utils as utils

    def no_calibration(**_: object) -> float:
        raise AssertionError("sigma calibrated again")

    monkeypatch.setattr(utils, "get_noise_multiplier", no_calibration)
    acc = HospitalAccountant.from_json(first.accountant)
    plan = acc.plan(dp_adaptive.privacy, num_examples=first.num_examples,
                    batch_size=dp_adaptive.train.batch_size, planned_steps=3 * 7)  # fmt: skip
    assert plan.noise_multiplier == first.privacy["noise_multiplier"]


def test_a_private_round_computes_its_epsilon_once(
    dp_adaptive: Config, monkeypatch: pytest.MonkeyPatch, independent_epsilon
) -> None:
    """The budget check before a round and the report after it ask for the same history's
    epsilon: under PRV each costs seconds, so the second is the first, remembered."""
    (first,) = _rounds(dp_adaptive, 1)  # sigma calibrated, kept in the history
    from opacus.accountants import PRVAccountant

    assert dp_adaptive.privacy.accountant == "prv"
    calls, real = [], PRVAccountant.get_epsilon

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(list(self.history))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PRVAccountant, "get_epsilon", counted)
    ds = hospital_dataset(dp_adaptive.data, 0, 0, 3)  # _rounds' hospital
    second = local_round(dp_adaptive, ds, first.state, first.optimizer_state, round_=2,
                         hospital=0, accountant=first.accountant)  # fmt: skip
    assert len(calls) == 1, calls
    p = second.privacy
    pld = independent_epsilon(p["noise_multiplier"], p["sample_rate"], p["dp_steps"], p["delta"],
                              release=p["release_noise"])  # fmt: skip
    assert abs(p["epsilon"] - pld) <= 0.02  # the remembered value is the right one


def test_prv_needs_less_noise_than_rdp_for_the_same_budget() -> None:
    sigmas = {}
    for mechanism in ("prv", "rdp"):
        cfg = load_config(None, ["privacy.mode=dp-sgd", "privacy.target_epsilon=10",
                                 f"privacy.accountant={mechanism}"]).privacy  # fmt: skip
        sigmas[mechanism] = plan_privacy(cfg, num_examples=900, batch_size=32,
                                         planned_steps=400).noise_multiplier  # fmt: skip
    assert sigmas["prv"] < sigmas["rdp"]
    assert load_config(None, []).privacy.accountant == "prv"


def test_adaptive_needs_a_discriminator_with_a_decision_boundary(toy_config: Config) -> None:
    wgan = with_changes(toy_config, model={"family": "wgan-gp"},
                        train={"critic_schedule": "adaptive"})  # fmt: skip
    with pytest.raises(ValueError, match="train.critic_schedule"):
        make_objective(wgan)
    from fedgan.experiment import resolve

    with pytest.raises(ValueError, match="train.critic_schedule"):
        resolve(with_changes(toy_config, task={"name": "enhance"},
                             train={"critic_schedule": "adaptive"}))  # fmt: skip


def test_the_default_ceiling_is_the_threshold_plus_five_points_from_epsilon_3(
    dp_adaptive: Config,
) -> None:
    def ceiling(epsilon: float = 8.0, **train: float) -> float:
        cfg = with_changes(dp_adaptive, train=train, privacy={"target_epsilon": epsilon})
        schedule = make_objective(cfg).critic_schedule()
        assert schedule is not None and schedule.adaptive
        return schedule.ceiling

    assert ceiling(critic_threshold=0.6) == pytest.approx(0.65)
    assert ceiling(3.0, critic_threshold=0.5) == pytest.approx(0.55)
    assert ceiling(2.9, critic_threshold=0.6) == 0.0  # below epsilon 3: off (study 40)
    assert ceiling(1.0, critic_threshold=0.6, critic_ceiling=0.7) == 0.7  # as asked
    assert ceiling(critic_threshold=0.97) == 0.0  # 1.02 could never be reached: off
    assert ceiling(critic_threshold=0.6, critic_ceiling=0.0) == 0.0
    assert ceiling(critic_threshold=0.6, critic_ceiling=0.8) == 0.8


def test_the_default_cap_is_10_where_the_default_ceiling_is_on(
    dp_adaptive: Config, toy_config: Config
) -> None:
    def top(epsilon: float = 8.0, base: Config = dp_adaptive, **train: float) -> int:
        cfg = with_changes(base, train=train, privacy={"target_epsilon": epsilon})
        schedule = make_objective(cfg).critic_schedule()
        assert schedule is not None and schedule.adaptive
        return schedule.top

    assert top() == top(3.0) == 10
    assert top(2.9) == 0  # below epsilon 3: no cap, as no ceiling (studies 40, 42)
    assert top(1.0, critic_max=20) == 20  # as asked
    assert top(critic_max=0) == 0
    adaptive = with_changes(toy_config, train={"critic_schedule": "adaptive"})
    assert top(base=adaptive) == 0  # without DP-SGD: no cap
    with pytest.raises(ValueError, match="'train.critic_max': 2 is below 3"):
        make_objective(with_changes(dp_adaptive, train={"critic_max": 2, "n_critic": 0}))
