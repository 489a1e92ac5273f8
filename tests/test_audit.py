"""Membership-inference audit: the attacks, the empirical epsilon bound, ``fedgan audit``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedgan.cli import main
from fedgan.config import Config, with_changes
from fedgan.data import eval_dataset, pooled_dataset
from fedgan.evaluation.membership import (
    domias_scores,
    epsilon_lower_bound,
    gan_leaks_scores,
    logan_scores,
    summarize,
)
from fedgan.models import build_networks, load_state, pack_state
from fedgan.runs.audit import audit_run
from fedgan.training.hospital import config_shape, local_round


def gdp_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon(delta) of mu-Gaussian DP (Dong, Roth & Su 2019): independent of
    fedgan's bound, which must never exceed it."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def gap(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return float(brentq(gap, 0.0, 100.0))


@pytest.mark.parametrize("mu", [1.0, 2.0])
def test_the_epsilon_bound_is_valid_and_has_power_on_a_gaussian_mechanism(mu: float) -> None:
    """Scores of members ~ N(mu, 1) and non-members ~ N(0, 1) are exactly what the best
    attack on a mu-GDP mechanism sees: the bound stays below the true epsilon (it is a 95 %
    bound: at most a rare seed may pass it) and still finds a good part of it."""
    true = gdp_epsilon(mu, 1e-5)
    bounds = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        members, nonmembers = rng.normal(mu, 1, 2000), rng.normal(0, 1, 2000)
        bounds.append(epsilon_lower_bound(members, nonmembers, delta=1e-5, seed=seed))
    assert sum(b > true for b in bounds) <= 1
    assert np.mean(bounds) > 0.25 * true


def test_an_attack_that_sees_nothing_bounds_nothing() -> None:
    rng = np.random.default_rng(0)
    result = summarize(rng.normal(0, 1, 1000), rng.normal(0, 1, 1000), delta=1e-5)
    assert abs(result.auc - 0.5) < 0.05
    assert result.epsilon_lower_bound < 0.3 and result.tpr_at_1pct < 0.05


@pytest.fixture
def images(toy_config: Config) -> dict[str, torch.Tensor]:
    cfg = with_changes(toy_config, data={"num_images": 700, "eval_fraction": 0.0})
    pool = pooled_dataset(cfg.data, 0, 1).tensors[0]
    return {"members": pool[:120], "nonmembers": pool[120:240], "reference": pool[240:360],
            "disjoint": pool[360:700]}  # fmt: skip


def test_black_box_attacks_catch_a_copying_generator_and_not_an_innocent_one(
    images: dict[str, torch.Tensor],
) -> None:
    m, n, ref = images["members"], images["nonmembers"], images["reference"]
    g = torch.Generator().manual_seed(0)
    copying = (m.repeat(3, 1, 1, 1) + 0.02 * torch.randn(360, *m.shape[1:], generator=g)).clamp(
        -1, 1
    )
    innocent = images["disjoint"]  # same distribution, never saw a member
    for attack in (gan_leaks_scores, domias_scores):
        caught = summarize(attack(m, copying, ref), attack(n, copying, ref), delta=1e-5)
        clean = summarize(attack(m, innocent, ref), attack(n, innocent, ref), delta=1e-5)
        assert caught.auc > 0.9, attack.__name__
        assert abs(clean.auc - 0.5) < 0.12, attack.__name__
        assert clean.epsilon_lower_bound < caught.epsilon_lower_bound


def _trained_discriminator(cfg: Config, data: torch.Tensor, steps: int) -> torch.nn.Module:
    cfg = with_changes(cfg, train={"local_steps": steps, "lr_d": 2e-3})
    ds = TensorDataset(data, torch.zeros(len(data), dtype=torch.long))
    state = pack_state(build_networks(cfg.model, config_shape(cfg), seed=0))
    result = local_round(cfg, ds, state, None, round_=1, hospital=0)
    nets = build_networks(cfg.model, config_shape(cfg), seed=0)
    load_state(nets, result.state)
    return nets["discriminator"]


def test_logan_sees_a_discriminator_overfit_to_a_handful_of_images(
    toy_config: Config, images: dict[str, torch.Tensor]
) -> None:
    handful, others = images["members"][:8], images["nonmembers"][:64]
    overfit = _trained_discriminator(toy_config, handful, 600)
    caught = summarize(logan_scores(overfit, handful), logan_scores(overfit, others), delta=1e-5)
    assert caught.auc > 0.8
    never_saw = _trained_discriminator(toy_config, images["disjoint"][:8], 600)
    clean = summarize(logan_scores(never_saw, handful), logan_scores(never_saw, others),
                      delta=1e-5)  # fmt: skip
    assert abs(clean.auc - 0.5) < 0.25  # 8 against 64 images: the AUC's own spread is ~0.1


def test_a_private_runs_empirical_epsilon_stays_below_its_accounted_epsilon(
    toy_config: Config,
) -> None:
    cfg = with_changes(
        toy_config,
        data={"num_images": 240, "eval_fraction": 0.4},
        federation={"num_hospitals": 1, "num_rounds": 2},
        privacy={"mode": "dp-sgd", "target_epsilon": 2.0},
        train={"local_steps": 10},
    )
    ds = TensorDataset(*pooled_dataset(cfg.data, cfg.run.seed, 1).tensors)
    state = pack_state(build_networks(cfg.model, config_shape(cfg), seed=0))
    acc, opt = None, None
    for r in (1, 2):
        res = local_round(cfg, ds, state, opt, round_=r, hospital=0, accountant=acc)
        state, acc, opt = res.state, res.accountant, res.optimizer_state
    records = [{"hospitals": {"hospital_0": {"epsilon": res.privacy["epsilon"],
                                             "delta": res.privacy["delta"]}}}]  # fmt: skip
    assert len(eval_dataset(cfg.data, cfg.run.seed, 1)) >= 40
    audit = audit_run(cfg, state, records, num_generated=300)
    assert audit["accounted_epsilon"] == res.privacy["epsilon"] <= 2.0
    for name in ("logan", "gan_leaks", "domias"):
        assert audit["attacks"][name]["epsilon_lower_bound"] <= audit["accounted_epsilon"], name
        assert 0.0 <= audit["attacks"][name]["auc"] <= 1.0


def test_fedgan_audit_writes_its_report_and_refuses_bad_input(
    toy_config: Config, toy_overrides: list[str], tmp_path, capsys
) -> None:
    overrides = [*toy_overrides, f"run.output_dir={tmp_path}", "run.name=audited",
                 "data.num_images=240", "data.eval_fraction=0.4", "eval.metrics=",
                 "eval.final_metrics="]  # fmt: skip
    assert main(["centralized", *[arg for o in overrides for arg in ("--set", o)]]) == 0
    run = tmp_path / "audited"
    assert main(["audit", "--run", str(run), "--max-images", "5"]) == 2
    assert "at least 20" in capsys.readouterr().err
    assert not (run / "audit.json").exists()
    assert main(["audit", "--run", str(run), "--nonmembers", "val"]) == 2  # the phantom has none
    assert "--nonmembers eval" in capsys.readouterr().err
    assert not (run / "audit.json").exists()
    assert main(["audit", "--run", str(run), "--num-generated", "200"]) == 0
    report = json.loads((run / "audit.json").read_text())
    assert set(report["attacks"]) == {"logan", "gan_leaks", "domias"}
    assert report["members"] == report["nonmembers"] >= 20
    assert report["nonmember_source"] == "evaluation split"
    assert report["accounted_epsilon"] is None  # a run without DP-SGD: nothing accounted
    assert "logan" in capsys.readouterr().out


def test_medmnist_non_members_come_from_the_training_pool_not_the_test_collection(
    pneumonia_npz,
) -> None:
    """PneumoniaMNIST's test split is another collection (another class mix): the audit
    draws non-members from the validation split, cut from the training pool."""
    from fedgan.config import load_config
    from fedgan.runs.audit import audit_sets, heldout

    cfg = load_config(None, ["data.source=medmnist", f"data.path={pneumonia_npz}",
                             "federation.num_hospitals=5"])  # fmt: skip
    held, name = heldout(cfg, "auto")
    assert name == "medmnist validation split" and len(held) == 524
    members, m_y, nonmembers, n_y, reference = audit_sets(cfg, max_images=200, seed=0)
    assert len(members) == len(nonmembers) and len(reference) == 262
    assert torch.equal(m_y.sort().values, n_y.sort().values)  # the same class mix
