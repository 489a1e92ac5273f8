"""Seeded degradation models that turn any set of clean images into paired training data.

Images are ``[N, C, H, W]`` in [-1, 1] (the training range) unless a function says otherwise.
Every function takes a ``torch.Generator``, so the same seed gives the same pairs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from fedgan.config import TaskSection


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (sigma in pixels; 0 = unchanged)."""
    if sigma <= 0:
        return x
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def shift_tolerant_residual(x: torch.Tensor, rec: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """``[N, 1, H, W]``: each pixel's smallest ``|x - rec|`` (averaged over channels) over
    every shift of ``rec`` by up to ``shift`` pixels in each direction (edges replicated);
    ``shift`` 0 is the plain residual. A reconstruction that misses an edge by a pixel leaves
    no residual there; a spot it does not draw at all still does."""
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    best = (x - rec).abs().mean(1, keepdim=True)
    if shift == 0:
        return best
    h, w = x.shape[-2:]
    padded = F.pad(rec, (shift, shift, shift, shift), mode="replicate")
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            moved = padded[..., dy : dy + h, dx : dx + w]
            best = torch.minimum(best, (x - moved).abs().mean(1, keepdim=True))
    return best


def degrade(x: torch.Tensor, cfg: TaskSection, gen: torch.Generator) -> torch.Tensor:
    """The ``enhance`` input for clean ``x``: blur (``task.blur_sigma`` at 32 px, scaled with
    the size), then low-dose-like noise: Poisson photon noise with ``task.photons`` photons per
    unit intensity and Gaussian read noise ``task.noise_sigma``, clipped to the valid range."""
    unit = (x + 1) / 2
    if "blur" in cfg.degradation:
        unit = gaussian_blur(unit, cfg.blur_sigma * x.shape[-1] / 32)
    if "noise" in cfg.degradation:
        if cfg.photons > 0:
            rate = (unit.clamp(min=0) * cfg.photons).cpu()
            unit = (torch.poisson(rate, generator=gen) / cfg.photons).to(x.device)
        if cfg.noise_sigma > 0:
            noise = torch.randn(unit.shape, generator=gen).to(x.device)
            unit = unit + cfg.noise_sigma * noise
    return (unit.clamp(0, 1) * 2 - 1).contiguous()


def downsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The ``super-resolution`` input: ``x`` reduced ``scale`` times by area averaging (the
    acquisition model: each low-resolution pixel integrates ``scale x scale`` fine ones)."""
    return F.avg_pool2d(x, scale)


def upsample(x: torch.Tensor, scale: int, mode: str = "bicubic") -> torch.Tensor:
    """Classical interpolation back to full size (the baselines of super-resolution)."""
    corners = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(x, scale_factor=scale, mode=mode, **corners)
    return out.clamp(-1, 1)


def mr_contrast(x: torch.Tensor) -> torch.Tensor:
    """The same anatomy with an MR-like tissue contrast: a smooth, non-monotonic intensity
    transfer (air and lung stay dark, soft tissue and fat turn bright, dense bone turns dark),
    so a CT-like image and its translation form a known ground-truth pair."""
    u = (x + 1) / 2
    v = 1.6 * torch.exp(-((u - 0.45) ** 2) / (2 * 0.18**2)) * torch.sigmoid((u - 0.12) * 30)
    return (v.clamp(0, 1) * 2 - 1).contiguous()


def hole_masks(
    n: int, size: int, shape: str, fraction: float, gen: torch.Generator
) -> torch.Tensor:
    """Seeded ``[n, 1, size, size]`` hole masks (1 = missing) for ``inpaint``.

    Args:
        n: How many masks.
        size: Their side in pixels.
        shape: ``box`` (one near-square rectangle at a random place), ``stroke`` (a brush
            stroke: a random walk of discs of radius ``size // 16``, starting afresh where it
            gets stuck), or ``mixed`` (each mask one or the other, with equal chance).
        fraction: The share of pixels a hole covers: a stroke covers exactly
            ``round(fraction * size**2)`` pixels (its last disc is cut short), a box has sides
            ``round(sqrt(target))`` and ``round(target / side)``.
        gen: The seed's generator (one draw per call; the same state gives the same masks).
    """
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    target = max(1, round(fraction * size * size))
    out = np.zeros((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        kind = shape if shape != "mixed" else ("box" if rng.random() < 0.5 else "stroke")
        out[i, 0] = _box(size, target, rng) if kind == "box" else _stroke(size, target, rng)
    return torch.from_numpy(out)


def _box(size: int, target: int, rng: np.random.Generator) -> np.ndarray:
    h = min(size, max(1, round(target**0.5)))
    w = min(size, max(1, round(target / h)))
    top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    mask = np.zeros((size, size), dtype=np.float32)
    mask[top : top + h, left : left + w] = 1
    return mask


def _stroke(size: int, target: int, rng: np.random.Generator) -> np.ndarray:
    r = max(1, size // 16)
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    inside = dy**2 + dx**2 <= r * r
    dy, dx = dy[inside], dx[inside]
    mask = np.zeros((size, size), dtype=np.float32)
    count, stuck = 0, 0
    y, x, angle = rng.uniform(r, size - r), rng.uniform(r, size - r), rng.uniform(0, 2 * np.pi)
    while count < target:
        py, px = int(y) + dy, int(x) + dx
        ok = (py >= 0) & (py < size) & (px >= 0) & (px < size)
        py, px = py[ok], px[ok]
        new = mask[py, px] == 0
        py, px = py[new][: target - count], px[new][: target - count]
        mask[py, px] = 1
        count += len(py)
        stuck = 0 if len(py) else stuck + 1
        if stuck > 8:  # boxed in by its own stroke: start a new one elsewhere
            y, x = rng.uniform(0, size), rng.uniform(0, size)
            stuck = 0
        angle += rng.normal(0, 0.6)
        y = float(np.clip(y + r * np.sin(angle), 0, size - 1))
        x = float(np.clip(x + r * np.cos(angle), 0, size - 1))
    return mask


def mask_images(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with its hole (``mask`` = 1) set to 0, mid-grey in [-1, 1]."""
    return x * (1 - mask)
