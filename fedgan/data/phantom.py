"""Procedural chest-slice phantoms with per-hospital scanner profiles (the embedded, offline data).

Each phantom is an axial chest-like slice: a body outline, two dark lungs, a heart, a bright spine
and smooth tissue texture, all with seeded anatomical variation. A lesion (a bright nodule in one
lung) gives the class label. A :class:`ScannerProfile` then renders the slice the way one
hospital's scanner would (gain, offset, blur, noise), so hospitals differ the way real sites do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner renders anatomy: ``noise(blur(x) * gain + offset)``.

    Attributes:
        gain: Intensity scale.
        offset: Intensity shift.
        noise: Standard deviation of additive Gaussian noise (images in [0, 1]).
        blur: Gaussian blur sigma in pixels at 32 px (scaled with the image size); 0 = sharp.
    """

    gain: float = 1.0
    offset: float = 0.0
    noise: float = 0.01
    blur: float = 0.0


# The first sites are hand-picked to span realistic differences; later ones are drawn (seeded).
_FIXED_PROFILES = (
    ScannerProfile(gain=1.00, offset=0.00, noise=0.010, blur=0.0),
    ScannerProfile(gain=0.80, offset=0.08, noise=0.030, blur=0.7),
    ScannerProfile(gain=1.12, offset=-0.05, noise=0.020, blur=1.0),
    ScannerProfile(gain=0.92, offset=0.03, noise=0.050, blur=0.3),
)


def site_profile(site: int) -> ScannerProfile:
    """The scanner profile of hospital ``site`` (deterministic for every index)."""
    if site < 0:
        raise ValueError(f"site index must be >= 0, got {site}")
    if site < len(_FIXED_PROFILES):
        return _FIXED_PROFILES[site]
    rng = np.random.default_rng(10_000 + site)
    return ScannerProfile(
        gain=float(rng.uniform(0.8, 1.15)),
        offset=float(rng.uniform(-0.05, 0.08)),
        noise=float(rng.uniform(0.01, 0.05)),
        blur=float(rng.uniform(0.0, 1.0)),
    )


def _ellipse(
    x: torch.Tensor, y: torch.Tensor, cx, cy, ax, ay, angle, sharpness: float
) -> torch.Tensor:
    """Soft (anti-aliased) ellipse masks, one per sample; parameters are [n, 1, 1] tensors."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    dx, dy = x - cx, y - cy
    u = (dx * cos + dy * sin) / ax
    v = (-dx * sin + dy * cos) / ay
    r = torch.sqrt(u * u + v * v)
    return torch.sigmoid((1.0 - r) * sharpness)


def render_phantoms(
    n: int, size: int, *, seed: int, lesion_fraction: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders ``n`` clean phantom slices.

    Args:
        n: Number of slices.
        size: Image side in pixels.
        seed: Seed; the same arguments always give the same images.
        lesion_fraction: Probability that a slice has a lesion.

    Returns:
        ``(images, labels)``: float32 ``[n, 1, size, size]`` in [0, 1], and int64 ``[n]``
        (1 = lesion).
    """
    images, labels, _ = render_phantoms_with_masks(
        n, size, seed=seed, lesion_fraction=lesion_fraction
    )
    return images, labels


def render_phantoms_with_masks(
    n: int, size: int, *, seed: int, lesion_fraction: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`render_phantoms` (the same images for the same arguments) with each slice's
    lesion mask: ``[n, 1, size, size]``, 1 where the drawn nodule covers at least half a
    pixel (its anti-aliased edge cut at 0.5), all 0 on a lesion-free slice. A scanner
    profile blurs and shifts intensities but moves nothing, so the masks hold for every
    site's rendering too."""
    g = torch.Generator().manual_seed(seed)

    def u(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(n, 1, 1, generator=g)).float()

    coords = torch.linspace(-1.0, 1.0, size)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    x, y = x[None], y[None]
    sharp = size * 0.6

    body = _ellipse(
        x, y, u(-0.03, 0.03), u(-0.03, 0.03), u(0.78, 0.92), u(0.6, 0.74), u(-0.08, 0.08), sharp
    )
    img = 0.5 * body
    # Smooth tissue texture: a few random low-frequency waves inside the body.
    for _ in range(3):
        fx, fy, phase = u(1.0, 4.0), u(1.0, 4.0), u(0.0, 6.283)
        img = img + 0.04 * body * torch.sin(fx * x * 3.14 + fy * y * 3.14 + phase)
    lung_params = []
    for sign in (-1.0, 1.0):
        cx, cy = sign * u(0.32, 0.42), u(-0.12, 0.02)
        ax, ay = u(0.2, 0.28), u(0.33, 0.45)
        lung = _ellipse(x, y, cx, cy, ax, ay, sign * u(0.0, 0.25), sharp)
        img = img * (1 - lung) + 0.1 * lung
        lung_params.append((cx, cy, ax, ay))
    heart = _ellipse(
        x, y, u(0.02, 0.14), u(0.08, 0.2), u(0.16, 0.24), u(0.13, 0.19), u(-0.5, 0.1), sharp
    )
    img = img * (1 - heart) + 0.68 * heart
    spine = _ellipse(
        x, y, u(-0.02, 0.02), u(0.48, 0.56), u(0.08, 0.11), u(0.08, 0.11), u(0.0, 0.1), sharp
    )
    img = img * (1 - spine) + 0.95 * spine

    labels = (torch.rand(n, generator=g) < lesion_fraction).long()
    side = torch.rand(n, 1, 1, generator=g) < 0.5
    (lcx, lcy, lax, lay), (rcx, rcy, rax, ray) = lung_params
    cx, cy = torch.where(side, lcx, rcx), torch.where(side, lcy, rcy)
    ax, ay = torch.where(side, lax, rax), torch.where(side, lay, ray)
    # Place the nodule inside the chosen lung, away from its border.
    radius, angle = u(0.0, 0.55), u(0.0, 6.283)
    ncx, ncy = cx + radius * ax * torch.cos(angle), cy + radius * ay * torch.sin(angle)
    nr = u(0.07, 0.12)
    nodule = _ellipse(x, y, ncx, ncy, nr, nr, torch.zeros_like(nr), sharp)
    nodule = nodule * labels.view(n, 1, 1).float()
    img = img * (1 - nodule) + 0.62 * nodule
    masks = (nodule >= 0.5).float().unsqueeze(1).contiguous()
    return img.clamp(0.0, 1.0).unsqueeze(1).contiguous(), labels, masks


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, round(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t * t) / (2 * sigma * sigma))
    return k / k.sum()


def apply_scanner(images: torch.Tensor, profile: ScannerProfile, *, seed: int) -> torch.Tensor:
    """Renders clean ``[n, C, H, W]`` images in [0, 1] through a scanner profile (seeded noise).

    Returns:
        Images of the same shape, clipped to [0, 1].
    """
    out = images
    sigma = profile.blur * images.shape[-1] / 32.0
    if sigma > 0.05:
        k = _gaussian_kernel(sigma)
        c = images.shape[1]
        pad = k.numel() // 2
        kx = k.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
        ky = k.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
        out = F.conv2d(F.pad(out, (pad, pad, 0, 0), mode="replicate"), kx, groups=c)
        out = F.conv2d(F.pad(out, (0, 0, pad, pad), mode="replicate"), ky, groups=c)
    out = out * profile.gain + profile.offset
    if profile.noise > 0:
        g = torch.Generator().manual_seed(seed)
        out = out + profile.noise * torch.randn(out.shape, generator=g)
    return out.clamp(0.0, 1.0)
