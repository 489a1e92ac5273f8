"""Inpainting: seeded holes of the configured area, a generator that keeps the given pixels,
hole scores on hand-made cases, the biharmonic baseline, and `fedgan enhance` with a mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedgan.config import load_config
from fedgan.data.degrade import hole_masks
from fedgan.evaluation.paired import PairedEvaluator, PairedSettings, paired_scores
from fedgan.training import make_objective, networks_for

TOY = ["data.num_images=64", "model.base_channels=8", "train.batch_size=8", "task.name=inpaint"]


def _smooth(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth images in [-1, 1] (sums of a few low-frequency waves)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    a = torch.rand(n, 4, generator=g) * 6
    out = sum(torch.sin(a[:, k, None, None] * (xx if k % 2 else yy) + k) for k in range(4))
    return (out / 4).clamp(-1, 1)[:, None]


@pytest.mark.parametrize(("shape", "fraction", "size"),
                         [("stroke", 0.15, 32), ("stroke", 0.4, 16), ("box", 0.15, 32),
                          ("box", 0.3, 28), ("mixed", 0.2, 32)])  # fmt: skip
def test_masks_are_seeded_and_cover_the_configured_area(shape, fraction, size) -> None:
    a = hole_masks(40, size, shape, fraction, torch.Generator().manual_seed(3))
    b = hole_masks(40, size, shape, fraction, torch.Generator().manual_seed(3))
    c = hole_masks(40, size, shape, fraction, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) <= {0.0, 1.0} and a.shape == (40, 1, size, size)
    target = round(fraction * size * size)
    areas = a.sum((1, 2, 3))
    side = round(target**0.5)
    boxes = [_is_rectangle(m[0]) for m in a]
    for area, box in zip(areas.tolist(), boxes, strict=True):
        if shape == "stroke" or not box:
            assert area == target  # a stroke is cut to the exact pixel count
        else:  # sides round(sqrt(t)) and round(t / side): off by at most half a side
            assert abs(area - target) <= side / 2 + 1
    if shape == "box":
        assert all(boxes)
    if shape == "mixed":
        assert 5 < sum(boxes) < 35  # about half and half


def _is_rectangle(m: torch.Tensor) -> bool:
    rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
    h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    return int(m.sum()) == h * w


def test_generator_keeps_the_given_pixels_and_sees_the_mask() -> None:
    cfg = load_config(None, [*TOY, "data.image_size=32"])
    objective = make_objective(cfg)
    nets = networks_for(cfg)
    clean = _smooth(6, 32)
    inputs, targets = objective.eval_pairs(clean, 0)
    assert inputs.shape == (6, 2, 32, 32) and torch.equal(targets, clean)
    mask = inputs[:, 1:]
    assert torch.equal(inputs[:, :1], clean * (1 - mask))  # the hole is mid-grey (0)
    out = nets["generator"](inputs)
    assert out.shape == clean.shape and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out * (1 - mask), clean * (1 - mask))
    logits, _ = nets["discriminator"](torch.cat([inputs, out], 1))
    assert logits.ndim == 4


def test_hole_scores_of_a_perfect_fill_and_of_the_masked_input() -> None:
    clean = _smooth(5, 32)
    mask = hole_masks(5, 32, "mixed", 0.2, torch.Generator().manual_seed(0))
    settings = PairedSettings(region=mask)
    perfect = paired_scores(clean, clean, ("hole",), settings)
    assert perfect["hole_psnr"] == float("inf") and perfect["hole_mae"] == 0.0
    assert perfect["hole_ssim"] == pytest.approx(1.0)
    masked = clean * (1 - mask)  # mid-grey, 0.5 in [0, 1], inside the hole
    got = paired_scores(masked, clean, ("hole",), settings)
    unit = (clean.double() + 1) / 2
    err = (unit - 0.5) * mask
    area = mask.sum((1, 2, 3)).double()
    mae = (err.abs().sum((1, 2, 3)) / area).mean()
    psnr = (10 * torch.log10(1 / ((err**2).sum((1, 2, 3)) / area))).mean()
    assert got["hole_mae"] == pytest.approx(float(mae), rel=1e-5)
    assert got["hole_psnr"] == pytest.approx(float(psnr), rel=1e-5)
    # outside the hole the masked input is exact: the whole-image MSE is the hole's share
    whole = paired_scores(masked, clean, ("mse",))["mse"]
    assert whole == pytest.approx(float((err**2).sum() / err.numel()), rel=1e-5)
    with pytest.raises(Exception, match="needs task inpaint"):
        paired_scores(clean, clean, ("hole",))


def test_biharmonic_baseline_fills_smooth_holes_far_better_than_grey(tmp_path: Path) -> None:
    cfg = load_config(None, [*TOY, "data.image_size=32", f"run.output_dir={tmp_path}"])
    objective = make_objective(cfg)
    clean = _smooth(8, 32)
    inputs, targets = objective.eval_pairs(clean, 1)
    base = objective.baselines()
    s = PairedSettings(region=objective.region(inputs))
    grey = paired_scores(base["input"](inputs), targets, ("hole",), s)["hole_psnr"]
    bih = paired_scores(base["biharmonic"](inputs), targets, ("hole",), s)["hole_psnr"]
    assert bih > grey + 10, (bih, grey)


def test_evaluator_reports_hole_scores_gains_and_a_picture(tmp_path: Path) -> None:
    cfg = load_config(None, [*TOY, "data.image_size=16", f"run.output_dir={tmp_path}"])
    objective = make_objective(cfg)
    ev = PairedEvaluator(cfg, tmp_path / "samples", objective)  # type: ignore[arg-type]
    from fedgan.models import pack_state

    state = pack_state(networks_for(cfg))
    m = ev.evaluate(1, state)
    for key in ("hole_psnr", "hole_ssim", "hole_mae", "biharmonic_hole_psnr",
                "input_hole_mae", "hole_psnr_gain", "gmsd", "mse"):  # fmt: skip
        assert key in m and np.isfinite(m[key]), key
    assert m["hole_psnr_gain"] == pytest.approx(m["hole_psnr"] - m["biharmonic_hole_psnr"])
    assert (tmp_path / "samples" / "round_0001.png").stat().st_size > 0


def test_hole_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="task.hole_fraction"):
        load_config(None, ["task.hole_fraction=0.9"])
    with pytest.raises(ValueError, match="task.hole"):
        load_config(None, ["task.hole=circle"])
    with pytest.raises(ValueError, match="task.fill_prior"):
        load_config(None, ["task.fill_prior=telea"])


def test_a_biharmonic_prior_starts_at_skimage_and_learns_a_correction() -> None:
    """With ``task.fill_prior=biharmonic`` an untrained generator's fill is skimage's own
    biharmonic inpainting of the hole (computed here independently of fedgan), the given
    pixels pass through, and the U-Net's correction gets a gradient once its gain moves."""
    from skimage.restoration import inpaint_biharmonic

    cfg = load_config(None, [*TOY, "data.image_size=32", "task.fill_prior=biharmonic"])
    objective = make_objective(cfg)
    gen = networks_for(cfg)["generator"]
    clean = _smooth(4, 32, seed=2)
    inputs, _ = objective.eval_pairs(clean, 0)
    mask = inputs[:, 1:]
    out = gen(inputs)
    assert torch.equal(out * (1 - mask), clean * (1 - mask))
    for i in range(4):
        unit = ((inputs[i, 0].double() + 1) / 2).numpy()
        ref = inpaint_biharmonic(unit, mask[i, 0].numpy() > 0.5) * 2 - 1
        hole = mask[i, 0] > 0.5
        assert np.allclose(out[i, 0][hole].detach().numpy(), ref[hole.numpy()], atol=1e-5)
    # the gain starts at zero, so only it learns on the first step; then the U-Net does too
    ((out - clean) ** 2).mean().backward()
    assert gen.gain.grad is not None and gen.gain.grad.abs() > 0
    with torch.no_grad():
        gen.gain.fill_(0.1)
    gen.zero_grad()
    ((gen(inputs) - clean) ** 2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.net.parameters())


