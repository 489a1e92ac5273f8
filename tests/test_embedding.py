"""The generator's moment-matching term (``train.embedding_weight``, DP-MERF) and the one-off
release its target costs under DP-SGD."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedgan.config import Config, with_changes
from fedgan.data import hospital_dataset
from fedgan.experiment import resolve
from fedgan.models import build_networks, pack_state
from fedgan.privacy import HospitalAccountant
from fedgan.training.embedding import (
    RELEASE,
    RandomFeatures,
    embedding_loss,
    embedding_noise,
    embedding_weight,
    hospital_target,
    informative,
    smallest_release,
)
from fedgan.training.hospital import config_shape, local_round
from fedgan.training.objectives import make_objective


def _pld(sigma_release: float, steps: list[tuple[float, float, int]], delta: float) -> float:
    """Google dp-accounting's PLD epsilon of one Gaussian mechanism composed with DP-SGD steps:
    an implementation independent of Opacus."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.GaussianDpEvent(sigma_release))
    for sigma, q, n in steps:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, n))
    return float(acc.get_epsilon(delta))


def test_each_image_has_a_unit_norm_feature_vector_so_the_sum_has_sensitivity_one() -> None:
    features = RandomFeatures(pixels=64, features=200, bandwidth=0.0, seed=3)
    x = torch.rand(50, 1, 8, 8) * 2 - 1
    norms = features(x).norm(dim=1)
    assert torch.allclose(norms, torch.ones(50), atol=1e-5)
    # adding one image moves the sum by exactly its own (unit) vector
    with_one = features.total(torch.cat([x, x[:1] * 0.3]))
    assert float((with_one - features.total(x)).norm()) == pytest.approx(1.0, abs=1e-5)
    assert features.bandwidth == pytest.approx(0.15 * 8)  # the data-free rule: 0.15 sqrt(64)


