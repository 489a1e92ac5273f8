"""Image-quality metrics against independent implementations and hand-made cases: SSIM
(skimage), MS-SSIM (pytorch-msssim's SSIM terms, scale by scale), GMSD and MS-GMSD, MSE, LPIPS
from local weights, and KID's spread when the real split is small."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedgan.config import load_config
from fedgan.evaluation import functional as fn
from fedgan.evaluation.metrics import METRICS, direction
from fedgan.evaluation.paired import PAIRED_METRICS, PairedSettings, paired_scores
from fedgan.experiment import resolve

SIZES = (16, 28, 32, 64, 176)


def _pair(size: int, noise: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, size, size, generator=g, dtype=torch.float64)
    # smooth images: SSIM of white noise says little
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    y = (x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("size", SIZES)
def test_ssim_is_skimage_gaussian_ssim_over_the_interior(size: int) -> None:
    from skimage.metrics import structural_similarity

    x, y = _pair(size)
    ours = fn.ssim(x, y).double()
    ref = torch.tensor([
        structural_similarity(a[0].numpy(), b[0].numpy(), gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0)
        for a, b in zip(x, y, strict=True)
    ])  # fmt: skip
    assert torch.allclose(ours, ref, atol=2e-6), (ours, ref)


def _reference_ms_ssim(x, y, window, sigma, weights) -> torch.Tensor:
    """MS-SSIM composed from pytorch-msssim's own SSIM and contrast-structure terms."""
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    win = _fspecial_gauss_1d(window, sigma).repeat(x.shape[1], 1, 1, 1).to(x)
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    terms = []
    for level in range(len(weights)):
        if level:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        s, cs = _ssim(x, y, data_range=1.0, win=win, size_average=False)
        terms.append(torch.relu(cs if level < len(weights) - 1 else s))
    return torch.prod(torch.stack(terms) ** w.view(-1, 1, 1), 0).mean(1)


@pytest.mark.parametrize("size", SIZES)
def test_ms_ssim_follows_its_stated_protocol(size: int) -> None:
    window, sigma, weights = fn.ms_ssim_protocol(size)
    assert (window, len(weights)) == {16: (5, 2), 28: (5, 3), 32: (5, 3), 64: (5, 3),
                                      176: (11, 5)}[size]  # fmt: skip
    x, y = _pair(size)
    ours = fn.ms_ssim(x, y).double()
    ref = _reference_ms_ssim(x, y, window, sigma, weights)
    assert torch.allclose(ours, ref, atol=2e-5), (ours, ref)
    # the stated window is the one that runs: torchmetrics' 11-px window gives another value
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    if size in (28, 32):
        tm = multiscale_structural_similarity_index_measure(
            x.float(), y.float(), data_range=1.0, kernel_size=5, reduction="none",
            betas=weights,
        )  # fmt: skip
        assert not torch.allclose(ours.float(), tm, atol=1e-3)


def test_identical_images_score_perfectly_and_a_known_shift_scores_its_formula() -> None:
    y = torch.rand(4, 1, 32, 32) * 2 - 1
    same = paired_scores(y, y)
    assert same["psnr"] == float("inf") and same["mse"] == 0.0 and same["mae"] == 0.0
    assert same["ssim"] == pytest.approx(1.0) and same["ms_ssim"] == pytest.approx(1.0)
    assert same["gmsd"] == pytest.approx(0.0, abs=1e-6)
    assert same["ms_gmsd"] == pytest.approx(0.0, abs=1e-6)
    flat = torch.zeros(2, 1, 32, 32)  # 0.5 in [0, 1]
    shifted = paired_scores(flat + 0.2, flat)  # +0.1 in [0, 1]
    assert shifted["mse"] == pytest.approx(0.01, rel=1e-5)
    assert shifted["mae"] == pytest.approx(0.1, rel=1e-5)
    assert shifted["psnr"] == pytest.approx(20.0, abs=1e-3)
    # a flat shift has no gradient anywhere inside: GMSD's deviation is that of the borders
    assert shifted["gmsd"] < paired_scores(y.roll(3, -1), y)["gmsd"]


