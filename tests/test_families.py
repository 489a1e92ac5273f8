"""GAN families: shapes at each resolution, losses, training steps, conditioning, DP table."""

from __future__ import annotations

import pytest
import torch

from fedgan.config import load_config
from fedgan.experiment import resolve
from fedgan.models import FAMILIES, ImageShape, build_networks, pack_state
from fedgan.models.sngan import hinge_d_loss, hinge_g_loss
from fedgan.models.wgan_gp import critic_loss, generator_loss
from fedgan.training import d_step, g_step, make_optimizers
from fedgan.training.objectives.synthesis import forward, gradient_penalty

FAMILY_NAMES = ["dcgan", "wgan-gp", "sngan", "cgan"]
PRESETS = [ImageShape(1, 32), ImageShape(1, 64), ImageShape(3, 128)]  # 128 px: MedGAN's


def _cfg(family: str):
    return load_config(
        None,
        [
            f"model.family={family}",
            "model.base_channels=8",
            "model.latent_dim=16",
            "model.num_classes=3",
        ],
    )


def _labels(family: str, n: int):
    return torch.arange(n) % 3 if FAMILIES.get(family).conditional else None


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("shape", PRESETS, ids=lambda s: f"{s.channels}x{s.size}")
def test_shapes_and_ranges(family: str, shape: ImageShape) -> None:
    nets = build_networks(_cfg(family).model, shape, seed=0)
    y = _labels(family, 2)
    x = forward(nets["generator"], torch.randn(2, 16), y)
    assert x.shape == (2, shape.channels, shape.size, shape.size)
    assert x.min() >= -1 and x.max() <= 1
    assert forward(nets["discriminator"], x, y).shape == (2,)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_few_steps_are_finite_and_change_both_networks(family: str) -> None:
    cfg = _cfg(family)
    fam = FAMILIES.get(family)
    nets = build_networks(cfg.model, ImageShape(1, 32), seed=0)
    opts = make_optimizers(nets, cfg.train)
    before = pack_state(nets)
    y = _labels(family, 8)
    for _ in range(3):
        real = torch.rand(8, 1, 32, 32) * 2 - 1
        ld = d_step(
            fam,
            nets["generator"],
            nets["discriminator"],
            opts["discriminator"],
            real,
            torch.randn(8, 16),
            y,
        )
        lg = g_step(
            fam, nets["generator"], nets["discriminator"], opts["generator"], torch.randn(8, 16), y
        )
        assert torch.isfinite(ld) and torch.isfinite(lg)
    after = pack_state(nets)
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"generator", "discriminator"}


def test_losses_have_the_right_signs() -> None:
    hi, lo = torch.full((4,), 3.0), torch.full((4,), -3.0)
    # critic: real scored high, fake low is good (negative loss); the reverse is bad
    assert critic_loss(hi, lo) < 0 < critic_loss(lo, hi)
    assert generator_loss(hi) < 0 < generator_loss(lo)
    # hinge: zero once real >= 1 and fake <= -1
    assert hinge_d_loss(hi, lo) == 0 and hinge_d_loss(lo, hi) == pytest.approx(8.0)
    assert hinge_g_loss(hi) < hinge_g_loss(lo)


def test_gradient_penalty_is_zero_for_a_unit_slope_critic() -> None:
    class Slope(torch.nn.Module):  # D(x) = sum(x) / sqrt(n): gradient norm exactly 1
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1).sum(1) / x[0].numel() ** 0.5

    real, fake = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    assert gradient_penalty(Slope(), real, fake, None) == pytest.approx(0.0, abs=1e-10)

    class Steep(torch.nn.Module):  # gradient norm 3: penalty (3 - 1)^2 = 4
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 3 * x.flatten(1).sum(1) / x[0].numel() ** 0.5

    assert gradient_penalty(Steep(), real, fake, None) == pytest.approx(4.0, rel=1e-6)


def test_conditional_generator_output_depends_on_its_label() -> None:
    nets = build_networks(_cfg("cgan").model, ImageShape(1, 32), seed=0)
    g = nets["generator"].eval()
    z = torch.randn(1, 16).repeat(3, 1)
    out = g(z, torch.tensor([0, 1, 2]))
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    d = nets["discriminator"]
    x = torch.rand(1, 1, 32, 32).repeat(3, 1, 1, 1)
    scores = d(x, torch.tensor([0, 1, 2]))
    assert len(set(scores.tolist())) == 3  # the projection makes D label-aware