def test_the_biharmonic_fill_is_solved_once_per_input(monkeypatch) -> None:
    """The discriminator's and the generator's phases share a batch: its fill is solved once.
    A new tensor, or the same one changed in place, is solved again; copies carry no cache."""
    import copy
    import pickle

    import fedgan.models.image2image as i2i

    cfg = load_config(None, [*TOY, "data.image_size=16", "task.fill_prior=biharmonic"])
    objective = make_objective(cfg)
    gen = networks_for(cfg)["generator"]
    with torch.no_grad():
        gen.gain.fill_(0.1)
    inputs, _ = objective.eval_pairs(_smooth(3, 16, seed=3), 0)
    calls = []
    real = i2i.biharmonic_fill
    monkeypatch.setattr(i2i, "biharmonic_fill", lambda *a: calls.append(1) or real(*a))
    first = gen(inputs)
    assert torch.equal(gen(inputs), first) and len(calls) == 1
    other = inputs.clone()
    assert torch.equal(gen(other), first) and len(calls) == 2
    other[:, 0] += 0.5  # in place: the version counter moves, so the fill is solved again
    changed = gen(other)
    assert len(calls) == 3 and not torch.equal(changed, first)
    twin = copy.deepcopy(gen)
    assert twin._last is None and pickle.loads(pickle.dumps(gen))._last is None
    assert torch.equal(twin(inputs), first)


