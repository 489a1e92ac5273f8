"""Image-to-image tasks: shapes, the degradation model, losses on hand-made inputs, metrics,
baselines, `fedgan enhance`, and federated rounds of each task (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedgan.config import load_config
from fedgan.data.degrade import degrade, downsample, mr_contrast, upsample
from fedgan.evaluation.paired import PairedEvaluator, paired_scores
from fedgan.experiment import resolve
from fedgan.models import pack_state
from fedgan.training import make_objective, networks_for
from fedgan.training.objectives.translate import cycle_loss

TOY = ["data.num_images=64", "model.base_channels=8", "train.batch_size=8"]

# (task, image size, scale, expected input side)
SHAPES = [
    ("enhance", 16, 4, 16),
    ("enhance", 32, 4, 32),
    ("super-resolution", 32, 2, 16),
    ("super-resolution", 32, 4, 8),
    ("super-resolution", 64, 4, 16),
    ("translate", 32, 4, 32),
]


@pytest.mark.parametrize(("task", "size", "scale", "side"), SHAPES)
def test_shapes_of_each_task_and_scale(task: str, size: int, scale: int, side: int) -> None:
    cfg = load_config(None, [*TOY, f"task.name={task}", f"data.image_size={size}",
                             f"task.scale={scale}"])  # fmt: skip
    nets = networks_for(cfg)
    clean = torch.rand(3, 1, size, size) * 2 - 1
    objective = make_objective(cfg)
    inputs, targets = objective.eval_pairs(clean, 0)
    assert inputs.shape == (3, 1, side, side) and objective.input_size == side
    out = nets["generator"](inputs)
    assert out.shape == targets.shape == (3, 1, size, size)
    assert out.min() >= -1 and out.max() <= 1
    logits, features = nets["discriminator"](
        out if task != "enhance" else torch.cat([inputs, out], 1)
    )
    assert logits.ndim == 4 and features
    for net in nets.values():  # DP-ready: no BatchNorm anywhere
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    if task == "translate":
        assert set(nets) == {"generator", "generator_ba", "discriminator", "discriminator_a"}


def test_degradation_is_seeded_and_configurable() -> None:
    cfg = load_config(None, ["task.name=enhance"]).task
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    a = degrade(x, cfg, torch.Generator().manual_seed(1))
    b = degrade(x, cfg, torch.Generator().manual_seed(1))
    c = degrade(x, cfg, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.min() >= -1 and a.max() <= 1
    quiet = load_config(None, ["task.name=enhance", "task.noise_sigma=0", "task.photons=0"]).task
    assert torch.equal(degrade(x, quiet, torch.Generator()), x)  # no noise configured: identity
    noisier = load_config(None, ["task.name=enhance", "task.photons=20"]).task
    err = lambda t: (degrade(x, t, torch.Generator().manual_seed(0)) - x).abs().mean()  # noqa: E731
    assert err(noisier) > err(cfg) > 0
    blur = load_config(None, ["task.name=enhance", "task.degradation=blur"]).task
    assert degrade(x, blur, torch.Generator()).std() < x.std()


@pytest.mark.parametrize("scale", [2, 4])
def test_downsampling_is_inverted_exactly_on_block_images(scale: int) -> None:
    coarse = torch.rand(2, 1, 32 // scale, 32 // scale) * 2 - 1
    blocks = coarse.repeat_interleave(scale, -1).repeat_interleave(scale, -2)  # 32 px
    low = downsample(blocks, scale)
    assert torch.allclose(low, coarse, atol=1e-6)
    assert torch.allclose(upsample(low, scale, "nearest"), blocks, atol=1e-6)
    assert upsample(low, scale).shape == blocks.shape


def test_translation_target_is_a_fixed_nonmonotonic_contrast() -> None:
    u = torch.linspace(-1, 1, 101).view(1, 1, 1, -1)
    v = mr_contrast(u)[0, 0, 0]
    assert torch.equal(mr_contrast(u), mr_contrast(u))
    assert v[0] < v[45] and v[45] > v[-1]  # dark air, bright soft tissue, dark dense bone


def test_cycle_loss_is_zero_for_identity_generators_and_positive_otherwise() -> None:
    a, b = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    assert float(cycle_loss(nn.Identity(), nn.Identity(), a, b)) == 0.0
    flip = lambda t: -t  # noqa: E731 - inverse of itself: also cycle-consistent
    assert float(cycle_loss(flip, flip, a, b)) == 0.0  # type: ignore[arg-type]
    assert float(cycle_loss(lambda t: t * 0.5, nn.Identity(), a, b)) > 0  # type: ignore[arg-type]


def test_paired_scores_on_hand_made_images() -> None:
    y = torch.rand(4, 1, 32, 32) * 2 - 1
    same = paired_scores(y, y)
    assert same["ssim"] == pytest.approx(1.0) and same["mae"] == 0.0
    assert same["nmi"] == pytest.approx(2.0) and same["ms_ssim"] == pytest.approx(1.0, abs=1e-4)
    noisy = (y + 0.2 * torch.randn_like(y)).clamp(-1, 1)
    worse = paired_scores(noisy, y)
    assert worse["psnr"] < 30 and worse["ssim"] < same["ssim"] - 0.02 and worse["mae"] > 0
    # PSNR in dB on [0, 1]: a constant error of 0.1 is exactly 20 dB.
    assert paired_scores((y + 0.2).clamp(max=5), y + 0.0)["psnr"] != 0
    flat = torch.zeros(2, 1, 32, 32)
    assert paired_scores(flat + 0.2, flat)["psnr"] == pytest.approx(20.0, abs=1e-3)


def test_untrained_sr_generator_is_bicubic_and_nlm_beats_noise(tmp_path: Path) -> None:
    sr = load_config(None, [*TOY, "task.name=super-resolution", f"run.output_dir={tmp_path}"])
    ev = PairedEvaluator(sr, tmp_path / "s", make_objective(sr))
    m = ev.metrics(0, pack_state(networks_for(sr)))
    assert m["psnr"] == pytest.approx(m["bicubic_psnr"], abs=0.01)  # residual starts at zero
    assert m["bicubic_psnr"] > m["bilinear_psnr"] and abs(m["psnr_gain"]) < 0.01
    en = load_config(None, [*TOY, "task.name=enhance", f"run.output_dir={tmp_path}"])
    base = PairedEvaluator(en, tmp_path / "e", make_objective(en)).baselines()
    assert base["nlm"]["psnr"] > base["input"]["psnr"] + 1.0
    assert base["tv"]["psnr"] > base["input"]["psnr"]
    assert (
        PairedEvaluator(en, tmp_path / "e", make_objective(en)).sample_grid(
            0, pack_state(networks_for(en))
        )
    ).stat().st_size > 0


def test_image_tasks_take_dp_sgd_but_refuse_batch_coupled_losses_and_bad_settings() -> None:
    dp = ["privacy.mode=dp-sgd", "privacy.target_epsilon=5"]
    for task in ("enhance", "translate"):
        assert resolve(load_config(None, [f"task.name={task}", *dp])).privacy.mode == "dp-sgd"
    with pytest.raises(ValueError, match="task.relativistic"):
        resolve(load_config(None, ["task.name=super-resolution", *dp]))
    resolve(load_config(None, ["task.name=super-resolution", "task.relativistic=false", *dp]))
    with pytest.raises(ValueError, match="task.scale"):
        resolve(load_config(None, ["task.name=super-resolution", "data.image_size=16"]))
    with pytest.raises(ValueError, match="task.vgg_weights"):
        load_config(None, ["task.name=super-resolution", "task.perceptual=vgg"])
    with pytest.raises(ValueError, match="task.name"):
        resolve(load_config(None, ["task.name=colorize"]))


def test_enhance_command_on_png_dicom_and_nifti(tmp_path: Path, capsys) -> None:
    import nibabel as nib
    from PIL import Image
    from pydicom.data import get_testdata_file

    from fedgan.cli import main
    from fedgan.runs.centralized import train_centralized

    cfg = load_config(None, [*TOY, "task.name=super-resolution", "task.scale=2",
                             "train.local_steps=1", "federation.num_rounds=1",
                             f"run.output_dir={tmp_path}", "run.name=sr"])  # fmt: skip
    train_centralized(cfg, log=lambda _: None)

    def enhance(run: Path, source: Path, out: str) -> int:
        return main(["enhance", "--run", str(run), "--input", str(source),
                     "--out", str(tmp_path / out)])  # fmt: skip

    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((20, 20), 90, dtype=np.uint8)).save(inputs / "a.png")
    assert enhance(cfg.run_dir, inputs, "o") == 0
    assert Image.open(tmp_path / "o" / "a.png").size == (32, 32)
    ct = get_testdata_file("CT_small.dcm")  # bundled with pydicom
    assert ct is not None
    assert enhance(cfg.run_dir, Path(ct), "d") == 0
    assert (tmp_path / "d" / "CT_small.png").exists()
    vol = np.zeros((12, 12, 4), dtype=np.float32)
    vol[2:10, 2:10, 1:3] = 5.0
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    assert enhance(cfg.run_dir, tmp_path / "v.nii.gz", "n") == 0
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["v_s000.png", "v_s001.png"]
    synth = load_config(None, [*TOY, "train.local_steps=1", "federation.num_rounds=1",
                               f"run.output_dir={tmp_path}", "run.name=gan"])  # fmt: skip
    train_centralized(synth, log=lambda _: None)
    assert enhance(synth.run_dir, inputs, "x") == 2  # a synthesis run is refused
    assert "fedgan sample" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "strategy"),
    [
        ("enhance", "fedavg"),
        ("super-resolution", "fedadam"),
        ("translate", "fedmedian"),
        ("inpaint", "fedavgm"),
    ],
)
def test_federated_rounds_of_each_task(task: str, strategy: str, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "fedgan.cli", "simulate"]
    for o in (f"run.output_dir={tmp_path}", "run.name=i2i", f"task.name={task}",
              f"federation.strategy={strategy}", "federation.num_hospitals=2",
              "federation.num_rounds=2", "data.image_size=16", "data.num_images=96",
              "model.base_channels=8", "train.batch_size=8", "train.local_steps=2"):  # fmt: skip
        args += ["--set", o]
    if task == "super-resolution":
        args += ["--set", "task.scale=2"]
    res = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = [
        json.loads(line) for line in (tmp_path / "i2i" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in records] == [1, 2]
    ev = records[-1]["eval"]
    paired = {"psnr", "ssim", "ms_ssim", "gmsd", "ms_gmsd", "nmi", "mae", "mse", "psnr_gain"}
    assert paired <= set(ev)
    if task == "inpaint":
        assert {"hole_psnr", "biharmonic_hole_psnr", "hole_psnr_gain"} <= set(ev)
    assert len(records[-1]["hospitals"]) == 2
    ckpt = torch.load(tmp_path / "i2i" / "checkpoints" / "round_0002.pt", weights_only=True)
    prefixes = {k.split(".")[0] for k in ckpt["state"]}
    expected = {"generator", "discriminator"} | (
        {"generator_ba", "discriminator_a"} if task == "translate" else set()
    )
    assert prefixes == expected
