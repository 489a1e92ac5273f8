"""DiffAugment (``train.diff_augment``): each transform checked against plain array slicing,
the generator's gradient through it, and a synthesis step that applies it to both players."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedgan.config import load_config
from fedgan.experiment import resolve
from fedgan.training import augment
from fedgan.training.objectives import StepContext, make_objective, networks_for

ALL = ("color", "translation", "cutout")


def _draws(n: int, **at: float) -> torch.Tensor:
    """Draws of 0.5 (no brightness change, contrast x1, no shift) except those named."""
    u = torch.full((n, augment.DRAWS), 0.5)
    names = ("brightness", "saturation", "contrast", "dy", "dx", "top", "left")
    for name, value in at.items():
        u[:, names.index(name)] = value
    return u


def test_translation_shifts_whole_pixels_and_pads_with_zero() -> None:
    x = torch.randn(2, 1, 16, 16)
    # a shift range of +-2 px at 16 px: 5 choices, draw 0.9 -> the 5th: +2
    out = augment.apply(x, _draws(2, dy=0.9, dx=0.1), ("translation",))
    ref = np.zeros((2, 1, 16, 16), dtype=np.float32)
    ref[:, :, 2:, : 16 - 2] = x.numpy()[:, :, : 16 - 2, 2:]  # down 2, left 2
    np.testing.assert_array_equal(out.numpy(), ref)
    assert torch.equal(augment.apply(x, _draws(2), ("translation",)), x)  # 0.5: no shift


def test_cutout_zeroes_a_square_of_half_the_side() -> None:
    x = torch.rand(3, 2, 16, 16) + 0.5  # no zero pixel of its own
    out = augment.apply(x, _draws(3, top=0.5, left=0.0), ("cutout",))
    zero = (out == 0).all(1)
    # centre row: floor(0.5 * 17) = 8, so rows 4..11; left: centre 0, so columns 0..3
    ref = np.zeros((16, 16), dtype=bool)
    ref[4:12, 0:4] = True
    for i in range(3):
        np.testing.assert_array_equal(zero[i].numpy(), ref)
    inside = augment.apply(x, _draws(1, top=0.3, left=0.6), ("cutout",))
    assert int((inside[0] == 0).all(0).sum()) == 8 * 8  # wholly inside: the full square


def test_colour_is_brightness_then_contrast_around_the_mean() -> None:
    x = torch.tensor([[[[0.0, 0.2], [0.4, -0.6]]]])
    out = augment.apply(x, _draws(1, brightness=0.75, contrast=1.0), ("color",))
    shifted = x.numpy() + 0.25
    ref = (shifted - shifted.mean()) * 1.5 + shifted.mean()
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)


def test_gradients_flow_through_every_transform() -> None:
    """The generator learns through the transforms: autograd's gradient of each image is
    what finite differences give (``gradcheck``), and it is not zero."""
    x = torch.randn(3, 2, 8, 8, dtype=torch.double, requires_grad=True)
    u = augment.draw(3, torch.Generator().manual_seed(0)).double()
    assert torch.autograd.gradcheck(lambda t: augment.apply(t, u, ALL), (x,))
    augment.apply(x, u, ALL).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_both_players_see_augmented_images_and_a_bad_policy_is_refused() -> None:
    cfg = load_config(None, ["data.num_images=32", "model.base_channels=8",
                             "data.image_size=16", "train.batch_size=4",
                             "train.diff_augment=translation,cutout"])  # fmt: skip
    objective = make_objective(cfg)
    nets = networks_for(cfg, objective)
    ctx = StepContext.seeded(0, torch.device("cpu"))
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    batch = objective.make_batch(real, torch.zeros(4, dtype=torch.long), None, ctx)
    assert batch["aug_real"].shape == batch["aug_fake"].shape == (4, augment.DRAWS)
    seen = []
    d = nets["discriminator"]
    d.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    objective.accumulate_gradients("D", nets, batch, ctx)
    expected = augment.apply(real, batch["aug_real"], ("translation", "cutout"))
    assert any(torch.equal(s, expected) for s in seen)
    g_batch = objective.free_batch("G", None, ctx)
    assert "aug_fake" in g_batch.tensors
    objective.accumulate_gradients("G", nets, g_batch, ctx)
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in nets["generator"].parameters()
    )
    assert (seen[-1] == 0).float().mean() > 0.2  # the generator's images were cut out too
    with pytest.raises(ValueError, match="train.diff_augment"):
        load_config(None, ["train.diff_augment=translation,rotate"])


def test_views_show_each_image_under_several_draws_and_need_a_policy() -> None:
    """``train.diff_augment_views``: the discriminator sees every image under each of its
    views, view-major (row v n + i), in both players' steps; bad settings are refused."""
    cfg = load_config(None, ["data.num_images=32", "model.base_channels=8",
                             "data.image_size=16", "train.batch_size=4",
                             "train.diff_augment=translation",
                             "train.diff_augment_views=3"])  # fmt: skip
    objective = make_objective(cfg)
    nets = networks_for(cfg, objective)
    ctx = StepContext.seeded(0, torch.device("cpu"))
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    batch = objective.make_batch(real, torch.zeros(4, dtype=torch.long), None, ctx)
    assert batch["aug_real"].shape == (4, 3 * augment.DRAWS)
    seen = []
    nets["discriminator"].register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone())
    )
    objective.accumulate_gradients("D", nets, batch, ctx)
    u = batch["aug_real"]
    expected = torch.cat([augment.apply(real, u[:, v * augment.DRAWS : (v + 1) * augment.DRAWS],
                                        ("translation",)) for v in range(3)])  # fmt: skip
    assert any(s.shape[0] >= 12 and torch.equal(s[:12], expected) for s in seen)
    assert not torch.equal(expected[:4], expected[4:8])  # the views differ
    objective.accumulate_gradients("G", nets, objective.free_batch("G", None, ctx), ctx)
    assert seen[-1].shape[0] == 3 * cfg.train.batch_size
    with pytest.raises(ValueError, match="train.diff_augment_views"):
        load_config(None, ["train.diff_augment_views=2"])  # no policy
    with pytest.raises(ValueError, match="train.diff_augment_views"):
        load_config(None, ["train.diff_augment=color", "train.diff_augment_views=0"])
    views = ["train.diff_augment=color", "train.diff_augment_views=2"]
    with pytest.raises(ValueError, match="clips an image's views together"):
        resolve(
            load_config(
                None,
                [
                    *views,
                    "privacy.mode=dp-sgd",
                    "privacy.target_epsilon=10",
                    "privacy.grad_sample_mode=ew",
                ],
            )
        )
    with pytest.raises(ValueError, match="task 'enhance' has none"):
        resolve(load_config(None, [*views, "task.name=enhance"]))


@pytest.mark.parametrize("views", [1, 2])
def test_a_conditional_discriminator_gets_each_views_labels(views: int) -> None:
    """With views, a class-conditional discriminator sees every view's rows with their
    image's label (view-major, as the images); with one view, the labels unchanged."""
    cfg = load_config(None, ["data.num_images=32", "model.base_channels=8",
                             "data.image_size=16", "train.batch_size=4", "model.family=cgan",
                             "train.diff_augment=translation",
                             f"train.diff_augment_views={views}"])  # fmt: skip
    objective = make_objective(cfg)
    nets = networks_for(cfg, objective)
    ctx = StepContext.seeded(0, torch.device("cpu"))
    labels = torch.tensor([0, 1, 1, 0])
    batch = objective.make_batch(torch.rand(4, 1, 16, 16) * 2 - 1, labels, None, ctx)
    seen = []
    nets["discriminator"].register_forward_pre_hook(
        lambda _m, args: seen.append(args[1].detach().clone())
    )
    objective.accumulate_gradients("D", nets, batch, ctx)  # real, then fake forward
    assert len(seen) == 2
    assert all(torch.equal(s, labels.repeat(views)) for s in seen)
