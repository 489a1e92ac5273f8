"""Differentiable augmentation of the discriminator's inputs (DiffAugment; Zhao et al. 2020,
"Differentiable Augmentation for Data-Efficient GAN Training").

The same random family of transforms is applied to real and to generated images, in the
discriminator's steps and in the generator's (whose gradient flows back through it), so the
discriminator cannot memorize a small training set and the generator is not taught the
transforms (unlike ``data.augment``, which changes only the real images).

The random draws are made once per batch, as one row of uniforms per image
(:func:`draw`), and stored in the batch beside the images, so a private step that splits its
batch into physical batches, or evaluates its loss again, transforms each image the same way;
each image's transform depends on its own row only, so per-sample clipping still bounds each
patient image's influence.
"""

from __future__ import annotations

import torch

from fedgan.config import DIFF_AUGMENT_POLICIES as POLICIES

#: Uniform draws per image: brightness, saturation, contrast; two shifts; two cutout corners.
DRAWS = 7


def draw(
    n: int, gen: torch.Generator, device: torch.device | str = "cpu", views: int = 1
) -> torch.Tensor:
    """``[n, views * DRAWS]`` uniforms in [0, 1): the random part of ``n`` images' transforms,
    ``views`` independent ones per image (one row per image, so a batch split by rows keeps
    each image's draws)."""
    return torch.rand(n, views * DRAWS, generator=gen).to(device)


def apply_views(x: torch.Tensor, u: torch.Tensor, policies: tuple[str, ...]) -> torch.Tensor:
    """``x`` ([N, ...]) under each of the views in ``u`` ([N, V * DRAWS], :func:`draw`):
    ``[V * N, ...]``, view-major, so row ``v * N + i`` is image ``i`` under view ``v`` (the
    layout paired ghost clipping groups by: every row of image ``i`` is one privacy unit)."""
    views = u.shape[1] // DRAWS
    return torch.cat([apply(x, u[:, v * DRAWS : (v + 1) * DRAWS], policies) for v in range(views)])


def apply(
    x: torch.Tensor,
    u: torch.Tensor,
    policies: tuple[str, ...],
    translation: float = 0.125,
    cutout: float = 0.5,
) -> torch.Tensor:
    """``x`` ([N, C, H, W] in [-1, 1]) transformed by ``policies`` with draws ``u`` ([N, 7]),
    as DiffAugment's reference code does: ``color`` adds a brightness in [-0.5, 0.5), scales
    the saturation by [0, 2) (colour images only) and the contrast by [0.5, 1.5); ``translation``
    shifts by up to ``translation`` of the side, whole pixels, zero-padded; ``cutout`` zeroes a
    square of ``cutout`` times the side at a random place (clipped at the border)."""
    if "color" in policies:
        x = x + (u[:, 0] - 0.5).view(-1, 1, 1, 1).to(x.dtype)
        if x.shape[1] > 1:
            mean = x.mean(1, keepdim=True)
            x = (x - mean) * (u[:, 1] * 2).view(-1, 1, 1, 1).to(x.dtype) + mean
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * (u[:, 2] + 0.5).view(-1, 1, 1, 1).to(x.dtype) + mean
    h, w = x.shape[-2:]
    if "translation" in policies:
        sy, sx = int(h * translation + 0.5), int(w * translation + 0.5)
        dy = (u[:, 3] * (2 * sy + 1)).floor() - sy  # whole pixels in [-sy, sy]
        dx = (u[:, 4] * (2 * sx + 1)).floor() - sx
        rows = torch.arange(h, device=x.device).view(1, h, 1) - dy.view(-1, 1, 1).long()
        cols = torch.arange(w, device=x.device).view(1, 1, w) - dx.view(-1, 1, 1).long()
        inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)
        index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).flatten(1)  # [N, H*W]
        flat = x.flatten(2)
        moved = flat.gather(2, index.unsqueeze(1).expand(-1, x.shape[1], -1))
        x = moved.view_as(x) * inside.to(x.dtype)
    if "cutout" in policies:
        ch, cw = int(h * cutout + 0.5), int(w * cutout + 0.5)
        # the square's centre anywhere in the image (as the reference code draws it)
        top = (u[:, 5] * (h + 1 - ch % 2)).floor().long().view(-1, 1, 1) - ch // 2
        left = (u[:, 6] * (w + 1 - cw % 2)).floor().long().view(-1, 1, 1) - cw // 2
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        hole = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
        x = x * (~hole).unsqueeze(1).to(x.dtype)
    return x


__all__ = ["DRAWS", "POLICIES", "apply", "apply_views", "draw"]