def test_dp_table_and_refusals() -> None:
    table = {n: FAMILIES.get(n).dp_incompatibility for n in FAMILIES.names()}
    assert not table["dcgan"] and not table["cgan"]
    assert "spectral" in table["sngan"] and "gradient penalty" in table["wgan-gp"]
    for family in ("sngan", "wgan-gp"):
        with pytest.raises(
            ValueError, match="cannot be trained with DP-SGD.*Choose one of: cgan, dcgan"
        ):
            resolve(load_config(
                None, [f"model.family={family}", "privacy.mode=dp-sgd", "privacy.target_epsilon=3"]
            ))  # fmt: skip


def test_conditional_family_trains_under_dp_sgd(tmp_path) -> None:
    from fedgan.data import hospital_dataset
    from fedgan.training.hospital import config_shape, local_round

    cfg = load_config(
        None,
        [
            "model.family=cgan",
            "model.base_channels=8",
            "model.latent_dim=16",
            "data.image_size=16",
            "data.num_images=96",
            "train.batch_size=8",
            "train.local_steps=2",
            "privacy.mode=dp-sgd",
            "privacy.target_epsilon=8",
            "federation.num_rounds=2",
        ],
    )
    ds = hospital_dataset(cfg.data, 0, 0, 3)
    state = pack_state(build_networks(cfg.model, config_shape(cfg), seed=0))
    res = local_round(cfg, ds, state, None, round_=1, hospital=0)
    # 2 iterations of the private default's 3 discriminator steps
    assert 0 < res.privacy["epsilon"] <= 8 and res.privacy["dp_steps"] == 2 * 3


def test_labels_outside_num_classes_are_a_clear_error() -> None:
    from fedgan.training.objectives.synthesis import check_labels

    with pytest.raises(ValueError, match="model.num_classes"):
        check_labels(torch.tensor([0, 1, 2]), 2)


def test_wgan_gp_runs_n_critic_steps_per_generator_step(toy_config) -> None:
    from fedgan.config import with_changes
    from fedgan.data import hospital_dataset
    from fedgan.training import StepContext, make_objective, shuffled_batches, train

    cfg = with_changes(toy_config, model={"family": "wgan-gp"})
    nets = build_networks(cfg.model, ImageShape(1, 16), seed=0)
    ctx = StepContext.seeded(0, torch.device("cpu"))
    stats = train(
        make_objective(cfg),
        nets,
        make_optimizers(nets, cfg.train),
        shuffled_batches(hospital_dataset(cfg.data, 0, 0, 3), cfg.train.batch_size, ctx, seed=0),
        steps=2,
        ctx=ctx,
    )
    assert stats.examples == 2 * 5 * cfg.train.batch_size  # 5 critic batches per G step


