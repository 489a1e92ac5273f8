"""Evaluation: distances, PRDC, diversity, memorization, TSTR, caching and the evaluator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedgan.config import Config, load_config, with_changes
from fedgan.evaluation import functional as fn
from fedgan.evaluation.features import DomainFeatures, InceptionFeatures
from fedgan.evaluation.metrics import METRICS, classifier_auc
from fedgan.experiment import resolve
from fedgan.rundir import RunDir
from fedgan.runs.centralized import train_centralized


def _features(n: int = 600, d: int = 16, seed: int = 0) -> torch.Tensor:
    """A sample (seeded by ``seed``) of one fixed correlated Gaussian distribution."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(1234)) * 0.3
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix


def test_distances_are_zero_for_the_same_set_and_grow_with_noise() -> None:
    x = _features()
    assert fn.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    fds = [fn.frechet_distance(x, x + s * noise) for s in (0.1, 0.3, 0.6, 1.0)]
    kds = [fn.kernel_distance(x, x + s * noise)[0] for s in (0.1, 0.3, 0.6, 1.0)]
    assert fds == sorted(fds) and fds[0] > 0
    assert kds == sorted(kds)
    # KID is unbiased: for an independent sample of the same distribution it is about 0 (the
    # same set against itself is biased low, its cross term pairing each point with itself).
    same_dist = [fn.kernel_distance(x, _features(seed=s))[0] for s in (1, 2, 3)]
    assert abs(float(np.mean(same_dist))) < 0.1 * kds[-1]


def test_fd_matches_a_known_shift() -> None:
    x = _features()
    shifted = x + torch.tensor([2.0] + [0.0] * 15)
    assert fn.frechet_distance(x, shifted) == pytest.approx(4.0, rel=1e-6)  # ||mu1-mu2||^2


def test_prdc_identical_and_disjoint_sets() -> None:
    x = _features()
    same = fn.prdc(x, x)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    # each point lies in its own ball and in its k neighbours' balls: (k + 1) / k
    assert same["density"] == pytest.approx(6 / 5)
    assert fn.prdc(x, torch.cat([x[300:], x[:300]])) == same  # order does not matter
    indep = fn.prdc(x, _features(seed=1))  # a second sample of the same distribution
    assert indep["precision"] > 0.8 and indep["recall"] > 0.8 and indep["coverage"] > 0.8
    assert indep["density"] == pytest.approx(1.0, abs=0.25)
    far = fn.prdc(x, x + 100.0)
    assert far["coverage"] == 0.0 and far["precision"] == 0.0 and far["density"] == 0.0


def test_diversity_flags_mode_collapse() -> None:
    from fedgan.data.phantom import render_phantoms

    images = render_phantoms(64, 32, seed=0)[0] * 2 - 1
    collapsed = images[:1].repeat(64, 1, 1, 1)
    assert fn.pairwise_ssim(collapsed) == pytest.approx(1.0, abs=1e-4)
    assert fn.pairwise_ssim(images) < 0.95


def test_memorization_flags_a_generator_that_returns_training_images() -> None:
    from fedgan.data.phantom import render_phantoms

    pool = render_phantoms(500, 16, seed=3)[0] * 2 - 1
    train, heldout, fresh = pool[:300], pool[300:400], pool[400:]
    copier = fn.copy_statistics(train[:100], train, heldout)
    honest = fn.copy_statistics(fresh, train, heldout)
    assert copier["copy_fraction"] == 1.0 and copier["nn_ratio"] < 1e-6
    assert honest["copy_fraction"] < 0.3 and 0.7 < honest["nn_ratio"] < 1.4


@pytest.mark.slow
def test_tstr_on_pneumoniamnist_real_data_and_noise(pneumonia_npz) -> None:
    with np.load(pneumonia_npz) as d:

        def load(split: str, n: int):
            x = torch.from_numpy(d[f"{split}_images"][:n]).float().unsqueeze(1) / 127.5 - 1
            return x, torch.from_numpy(d[f"{split}_labels"][:n, 0].astype(np.int64))

        train_x, train_y = load("train", 1500)
        test_x, test_y = load("test", 624)
    real_auc = classifier_auc(train_x, train_y, test_x, test_y, epochs=4)
    assert real_auc > 0.85
    # A "generator" whose images carry no label information: pure noise images, or real
    # images with shuffled labels. Any single classifier is then an arbitrary function of the
    # real test images, which correlates with their labels one way or the other by chance;
    # averaged over seeds it sits at chance.
    # (500 training images each: chance needs no more, and the test stays within CI's time.)
    g = torch.Generator().manual_seed(0)
    few_x, few_y = train_x[:500], train_y[:500]
    noise_aucs = [
        classifier_auc(
            torch.rand(few_x.shape, generator=g) * 2 - 1, few_y, test_x, test_y, epochs=2, seed=s
        )
        for s in range(6)
    ]
    shuffled_aucs = [
        classifier_auc(
            few_x, few_y[torch.randperm(len(few_y), generator=g)], test_x, test_y, epochs=2, seed=s
        )
        for s in range(6)
    ]
    assert 0.3 < float(np.mean(noise_aucs)) < 0.7
    assert 0.3 < float(np.mean(shuffled_aucs)) < 0.7