def test_enhance_fills_a_mask_file_or_the_zero_pixels(tmp_path: Path, capsys) -> None:
    import nibabel as nib
    from PIL import Image
    from pydicom.data import get_testdata_file

    from fedgan.cli import main
    from fedgan.runs.centralized import train_centralized

    cfg = load_config(None, [*TOY, "data.image_size=16", "train.local_steps=1",
                             "federation.num_rounds=1", f"run.output_dir={tmp_path}",
                             "run.name=inp"])  # fmt: skip
    train_centralized(cfg, log=lambda _: None)
    src = tmp_path / "in"
    src.mkdir()
    img = np.full((16, 16), 150, dtype=np.uint8)
    img[0, 0] = 255
    img[4:8, 4:8] = 0  # the zero pixels: a hole
    Image.fromarray(img).save(src / "a.png")
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[10:14, 2:6] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")

    def enhance(source: Path, out: str, *extra: str) -> int:
        return main(["enhance", "--run", str(cfg.run_dir), "--input", str(source),
                     "--out", str(tmp_path / out), *extra])  # fmt: skip

    assert enhance(src, "zero") == 0
    out = np.asarray(Image.open(tmp_path / "zero" / "a.png").convert("L")).astype(int)
    keep = img > 0
    assert np.abs(out[keep] - img[keep]).max() <= 1  # given pixels pass through
    assert enhance(src, "masked", "--mask", str(tmp_path / "mask.png")) == 0
    out = np.asarray(Image.open(tmp_path / "masked" / "a.png").convert("L")).astype(int)
    keep = mask == 0
    assert np.abs(out[keep] - img[keep]).max() <= 1
    ct = get_testdata_file("CT_small.dcm")
    assert ct is not None
    assert enhance(Path(ct), "dcm", "--mask", str(tmp_path / "mask.png")) == 0
    vol = np.zeros((12, 12, 2), dtype=np.float32)
    vol[2:10, 2:10, :] = 5.0
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    assert enhance(tmp_path / "v.nii.gz", "nii", "--mask", str(tmp_path / "mask.png")) == 0
    assert len(list((tmp_path / "nii").iterdir())) == 2
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "empty.png")
    assert enhance(src, "bad", "--mask", str(tmp_path / "empty.png")) == 2
    assert "marks no hole" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_hole_metric_named_for_another_task_is_skipped_with_its_reason(tmp_path: Path) -> None:
    cfg = load_config(None, [*TOY[:3], "task.name=enhance", "data.image_size=16",
                             "eval.metrics=psnr,hole", f"run.output_dir={tmp_path}"])  # fmt: skip
    objective = make_objective(cfg)
    ev = PairedEvaluator(cfg, tmp_path / "samples", objective)  # type: ignore[arg-type]
    from fedgan.models import pack_state

    m = ev.metrics(1, pack_state(networks_for(cfg)))
    assert "psnr" in m and not any(k.startswith("hole") for k in m)
    assert ev.skipped["hole"] == "scores a hole: it needs task inpaint"
