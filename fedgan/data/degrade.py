"""Seeded degradation models that turn any set of clean images into paired training data.

Images are ``[N, C, H, W]`` in [-1, 1] (the training range) unless a function says otherwise.
Every function takes a ``torch.Generator``, so the same seed gives the same pairs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