def test_domain_features_are_cached_and_invalidated(tmp_path) -> None:
    from fedgan.data.phantom import render_phantoms

    x, y = render_phantoms(64, 16, seed=0)
    x = x * 2 - 1
    first = DomainFeatures(x, y, tmp_path, torch.device("cpu"), epochs=1)
    again = DomainFeatures(x, y, tmp_path, torch.device("cpu"), epochs=1)
    assert not first.cache_hit and again.cache_hit
    assert torch.allclose(first(x[:8]), again(x[:8]))
    changed = DomainFeatures(x.flip(-1), y, tmp_path, torch.device("cpu"), epochs=1)
    assert not changed.cache_hit and changed.cache_path != first.cache_path
    assert len(list(tmp_path.glob("domain_*.pt"))) == 2


def test_unknown_metric_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="eval.metrics.*known:"):
        resolve(load_config(None, ["eval.metrics=fid_2k,best_metric"]))
    assert {"fid_2k", "kid_2k", "domain_fd_1k", "tstr_auc", "memorization_1k"} <= set(METRICS)


def test_evaluator_writes_metrics_curves_and_pictures(toy_config: Config) -> None:
    cfg = with_changes(
        toy_config, eval={"metrics": "domain_fd_1k,domain_prdc_1k,ms_ssim_diversity"}
    )
    summary = train_centralized(cfg, log=lambda _: None)
    rd = RunDir(cfg.run_dir)
    records = rd.read_metrics()
    for r in records:
        assert {"domain_fd_1k", "domain_precision", "ms_ssim_diversity"} <= set(r["eval"])
    last = records[-1]["eval"]
    assert "memorization_copy_fraction" in last  # final metrics at the last round
    assert summary["metrics_skipped"]["tstr_auc"].startswith("needs a conditional generator")
    assert (rd.path / "metrics.png").stat().st_size > 0
    assert (rd.samples / "memorization_0002.png").exists()


@pytest.mark.slow
def test_inception_fid_and_kid_with_the_standard_weights(inception_weights) -> None:
    from fedgan.data.phantom import render_phantoms

    images = render_phantoms(80, 64, seed=0)[0] * 2 - 1
    incep = InceptionFeatures(str(inception_weights), torch.device("cpu"))
    real = incep(images[:40])
    assert real.shape == (40, 2048)
    assert fn.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-3)
    g = torch.Generator().manual_seed(0)
    fids = []
    for s in (0.0, 0.2, 0.5):
        noisy = (images[40:] + s * torch.randn(images[40:].shape, generator=g)).clamp(-1, 1)
        fids.append(fn.frechet_distance(real, incep(noisy)))
    assert fids == sorted(fids)
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        InceptionFeatures("/nonexistent/weights.pth", torch.device("cpu"))


def test_evaluate_cli_appends_to_metrics(
    toy_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedgan.cli import main

    train_centralized(toy_config, log=lambda _: None)
    assert main(["evaluate", "--run", str(toy_config.run_dir), "--metrics", "domain_kd_1k"]) == 0
    last = RunDir(toy_config.run_dir).read_metrics()[-1]
    assert last["mode"] == "evaluate" and "domain_kd_1k" in last["eval"]
    assert main(["evaluate", "--run", str(toy_config.run_dir / "nope")]) == 2
    json.dumps(last)
    # Several runs: every one is read before any is evaluated, so a typo in the last run or
    # metric appends nothing to the first.
    lines = len(RunDir(toy_config.run_dir).read_metrics())
    assert main(["evaluate", "--run", str(toy_config.run_dir), str(toy_config.run_dir / "nope"),
                 "--metrics", "domain_kd_1k"]) == 2  # fmt: skip
    assert main(["evaluate", "--run", str(toy_config.run_dir), str(toy_config.run_dir),
                 "--metrics", "domain_kd_1k,no_such_metric"]) == 2  # fmt: skip
    assert len(RunDir(toy_config.run_dir).read_metrics()) == lines
    # nothing computable (a paired metric of a synthesis run, TSTR of an unconditional one):
    # one line with each metric's reason, exit 2, and no empty record appended
    lines = len(RunDir(toy_config.run_dir).read_metrics())
    capsys.readouterr()
    assert main(["evaluate", "--run", str(toy_config.run_dir), "--metrics", "psnr,tstr_auc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fedgan: error: no metric computed"), err
    assert "psnr: a paired metric" in err and "tstr_auc: needs a conditional generator" in err
    assert len(RunDir(toy_config.run_dir).read_metrics()) == lines


def test_curves_leave_out_timings_and_spreads() -> None:
    from fedgan.report.plots import series

    records = [
        {
            "round": r,
            "aggregate": {"d_loss": 1.0 / r},
            "eval": {
                "domain_fd_1k": 2.0 / r,
                "seconds_domain_fd_1k": 0.1,
                "domain_kd_1k_std": 0.1,
            },
        }
        for r in (1, 2)
    ]
    data = series(records)
    assert set(data) == {"d_loss", "domain_fd_1k"}
    assert data["domain_fd_1k"] == ([1, 2], [2.0, 1.0])


def test_a_diverged_generator_is_recorded_not_fatal(toy_config: Config) -> None:
    from fedgan.evaluation import CentralEvaluator
    from fedgan.models import build_networks, pack_state
    from fedgan.training.hospital import config_shape

    state = pack_state(build_networks(toy_config.model, config_shape(toy_config), seed=0))
    state = {
        k: (torch.full_like(v, float("nan")) if k.endswith("running_var") else v)
        for k, v in state.items()
    }
    ev = CentralEvaluator(toy_config, config_shape(toy_config), toy_config.run_dir / "s")
    assert ev.metrics(1, state, ["domain_fd_1k"]) == {"nonfinite_fraction": 1.0}
