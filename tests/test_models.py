"""Models and training steps: shapes, finite losses, both networks change, state packing."""

from __future__ import annotations

import pytest
import torch

from fedgan.config import Config, load_config
from fedgan.models import FAMILIES, ImageShape, build_networks, load_state, pack_state
from fedgan.models.dcgan import bce_d_loss, bce_g_loss
from fedgan.training import d_step, g_step, make_optimizers

SHAPES = [ImageShape(1, 16), ImageShape(1, 32), ImageShape(3, 64), ImageShape(1, 128)]


@pytest.mark.parametrize("shape", SHAPES)
def test_dcgan_shapes_and_range(shape: ImageShape) -> None:
    cfg = load_config(None, ["model.base_channels=8", "model.latent_dim=16"])
    nets = build_networks(cfg.model, shape, seed=0)
    x = nets["generator"](torch.randn(3, 16))
    assert x.shape == (3, shape.channels, shape.size, shape.size)
    assert x.min() >= -1 and x.max() <= 1
    assert nets["discriminator"](x).shape == (3,)
    norms = [m for m in nets["discriminator"].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not norms, "the discriminator must stay BatchNorm-free for DP-SGD"


def test_bce_losses_have_the_right_signs() -> None:
    big = torch.full((4,), 8.0)
    good_d = bce_d_loss(big, -big)  # D is right about both halves
    bad_d = bce_d_loss(-big, big)
    assert good_d < 0.01 < 10 < bad_d
    assert bce_g_loss(big) < 0.01 < 5 < bce_g_loss(-big)


def test_one_gan_step_is_finite_and_changes_both_networks(toy_config: Config) -> None:
    family = FAMILIES.get(toy_config.model.family)
    nets = build_networks(toy_config.model, ImageShape(1, 16), seed=0)
    opts = make_optimizers(nets, toy_config.train)
    before = pack_state(nets)
    real = torch.rand(8, 1, 16, 16) * 2 - 1
    z = torch.randn(8, 16)
    ld = d_step(family, nets["generator"], nets["discriminator"], opts["discriminator"], real, z)
    d_after = pack_state(nets)
    assert all(
        torch.equal(before[k], d_after[k])
        for k in before
        if k.startswith("generator.") and "running" not in k and "num_batches" not in k
    ), "D step must not move G"
    lg = g_step(family, nets["generator"], nets["discriminator"], opts["generator"], z)
    after = pack_state(nets)
    assert torch.isfinite(ld) and torch.isfinite(lg)
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"generator", "discriminator"}
    # no gradient is left on D to leak into its next (private) step
    assert all(p.grad is None for p in nets["discriminator"].parameters())


def test_g_step_leaves_discriminator_unchanged(toy_config: Config) -> None:
    family = FAMILIES.get("dcgan")
    nets = build_networks(toy_config.model, ImageShape(1, 16), seed=0)
    opts = make_optimizers(nets, toy_config.train)
    before = {k: v for k, v in pack_state(nets).items() if k.startswith("discriminator.")}
    g_step(family, nets["generator"], nets["discriminator"], opts["generator"], torch.randn(8, 16))
    after = pack_state(nets)
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_pack_and_load_state_round_trip(toy_config: Config) -> None:
    a = build_networks(toy_config.model, ImageShape(1, 16), seed=0)
    b = build_networks(toy_config.model, ImageShape(1, 16), seed=1)
    state = pack_state(a)
    assert {k.split(".")[0] for k in state} == {"generator", "discriminator"}
    # aggregation can hand back float64 counters: they are cast on load
    state = {k: (v.double() if "num_batches" in k else v) for k, v in state.items()}
    load_state(b, state)
    assert all(
        torch.equal(v.to(pack_state(b)[k].dtype), pack_state(b)[k]) for k, v in state.items()
    )
    with pytest.raises(ValueError, match="another model config"):
        other = load_config(None, ["model.base_channels=16", "model.latent_dim=16"])
        load_state(build_networks(other.model, ImageShape(1, 16), seed=0), state)


def test_seeded_build_is_deterministic(toy_config: Config) -> None:
    a = pack_state(build_networks(toy_config.model, ImageShape(1, 16), seed=4))
    b = pack_state(build_networks(toy_config.model, ImageShape(1, 16), seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
