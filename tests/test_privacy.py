"""DP-SGD: accounting across rounds, budgets never exceeded, correct GAN mechanics, refusals."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from torch import nn

from fedgan.config import Config, PrivacySection, load_config, with_changes
from fedgan.data import hospital_dataset
from fedgan.experiment import resolve
from fedgan.models import FAMILIES, ImageShape, build_networks, pack_state
from fedgan.privacy import (
    BudgetExhausted,
    HospitalAccountant,
    check_privatizable,
    default_delta,
    plan_privacy,
)
from fedgan.privacy.accounting import RDP_ORDER_WARNING, sample_rate
from fedgan.training import d_step, g_step, make_optimizers
from fedgan.training.hospital import config_shape, local_round


@pytest.fixture
def dp_config(toy_config: Config) -> Config:
    return with_changes(
        toy_config,
        privacy={"mode": "dp-sgd", "target_epsilon": 5.0},
        federation={"num_rounds": 3},
        # few features, so that a toy hospital's embedding release is informative and the
        # default private synthesis makes it (tests/test_embedding.py)
        train={"embedding_features": 16},
    )


def _run_rounds(cfg: Config, rounds: int) -> list:
    ds = hospital_dataset(cfg.data, 0, 0, 3)
    state = pack_state(build_networks(cfg.model, config_shape(cfg), seed=0))
    acc, opt, out = None, None, []
    for r in range(1, rounds + 1):
        res = local_round(cfg, ds, state, opt, round_=r, hospital=0, accountant=acc)
        acc, opt, state = res.accountant, res.optimizer_state, res.state
        out.append(res)
    return out


def test_reported_epsilon_matches_an_independent_accountant(
    dp_config: Config, independent_epsilon
) -> None:
    results = _run_rounds(dp_config, 3)
    eps = [r.privacy["epsilon"] for r in results]
    assert eps == sorted(eps) and eps[0] > 0  # never decreases
    last = results[-1].privacy
    # the private default: 3 discriminator steps per iteration
    steps = 3 * dp_config.train.local_steps * 3
    assert last["dp_steps"] == steps
    # PRV (the default) against Google's PLD accountant: an independent implementation of
    # the same (tight) analysis; PRV reports its upper bound, within its eps_error of 0.01.
    # the default private synthesis also released its generator's embedding target once
    assert last["release_noise"] == pytest.approx(20 / 5.0)
    pld = independent_epsilon(last["noise_multiplier"], last["sample_rate"], steps,
                              last["delta"], release=last["release_noise"])  # fmt: skip
    assert pld - 0.02 <= last["epsilon"] <= pld + 0.02
    rdp = RDPAccountant()
    rdp.history = [(last["release_noise"], 1.0, 1),
                   (last["noise_multiplier"], last["sample_rate"], steps)]  # fmt: skip
    assert last["epsilon"] <= rdp.get_epsilon(last["delta"])  # RDP's bound is looser
    # calibrated to the whole planned training: it ends at (not past) the budget
    assert last["epsilon"] <= 5.0 and last["epsilon"] > 4.5
    n = len(hospital_dataset(dp_config.data, 0, 0, 3))
    assert last["delta"] == default_delta(n)
    assert last["sample_rate"] == sample_rate(n, dp_config.train.batch_size)


def test_exhausted_budget_refuses_before_spending(dp_config: Config) -> None:
    fixed = with_changes(
        dp_config,
        privacy={"noise_multiplier": 0.9, "target_epsilon": 3.0},
        federation={"num_rounds": 50},
        data={"num_images": 900},
        train={"local_steps": 4},
    )
    ds = hospital_dataset(fixed.data, 0, 0, 3)
    state = pack_state(build_networks(fixed.model, config_shape(fixed), seed=0))
    acc = None
    for r in range(1, 51):
        try:
            res = local_round(fixed, ds, state, None, round_=r, hospital=0, accountant=acc)
        except BudgetExhausted as stop:
            assert stop.spent <= 3.0 < stop.would_spend
            assert HospitalAccountant.from_json(acc).epsilon(res.privacy["delta"]) == stop.spent
            break
        acc = res.accountant
        assert res.privacy["epsilon"] <= 3.0
    else:
        pytest.fail("a fixed-noise hospital never reached its budget")
    assert r > 2


@settings(max_examples=14, deadline=None)  # PRV calibrations take seconds each
@given(
    budget=st.floats(0.3, 20.0),
    n=st.integers(20, 5000),
    batch=st.integers(4, 128),
    rounds=st.integers(1, 12),
    local_steps=st.integers(1, 50),
    sigma=st.one_of(st.just(0.0), st.floats(0.4, 3.0)),
    extra_rounds=st.integers(0, 4),
    accountant=st.sampled_from(["prv", "rdp"]),
)
def test_no_hospital_ever_exceeds_its_budget(
    budget, n, batch, rounds, local_steps, sigma, extra_rounds, accountant
) -> None:
    cfg = load_config(
        None,
        [
            "privacy.mode=dp-sgd",
            f"privacy.target_epsilon={budget}",
            f"privacy.noise_multiplier={sigma}",
            f"privacy.accountant={accountant}",
        ],
    ).privacy
    plan = plan_privacy(cfg, num_examples=n, batch_size=batch, planned_steps=rounds * local_steps)
    acc = HospitalAccountant(cfg.accountant)
    # Run longer than planned too: the check must stop it, whatever the configuration.
    for _ in range(rounds + extra_rounds):
        try:
            acc.check_budget(plan, local_steps)
        except BudgetExhausted:
            break
        acc.record(plan, local_steps)
        assert acc.epsilon(plan.delta) <= budget
    if sigma == 0.0:  # calibrated: the planned rounds all fit
        assert acc.steps >= rounds * local_steps


def test_accountant_round_trips_and_merges() -> None:
    cfg = load_config(None, ["privacy.mode=dp-sgd", "privacy.target_epsilon=2"]).privacy
    plan = plan_privacy(cfg, num_examples=500, batch_size=25, planned_steps=100)
    acc = HospitalAccountant(cfg.accountant)
    acc.record(plan, 10)
    acc.record(plan, 15)
    assert acc.history == [(plan.noise_multiplier, plan.sample_rate, 25)]
    again = HospitalAccountant.from_json(acc.to_json())
    assert again.history == acc.history and again.epsilon(1e-5) == acc.epsilon(1e-5)


def test_a_hospital_refuses_a_delta_of_one_over_its_size_or_more() -> None:
    # a deployed site plans its own privacy: the same refusal as the simulation's pre-flight
    cfg = load_config(None, ["privacy.mode=dp-sgd", "privacy.target_epsilon=3",
                             "privacy.delta=0.01"]).privacy  # fmt: skip
    with pytest.raises(ValueError, match=r"privacy.delta 0.01 is not below 1 / 100 "):
        plan_privacy(cfg, num_examples=100, batch_size=10, planned_steps=50)
    assert plan_privacy(cfg, num_examples=99, batch_size=10, planned_steps=50).delta == 0.01
    default = load_config(None, ["privacy.mode=dp-sgd", "privacy.target_epsilon=3"]).privacy
    # the default, 1/(10 n) capped at 1e-5, never trips it
    assert plan_privacy(default, num_examples=3, batch_size=1, planned_steps=5).delta == 1e-5


class _BadD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))


def test_unprivatizable_discriminators_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="GroupNorm") as err:
        check_privatizable(FAMILIES.get("dcgan"), _BadD())
    assert "BatchNorm" in str(err.value) and "in-place" in str(err.value)


def test_secure_mode_without_csprng_is_a_clear_error(dp_config: Config) -> None:
    import importlib.util

    if importlib.util.find_spec("torchcsprng") is not None:
        pytest.skip("torchcsprng is installed here")
    cfg = with_changes(dp_config, privacy={"secure_mode": True})
    with pytest.raises(ValueError, match="torchcsprng"):
        _run_rounds(cfg, 1)


def test_private_d_step_clears_gradients_and_g_step_skips_per_sample_hooks(
    toy_config: Config,
) -> None:
    nets = build_networks(toy_config.model, ImageShape(1, 16), seed=0)
    opts = make_optimizers(nets, toy_config.train)
    family = FAMILIES.get("dcgan")
    d = GradSampleModule(nets["discriminator"])
    from opacus.optimizers import DPOptimizer

    dp_opt = DPOptimizer(
        opts["discriminator"], noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8
    )
    real, z = torch.rand(8, 1, 16, 16) * 2 - 1, torch.randn(8, 16)
    d_step(family, nets["generator"], d, dp_opt, real, z)
    params = list(nets["discriminator"].parameters())
    assert all(p.grad is None and getattr(p, "grad_sample", None) is None for p in params)
    g_step(family, nets["generator"], d, opts["generator"], z)
    assert all(getattr(p, "grad_sample", None) is None and p.grad is None for p in params)
    assert d.hooks_enabled  # switched back on for the next private step


def test_zero_noise_clips_each_sample_to_max_grad_norm(toy_config: Config) -> None:
    """As in Opacus's own tests: with no noise, the summed update of a batch whose samples all
    exceed the clip norm has norm <= batch x max_grad_norm, and each clipped per-sample norm
    equals max_grad_norm."""
    from opacus.optimizers import DPOptimizer

    nets = build_networks(toy_config.model, ImageShape(1, 16), seed=0)
    d = GradSampleModule(nets["discriminator"])
    base = torch.optim.SGD(d.parameters(), lr=1.0)
    opt = DPOptimizer(
        base, noise_multiplier=0.0, max_grad_norm=1e-3, expected_batch_size=8, loss_reduction="mean"
    )
    real, fake = torch.rand(8, 1, 16, 16), torch.rand(8, 1, 16, 16)
    loss = FAMILIES.get("dcgan").d_loss(d(real), d(fake))
    loss.backward()
    opt.pre_step()
    per_sample = torch.stack(
        [p.grad_sample.flatten(1).norm(dim=1) for p in d.parameters() if p.grad_sample is not None]
    ).norm(dim=0)
    assert (per_sample > 1e-3).all()  # every sample needed clipping
    total = torch.cat([p.grad.flatten() for p in d.parameters()]).norm()
    assert total <= 1e-3 * 1.0001  # mean of 8 clipped samples


def test_central_noise_is_calibrated_by_flowers_own_accountant() -> None:
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    from fedgan.federated.central_dp import central_accountant, central_noise

    cfg = load_config(None, ["privacy.mode=central-dp", "privacy.target_epsilon=8"]).privacy
    sigma = central_noise(cfg, num_hospitals=10, sampled=10, rounds=5)

    def eps(s: float) -> float:
        acc = central_accountant(cfg, 10)
        acc.compose(GaussianPrivacyEvent(s, 10, 10), count=5)
        return acc.get_epsilon(acc.config.target_delta)

    assert eps(sigma) <= 8.0 < eps(sigma * 0.99)  # the smallest noise within the budget
    fixed = load_config(
        None,
        ["privacy.mode=central-dp", "privacy.target_epsilon=8", "privacy.noise_multiplier=2.5"],
    ).privacy
    assert central_noise(fixed, num_hospitals=10, sampled=10, rounds=5) == 2.5


def test_central_dp_refuses_a_delta_of_one_over_the_hospitals_or_more() -> None:
    # the server checks it too: a deployment's SuperLink runs no pre-flight
    from fedgan.federated.central_dp import central_accountant, central_noise

    def privacy(delta: float) -> PrivacySection:
        return load_config(None, ["privacy.mode=central-dp", "privacy.target_epsilon=8",
                                  f"privacy.delta={delta}"]).privacy  # fmt: skip

    with pytest.raises(ValueError, match=r"not below 1 / 10 \(the federation's hospitals\)"):
        central_noise(privacy(0.1), num_hospitals=10, sampled=10, rounds=5)
    with pytest.raises(ValueError, match="one hospital's update"):
        central_accountant(privacy(0.05), 20)
    assert central_accountant(privacy(0.05), 19).config.target_delta == 0.05  # 0.95 < 1


def test_a_resumed_central_dp_run_calibrates_for_the_whole_run() -> None:
    """After a resume the accountant starts from the releases already made, and the noise for
    the remaining rounds keeps the whole run within the budget, by Opacus's RDP accountant
    too (the Gaussian mechanism without sampling is Opacus's sample rate 1)."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent
    from opacus.accountants import RDPAccountant

    from fedgan.federated.central_dp import (
        central_accountant,
        central_noise,
        releases_from_state,
        releases_state,
    )

    cfg = load_config(None, ["privacy.mode=central-dp", "privacy.target_epsilon=8"]).privacy
    first = central_accountant(cfg, 10)
    first.compose(GaussianPrivacyEvent(3.0, 10, 10), count=2)
    prior = releases_from_state(releases_state(first))  # through the checkpoint's form
    assert prior == [(GaussianPrivacyEvent(3.0, 10, 10), 2)]
    resumed = central_accountant(cfg, 10, prior)
    assert resumed.num_releases == 2
    assert resumed.get_epsilon(1e-5) == pytest.approx(first.get_epsilon(1e-5))

    sigma = central_noise(cfg, num_hospitals=10, sampled=10, rounds=3, prior=prior)
    fresh = central_noise(cfg, num_hospitals=10, sampled=10, rounds=3)
    assert sigma > fresh  # the budget the first rounds spent is not spent again
    delta = resumed.config.target_delta
    opacus = RDPAccountant()
    opacus.history = [(3.0, 1.0, 2), (sigma, 1.0, 3)]
    assert opacus.get_epsilon(delta) <= 8.0 * 1.02
    opacus.history = [(3.0, 1.0, 2), (sigma * 0.9, 1.0, 3)]
    assert opacus.get_epsilon(delta) > 8.0

    spent = central_accountant(cfg, 10)
    spent.compose(GaussianPrivacyEvent(0.5, 10, 10), count=5)
    with pytest.raises(ValueError, match="already spent"):
        central_noise(cfg, num_hospitals=10, sampled=10, rounds=1,
                      prior=releases_from_state(releases_state(spent)))  # fmt: skip


def test_central_dp_needs_fedavg_and_a_budget() -> None:
    with pytest.raises(ValueError, match="federation.strategy=fedavg"):
        resolve(load_config(
            None,
            ["privacy.mode=central-dp", "privacy.target_epsilon=8", "federation.strategy=fedadam"],
        ))  # fmt: skip
    with pytest.raises(ValueError, match="needs a budget"):
        load_config(None, ["privacy.mode=central-dp"])


def test_central_dp_noise_cannot_leave_a_negative_variance() -> None:
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedgan.federated.central_dp import valid_statistics

    noisy = ArrayRecord(
        {
            "generator.net.1.running_var": Array(np.array([-0.3, 0.5], dtype=np.float32)),
            "generator.net.1.num_batches_tracked": Array(np.array(-2.4)),
            "generator.net.0.weight": Array(np.array([-0.3, 0.5], dtype=np.float32)),
        }
    )
    fixed = {k: a.numpy() for k, a in valid_statistics(noisy).items()}
    assert fixed["generator.net.1.running_var"].min() > 0
    assert fixed["generator.net.1.num_batches_tracked"].shape == ()  # a 0-d counter stays 0-d
    assert fixed["generator.net.1.num_batches_tracked"] == 0
    np.testing.assert_array_equal(
        fixed["generator.net.0.weight"], np.array([-0.3, 0.5], dtype=np.float32)
    )  # weights untouched


def test_a_sites_own_budget_caps_the_run_and_requires_dp(toy_config: Config) -> None:
    from fedgan.config import with_changes
    from fedgan.federated.client_app import SitePolicyError, site_config

    dp = with_changes(toy_config, privacy={"mode": "dp-sgd", "target_epsilon": 10.0})
    capped = site_config(dp, {"max-epsilon": 3.0, "device": "cpu"})
    assert capped.privacy.target_epsilon == 3.0 and capped.train.device == "cpu"
    assert site_config(dp, {"max-epsilon": 30.0}).privacy.target_epsilon == 10.0
    assert site_config(dp, {}) == dp
    with pytest.raises(SitePolicyError, match="privacy.mode=dp-sgd"):
        site_config(toy_config, {"max-epsilon": 3.0})


@pytest.mark.parametrize(
    ("diff_augment", "views"), [("", 1), ("color,translation,cutout", 1), ("translation", 3)]
)
def test_physical_batches_give_the_same_private_step(
    toy_config: Config, diff_augment: str, views: int
) -> None:
    """A Poisson batch run in parts of 3 pairs makes the same update as in one part: each
    pair is clipped on its own and the parts' clipped sums add up before the noisy step.
    DiffAugment's draws travel with their images, so each part transforms its rows alike,
    and with several views a part keeps every view of its pairs."""
    base = with_changes(
        toy_config,
        # the same seeds draw the same Poisson batches and the same noise in both runs
        privacy={"mode": "dp-sgd", "target_epsilon": 50.0, "noise_multiplier": 1.0},
        train={
            "batch_size": 16,
            "local_steps": 2,
            "n_critic": 1,
            "diff_augment": diff_augment,
            "diff_augment_views": views,
        },
        data={"num_images": 240},
    )
    ds = hospital_dataset(base.data, 0, 0, 3)
    state = pack_state(build_networks(base.model, config_shape(base), seed=0))
    whole = local_round(base, ds, state, None, round_=1, hospital=0)
    parts = local_round(with_changes(base, privacy={"max_physical_batch": 3}), ds, state, None,
                        round_=1, hospital=0)  # fmt: skip
    assert any(not torch.equal(whole.state[k], state[k]) for k in state)  # it trained
    for key in state:
        torch.testing.assert_close(parts.state[key], whole.state[key], atol=1e-5, rtol=1e-4)
    assert parts.privacy["dp_steps"] == whole.privacy["dp_steps"] == 2
    with pytest.raises(ValueError, match="privacy.max_physical_batch"):
        load_config(None, ["privacy.grad_sample_mode=ew", "privacy.max_physical_batch=8"])


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_rdp_order_warning_is_kept_only_where_it_speaks_of_the_reported_epsilon(
    accountant: str,
) -> None:
    # Opacus's PRV accountant sizes its domain with an internal RDP bound, which warns for a
    # large sigma or a search's low one; the PRV epsilon is not that bound, so under prv the
    # warning is noise in every private run's log. Under rdp it is about the reported figure.
    cfg = load_config(
        None,
        ["privacy.mode=dp-sgd", "privacy.target_epsilon=10", f"privacy.accountant={accountant}"],
    ).privacy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # planned_steps not used elsewhere, so plan_privacy's cache cannot answer for it
        plan = plan_privacy(cfg, num_examples=941, batch_size=16, planned_steps=241)
        epsilon = HospitalAccountant(accountant, history=[(20.0, 0.01, 1)]).epsilon(1e-5)
    order_warnings = [w for w in caught if RDP_ORDER_WARNING in str(w.message)]
    assert 0.4 < plan.noise_multiplier < 0.7  # the search still ran
    assert 0 < epsilon < 0.2
    assert (len(order_warnings) > 0) == (accountant == "rdp")