def test_structural_metrics_rank_more_noise_worse() -> None:
    x, y1 = _pair(32, noise=0.05)
    _, y2 = _pair(32, noise=0.3)
    a = paired_scores(y1 * 2 - 1, x * 2 - 1)
    b = paired_scores(y2 * 2 - 1, x * 2 - 1)
    for key in PAIRED_METRICS:
        better = METRICS.get(key).direction(key) == "higher"
        assert (a[key] > b[key]) == better, key


def test_new_metrics_are_registered_with_their_direction() -> None:
    for key in ("gmsd", "ms_gmsd", "mse", "lpips"):
        assert METRICS.get(key).paired and direction(key) == "lower"
        assert direction(f"biharmonic_{key}") == "lower"  # a baseline's value


def _lpips_folder(tmp_path: Path) -> Path:
    """LPIPS weight files in the download's layout, with random (not ImageNet) values."""
    from torchvision.models import vgg16

    torch.manual_seed(0)
    folder = tmp_path / "lpips"
    folder.mkdir()
    features = vgg16(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in features.items()},
               folder / "vgg16-397923af.pth")  # fmt: skip
    linear = [torch.rand(1, c, 1, 1) for c in (64, 128, 256, 512, 512)]
    torch.save(linear, folder / "lpips_weights.pt")
    return folder


def test_lpips_from_a_local_folder(tmp_path: Path) -> None:
    folder = _lpips_folder(tmp_path)
    settings = PairedSettings(str(folder))
    x, y = _pair(28, noise=0.05)
    _, z = _pair(28, noise=0.4)
    same = paired_scores(x * 2 - 1, x * 2 - 1, ("lpips",), settings)["lpips"]
    near = paired_scores(y * 2 - 1, x * 2 - 1, ("lpips",), settings)["lpips"]
    far = paired_scores(z * 2 - 1, x * 2 - 1, ("lpips",), settings)["lpips"]
    assert same == pytest.approx(0.0, abs=1e-7) and 0 < near < far


def test_lpips_without_its_weights_fails_at_resolve_with_the_fix(tmp_path: Path) -> None:
    cfg = load_config(None, ["eval.metrics=lpips", "task.name=enhance"])
    with pytest.raises(ValueError, match="eval.lpips_weights.*folder holding"):
        resolve(cfg)
    cfg = load_config(None, [f"eval.lpips_weights={tmp_path}", "task.name=enhance"])
    with pytest.raises(ValueError, match="lacks vgg16-397923af.pth, lpips_weights.pt"):
        resolve(cfg)
    with pytest.raises(ValueError, match="LPIPS needs its weights"):
        paired_scores(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16), ("lpips",))


def test_kid_spread_is_real_when_the_real_split_is_smaller_than_a_subset() -> None:
    """With 300 real points and subsets of 500, every subset used to be the whole real set and
    the spread read near 0 (0.22 of the estimator's own variability, measured here with
    fresh samples of both distributions). Subsets of half the split give about half of it."""
    d = 16
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(7)) * 0.3

    def draw(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix + shift

    real, fake = draw(300, 1), draw(2000, 2, 0.15)
    mean, std = fn.kernel_distance(real, fake, subset_size=500)
    m = 150  # half the real split: the subset size that is used
    fresh = [fn.kernel_distance(draw(m, 100 + s), draw(m, 200 + s, 0.15), subsets=1,
                                subset_size=m)[0] for s in range(60)]  # fmt: skip
    assert 0.3 * np.std(fresh) < std < 2.0 * np.std(fresh), (std, np.std(fresh))
    assert mean == pytest.approx(np.mean(fresh), abs=3 * np.std(fresh) / np.sqrt(20))