def test_the_embedding_distance_estimates_the_gaussian_kernel_mmd() -> None:
    """Against the exact (biased, V-statistic) MMD^2 of the Gaussian kernel the features
    approximate: k(x, y) = exp(-||x - y||^2 / (2 h^2))."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g)
    b = torch.randn(200, 16, generator=g) * 1.5 + 0.5
    h = 4.0

    def k(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(x, y).pow(2) / (2 * h * h))

    exact = float(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())
    features = RandomFeatures(pixels=16, features=40_000, bandwidth=h, seed=1)
    target = features.total(a).float() / len(a)
    estimate = float(embedding_loss(features, b, target))
    assert exact > 0.05
    assert estimate == pytest.approx(exact, rel=0.1)
    assert float(embedding_loss(features, a, target)) < 1e-6  # its own data: no pull


def test_a_release_is_charged_as_one_gaussian_mechanism_composed_with_the_steps() -> None:
    acc = HospitalAccountant("prv")
    acc.release(RELEASE, 2.0, [0.5, -1.25, 3.0])
    delta = 1e-5
    # the release alone: the Gaussian mechanism at sigma 2 (Balle & Wang's exact analysis
    # reads 2.0 at this delta)
    assert acc.epsilon(delta) == pytest.approx(_pld(2.0, [], delta), abs=0.02)
    acc.history = [(1.8, 1 / 15, 2400)]
    assert acc.epsilon(delta) == pytest.approx(_pld(2.0, acc.history, delta), abs=0.03)
    assert acc.steps == 2400  # a release is not a DP-SGD step
    again = HospitalAccountant.from_json(acc.to_json())
    assert again.released(RELEASE) == [0.5, -1.25, 3.0]
    assert again.epsilon(delta) == pytest.approx(acc.epsilon(delta))
    with pytest.raises(ValueError, match="already released"):
        again.release(RELEASE, 2.0, [0.0])


def test_sigma_is_calibrated_for_the_steps_after_the_release(toy_config: Config) -> None:
    cfg = with_changes(toy_config, privacy={"mode": "dp-sgd", "target_epsilon": 4.0}).privacy
    plain = HospitalAccountant("prv").plan(cfg, num_examples=200, batch_size=20,
                                           planned_steps=300)  # fmt: skip
    acc = HospitalAccountant("prv")
    acc.release(RELEASE, 3.0, [1.0])
    plan = acc.plan(cfg, num_examples=200, batch_size=20, planned_steps=300)
    assert plan.noise_multiplier > plain.noise_multiplier
    steps = [(plan.noise_multiplier, plan.sample_rate, 300)]
    spent = _pld(3.0, steps, plan.delta)
    assert 4.0 - 0.05 <= spent <= 4.0 + 0.01  # the budget is used, and not passed
    assert acc.check_budget(plan, 300) <= 4.0
    greedy = HospitalAccountant("prv")
    greedy.release(RELEASE, 0.5, [1.0])  # the release alone spends more than 4
    with pytest.raises(ValueError, match="privacy.embedding_noise"):
        greedy.plan(cfg, num_examples=200, batch_size=20, planned_steps=300)


@pytest.fixture
def dp_embedding(toy_config: Config) -> Config:
    return with_changes(
        toy_config,
        privacy={"mode": "dp-sgd", "target_epsilon": 8.0, "embedding_noise": 2.0},
        federation={"num_rounds": 2},
        train={"local_steps": 2, "critic_schedule": "fixed", "n_critic": 3,
               "embedding_weight": 10.0, "embedding_features": 64},
    )  # fmt: skip


def test_a_private_hospital_releases_its_embedding_once_and_is_charged_for_it(
    dp_embedding: Config,
) -> None:
    ds = hospital_dataset(dp_embedding.data, 0, 0, 3)
    state = pack_state(build_networks(dp_embedding.model, config_shape(dp_embedding), seed=0))
    first = local_round(dp_embedding, ds, state, None, round_=1, hospital=0)
    acc = HospitalAccountant.from_json(first.accountant)
    released = acc.released(RELEASE)
    assert released is not None and len(released) == 64
    # the noise is there: the release is not the exact sum
    exact = RandomFeatures.for_config(dp_embedding).total(ds.tensors[0])
    assert float((torch.tensor(released, dtype=torch.float64) - exact).norm()) > 1.0
    p = first.privacy
    steps = [(p["noise_multiplier"], p["sample_rate"], p["dp_steps"])]
    assert p["dp_steps"] == 6
    assert p["epsilon"] == pytest.approx(_pld(2.0, steps, p["delta"]), abs=0.03)
    second = local_round(dp_embedding, ds, first.state, first.optimizer_state, round_=2,
                         hospital=0, accountant=first.accountant)  # fmt: skip
    after = HospitalAccountant.from_json(second.accountant)
    assert after.released(RELEASE) == released  # reused, not drawn again
    assert list(after.releases) == [RELEASE]
    assert second.privacy["noise_multiplier"] == p["noise_multiplier"]
    assert second.privacy["epsilon"] <= 8.0
    # without the term the same round is calibrated for the steps alone: less noise
    plain = with_changes(dp_embedding, train={"embedding_weight": 0.0})
    alone = local_round(plain, ds, state, None, round_=1, hospital=0)
    assert alone.privacy["noise_multiplier"] < p["noise_multiplier"]
    assert "releases" not in alone.accountant


def test_a_hospital_too_small_for_a_useful_release_releases_nothing(
    dp_embedding: Config, independent_epsilon
) -> None:
    """sqrt(2000) x 2 / 32 images = 2.8 > 1: the noise would outweigh any mean embedding, so
    the hospital spends nothing on it and trains without the term."""
    cfg = with_changes(dp_embedding, train={"embedding_features": 2000})
    ds = hospital_dataset(cfg.data, 0, 0, 3)
    assert not informative(cfg, len(ds))
    assert informative(dp_embedding, len(ds))  # 64 features: sqrt(64) x 2 / 32 = 0.5
    # the boundary: sqrt(2000) x 2 = 89.4, so 90 images release and 89 do not
    assert smallest_release(cfg) == 90
    assert informative(cfg, 90) and not informative(cfg, 89)
    state = pack_state(build_networks(cfg.model, config_shape(cfg), seed=0))
    result = local_round(cfg, ds, state, None, round_=1, hospital=0)
    assert HospitalAccountant.from_json(result.accountant).releases == {}
    p = result.privacy
    assert p["release_noise"] == 0
    pld = independent_epsilon(p["noise_multiplier"], p["sample_rate"], p["dp_steps"], p["delta"])
    assert abs(p["epsilon"] - pld) <= 0.02


def test_the_term_pulls_the_generator_towards_the_data(toy_config: Config) -> None:
    """A generator step with the term lowers the embedding distance; the same step without
    it leaves the distance where the adversarial loss puts it."""
    cfg = with_changes(toy_config, train={"embedding_weight": 100.0, "lr_g": 5e-3})
    ds = hospital_dataset(cfg.data, 0, 0, 3)
    objective = make_objective(cfg)
    target = hospital_target(cfg, ds, None, noise=None)
    # a mean of unit feature vectors: finite, and of norm at most 1
    assert torch.isfinite(target).all() and 0 < float(target.norm()) <= 1
    objective.embedding_target = target  # type: ignore[attr-defined]
    nets = build_networks(cfg.model, config_shape(cfg), seed=0)
    opt = torch.optim.Adam(nets["generator"].parameters(), lr=5e-3, betas=(0.5, 0.999))
    z = torch.randn(64, cfg.model.latent_dim, generator=torch.Generator().manual_seed(1))

    def distance() -> float:
        with torch.no_grad():
            return float(embedding_loss(objective.embedding, nets["generator"](z), target))  # type: ignore[attr-defined]

    before = distance()
    from fedgan.training.loop import phase_step
    from fedgan.training.objectives import StepContext

    ctx = StepContext.seeded(0, torch.device("cpu"))
    for _ in range(30):
        batch = objective.free_batch("G", None, ctx)
        phase_step(objective, objective.phase("G"), nets, {"generator": opt}, batch, ctx)
    assert distance() < 0.5 * before


def test_the_term_is_refused_where_it_cannot_apply(toy_config: Config) -> None:
    on = {"embedding_weight": 1.0}
    with pytest.raises(ValueError, match="train.embedding_weight"):
        resolve(with_changes(toy_config, train=on, model={"family": "cgan"}))
    with pytest.raises(ValueError, match="train.embedding_weight"):
        resolve(with_changes(toy_config, train=on, task={"name": "enhance"}))
    with pytest.raises(ValueError, match="train.embedding_features"):
        with_changes(toy_config, train={"embedding_features": 7})
    with pytest.raises(ValueError, match="privacy.embedding_noise"):
        with_changes(toy_config, privacy={"embedding_noise": -1.0})
    # a release that alone spends the budget is refused before anything runs
    greedy = {"mode": "dp-sgd", "target_epsilon": 1.0, "embedding_noise": 0.5}
    with pytest.raises(ValueError, match="privacy.embedding_noise.*alone spends epsilon"):
        resolve(with_changes(toy_config, privacy=greedy))
    resolve(with_changes(toy_config, privacy={**greedy, "embedding_noise": 20.0}))
    # 0: the release's sigma follows the budget (20 / epsilon)
    for budget, sigma in ((10.0, 2.0), (4.0, 5.0)):
        cfg = with_changes(toy_config, privacy={"mode": "dp-sgd", "target_epsilon": budget})
        assert embedding_noise(cfg) == pytest.approx(sigma)
    objective = make_objective(with_changes(toy_config, train=on))
    with pytest.raises(RuntimeError, match="no embedding target"):
        ctx_free = objective.free_batch("G", None, _ctx())
        nets = build_networks(toy_config.model, config_shape(toy_config), seed=0)
        objective.accumulate_gradients("G", nets, ctx_free, _ctx())


def test_the_default_weight_follows_the_budget(toy_config: Config) -> None:
    """-1: 3 * sqrt(10 / epsilon), at least 5 (5 * sqrt(10 / epsilon) above epsilon 10), up
    to 10, under DP-SGD for an unconditional synthesis family (the noisier the discriminator,
    the harder the pull); 0 everywhere else."""

    def weight(privacy: dict, **changes: dict) -> float:  # type: ignore[type-arg]
        cfg = with_changes(toy_config, privacy=privacy, **changes)
        return embedding_weight(cfg, conditional=make_objective(cfg).family.conditional)

    budgets = ((10.0, 5.0), (6.0, 5.0), (3.0, 5.477), (1.0, 9.487), (0.5, 10.0), (40.0, 2.5))
    for budget, expected in budgets:
        assert weight({"mode": "dp-sgd", "target_epsilon": budget}) == pytest.approx(
            expected, abs=1e-3
        )
    assert weight({"mode": "none"}) == 0.0
    assert weight({"mode": "central-dp", "target_epsilon": 1.0}) == 0.0
    private = {"mode": "dp-sgd", "target_epsilon": 1.0}
    assert weight(private, model={"family": "cgan"}) == 0.0
    assert weight(private, train={"embedding_weight": 0.0}) == 0.0
    assert weight(private, train={"embedding_weight": 2.5}) == 2.5


def test_a_private_run_says_what_the_defaults_resolved_to(
    toy_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedgan.cli import _print_privacy

    _print_privacy(toy_config)
    assert capsys.readouterr().out == ""  # no DP: nothing to say
    _print_privacy(with_changes(toy_config, privacy={"mode": "dp-sgd", "target_epsilon": 1.0}))
    line = capsys.readouterr().out
    # 3 * sqrt(10), sigma 20 / 1, and n >= sqrt(2000) * 20 = 894.4, so 895 images at the least
    assert "epsilon 1 per hospital" in line and "weight 9.49" in line
    assert "sigma 20 " in line and "895 images or more" in line
    # a short plan at a small budget is told that more rounds help (study 35); a long one or
    # a larger budget is not
    assert "raise federation.num_rounds" in line
    long_plan = with_changes(toy_config, privacy={"mode": "dp-sgd", "target_epsilon": 1.0},
                             federation={"num_rounds": 40})  # fmt: skip
    _print_privacy(long_plan)
    assert "num_rounds" not in capsys.readouterr().out
    _print_privacy(with_changes(toy_config, privacy={"mode": "dp-sgd", "target_epsilon": 3.0}))
    assert "num_rounds" not in capsys.readouterr().out
    warm = with_changes(toy_config, privacy={"mode": "dp-sgd", "target_epsilon": 1.0},
                        model={"init_from": "runs/public"})  # fmt: skip
    _print_privacy(warm)
    assert "num_rounds" not in capsys.readouterr().out
    # under label skew the longer plan was measured both ways (study 39): no advice
    skewed = with_changes(toy_config, privacy={"mode": "dp-sgd", "target_epsilon": 1.0},
                          data={"partition": "dirichlet"})  # fmt: skip
    _print_privacy(skewed)
    assert "num_rounds" not in capsys.readouterr().out
    private = {"mode": "dp-sgd", "target_epsilon": 3.0, "delta": 1e-6}
    _print_privacy(with_changes(toy_config, privacy=private, train={"embedding_weight": 0.0}))
    line = capsys.readouterr().out
    assert "delta 1e-06" in line and "no embedding term" in line
    # the pooled baseline keeps the recipe but is not private, and must not claim a budget
    _print_privacy(with_changes(toy_config, privacy=private), pooled=True)
    line = capsys.readouterr().out
    assert "without DP" in line and "weight 5.48" in line and "epsilon" not in line


def test_a_comparison_tells_each_short_private_arm_to_train_longer(tmp_path: Path) -> None:
    """``fedgan compare`` says the advice ``fedgan simulate`` says, once per arm it concerns.
    The shipped budget plan gives its IID epsilon = 1 arm 40 rounds, so it draws none; the
    same plan with that arm at the config's 20 rounds names exactly it, and no other (the
    Dirichlet one, where 40 rounds diverged on a seed; epsilon 10 and 3, the non-private arms,
    the pooled baseline)."""
    from dataclasses import replace

    from fedgan.cli import plan_advice
    from fedgan.studies import load_study

    plan = load_study(Path(__file__).resolve().parents[1] / "simulations" / "dp-as-shipped.yaml")
    assert plan_advice(plan, tmp_path) == []
    rounds = {a.name: plan.arm_config(a, tmp_path).federation.num_rounds for a in plan.arms}
    assert rounds["eps-1-iid"] == 40 == 2 * rounds["eps-1-dirichlet"] == 2 * rounds["eps-10-iid"]

    def at_20(arm):  # type: ignore[no-untyped-def]
        kept = tuple(o for o in arm.overrides if not o.startswith("federation.num_rounds="))
        return replace(arm, overrides=kept)

    short = replace(plan, arms=tuple(at_20(a) for a in plan.arms))
    lines = plan_advice(short, tmp_path)
    assert [line.split(":")[0] for line in lines] == ["arm eps-1-iid"]
    assert "20 rounds may leave it short" in lines[0] and "IID hospitals" in lines[0]


def _ctx():  # type: ignore[no-untyped-def]
    from fedgan.training.objectives import StepContext

    return StepContext.seeded(0, torch.device("cpu"))