def test_fedgan_sample_writes_the_requested_count_and_labels(toy_config, tmp_path) -> None:
    import numpy as np

    from fedgan.cli import main
    from fedgan.config import with_changes
    from fedgan.data import local_dataset
    from fedgan.runs.centralized import train_centralized

    cfg = with_changes(
        toy_config,
        model={"family": "cgan", "num_classes": 2},
        federation={"num_rounds": 1},
        eval={"final_metrics": ""},
    )
    train_centralized(cfg, log=lambda _: None)
    run = str(cfg.run_dir)
    assert main(["sample", "--run", run, "--n", "10", "--out", str(tmp_path / "all")]) == 0
    with np.load(tmp_path / "all" / "synthetic.npz") as d:
        assert d["train_images"].shape == (10, 16, 16) and d["train_images"].dtype == np.uint8
        assert sorted(d["train_labels"][:, 0].tolist()) == [0] * 5 + [1] * 5
    assert len(list((tmp_path / "all" / "1").glob("*.png"))) == 5
    # the folder reads back as a labeled data set
    back = local_dataset(tmp_path / "all", cfg.data)
    assert len(back) == 10 and sorted(back.tensors[1].tolist()) == [0] * 5 + [1] * 5
    assert (
        main(["sample", "--run", run, "--n", "4", "--label", "1", "--out", str(tmp_path / "one")])
        == 0
    )
    with np.load(tmp_path / "one" / "synthetic.npz") as d:
        assert d["train_labels"][:, 0].tolist() == [1, 1, 1, 1]
    assert (
        main(["sample", "--run", run, "--n", "4", "--label", "7", "--out", str(tmp_path / "bad")])
        == 2
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_short_centralized_training_does_not_diverge_or_collapse(family: str, tmp_path) -> None:
    import math

    from fedgan.evaluation.central import sample
    from fedgan.evaluation.functional import pairwise_ssim
    from fedgan.models import load_state
    from fedgan.rundir import RunDir
    from fedgan.runs.centralized import train_centralized

    presets = {
        "wgan-gp": "configs/wgan-gp.yaml",
        "sngan": "configs/sngan.yaml",
        "cgan": "configs/cgan.yaml",
        "dcgan": "configs/default.yaml",
    }
    from pathlib import Path

    cfg = load_config(
        Path(__file__).parent.parent / presets[family],
        [
            f"run.output_dir={tmp_path}",
            "data.num_images=600",
            "model.base_channels=16",
            "train.local_steps=10",
            "federation.num_hospitals=2",
            "federation.num_rounds=4",
            "eval.metrics=ms_ssim_diversity",
            "eval.final_metrics=",
        ],
    )
    train_centralized(cfg, log=lambda _: None)
    records = RunDir(cfg.run_dir).read_metrics()
    for r in records:
        assert math.isfinite(r["aggregate"]["d_loss"]) and math.isfinite(r["aggregate"]["g_loss"])
    nets = build_networks(cfg.model, ImageShape(1, 32), seed=0)
    load_state(
        {"generator": nets["generator"]},
        {
            k: v
            for k, v in RunDir(cfg.run_dir).load_checkpoint()["state"].items()
            if k.startswith("generator.")
        },
    )
    images, _ = sample(nets["generator"].eval(), 64, seed=1, device=torch.device("cpu"))
    assert torch.isfinite(images).all()
    assert pairwise_ssim(images) < 0.95, "the generator collapsed to one image"
    assert images.flatten(1).std(0).mean() > 0.02


def test_mode_seeking_term_is_its_formula_on_a_hand_made_batch() -> None:
    from fedgan.training.objectives.synthesis import mode_seeking

    # pair i is (row i, row 2 + i): images 0.0 against 0.5 and 0.2 against 0.2; codes 2 apart
    fake = torch.stack([torch.full((1, 4, 4), v) for v in (0.0, 0.2, 0.5, 0.2, 9.0)])
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [7.0, 7.0]])
    images = (abs(0.0 - 0.5) + abs(0.2 - 0.2)) / 2  # the odd last row is left out
    assert float(mode_seeking(fake, z)) == pytest.approx(1 / (images / 2.0 + 1e-5), rel=1e-6)
    # two codes that draw the same image: the term is at its ceiling, 1 / eps
    same = torch.zeros(4, 1, 4, 4)
    assert float(mode_seeking(same, torch.randn(4, 3))) == pytest.approx(1e5)


@pytest.mark.parametrize("family", ["dcgan", "cgan"])
def test_mode_seeking_weight_adds_its_term_to_the_generator_loss(family: str) -> None:
    from fedgan.config import with_changes
    from fedgan.training import StepContext
    from fedgan.training.objectives.synthesis import SynthesisObjective, mode_seeking

    plain = _cfg(family)
    cfg = with_changes(plain, train={"mode_seeking": 2.0, "batch_size": 8})
    nets = build_networks(cfg.model, ImageShape(1, 32), seed=0)
    ctx = StepContext.seeded(0, torch.device("cpu"))
    batch = SynthesisObjective(cfg).free_batch("G", None, ctx)
    if FAMILIES.get(family).conditional:  # each pair shares its class
        assert torch.equal(batch["labels"][:4], batch["labels"][4:])
    losses = [
        float(SynthesisObjective(c).accumulate_gradients("G", nets, batch, ctx))
        for c in (with_changes(plain, train={"batch_size": 8}), cfg)
    ]
    with torch.no_grad():
        term = mode_seeking(forward(nets["generator"], batch["z"], batch.get("labels")), batch["z"])
    assert losses[1] - losses[0] == pytest.approx(2.0 * float(term), rel=1e-4)


@pytest.mark.parametrize("family", ["dcgan", "cgan", "wgan-gp"])
def test_d_norm_none_leaves_the_discriminator_without_normalization(family: str) -> None:
    from fedgan.config import with_changes

    def norms(d_norm: str) -> int:
        cfg = with_changes(_cfg(family), model={"d_norm": d_norm})
        d = build_networks(cfg.model, ImageShape(1, 32), seed=0)["discriminator"]
        return sum(isinstance(m, torch.nn.GroupNorm) for m in d.modules())

    assert norms("group") == 2  # 32 px: two inner stages after the first convolution
    assert norms("none") == 0
