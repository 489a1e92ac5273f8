"""Preprocessing (fit every slice to the model's size and channels) and training augmentation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from fedgan.config import DataSection

FIT_MODES = ("resize", "crop", "pad", "none")


def convert_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """``[..., C, H, W]`` in [0, 1] to ``channels`` (RGB -> gray by luminance, gray -> RGB by
    repetition).

    Raises:
        ValueError: For a channel count that has no defined conversion.
    """
    c = image.shape[-3]
    if c == channels:
        return image
    if c == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype).view(3, 1, 1)
        return (image * weights).sum(-3, keepdim=True)
    if c == 1 and channels == 3:
        return image.repeat_interleave(3, dim=-3)
    raise ValueError(f"images have {c} channels; data.channels must be 1 or 3 to convert")


def fit_slice(
    image: torch.Tensor, cfg: DataSection, source: str = "", size: int | None = None
) -> torch.Tensor:
    """One ``[C, H, W]`` slice to ``[data.channels, size, size]`` with MONAI's spatial transforms.

    ``data.fit``: ``resize`` stretches to the square, ``crop`` center-crops to a square first
    (keeps the aspect ratio), ``pad`` pads to a square first, ``none`` requires the size as is.
    ``size`` overrides ``data.image_size`` (e.g. the low-resolution input of super-resolution).

    Raises:
        ValueError: Under ``fit: none``, for a slice of another size (naming ``source``).
    """
    from monai.transforms import CenterSpatialCrop, Resize, SpatialPad

    size = size or cfg.image_size
    image = convert_channels(image, cfg.channels)
    h, w = image.shape[-2:]
    if (h, w) != (size, size):
        if cfg.fit == "none":
            raise ValueError(
                f"{source or 'an image'} is {h}x{w}, not {size}x{size}; set data.fit to resize, "
                "crop or pad to fit images of other sizes, or data.image_size to their size"
            )
        if cfg.fit == "crop" and h != w:
            image = CenterSpatialCrop(roi_size=(min(h, w), min(h, w)))(image)
        elif cfg.fit == "pad" and h != w:
            image = SpatialPad(spatial_size=(max(h, w), max(h, w)), mode="constant")(image)
        image = Resize(spatial_size=(size, size), mode="bilinear", anti_aliasing=True)(image)
    return torch.as_tensor(image, dtype=torch.float32).clamp(0.0, 1.0)


def augmenter(cfg: DataSection) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    """Random horizontal flips and small rotations of a training batch, or ``None`` when
    ``data.augment`` is off.

    Batched (one ``affine_grid`` per batch) rather than MONAI's per-image ``RandFlip``/
    ``RandRotate``, which cost more than a discriminator step at these sizes.
    """
    if not cfg.augment:
        return None
    max_angle = math.radians(cfg.augment_rotation)

    def augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = len(batch)
        draw = torch.rand(n, 2, generator=gen).to(batch.device)
        flip = torch.where(draw[:, 0] < 0.5, -1.0, 1.0)
        angle = (draw[:, 1] * 2 - 1) * max_angle
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([cos * flip, -sin, torch.zeros_like(cos)], 1),
                torch.stack([sin * flip, cos, torch.zeros_like(cos)], 1),
            ],
            1,
        ).to(batch.dtype)
        grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
        return F.grid_sample(batch, grid, padding_mode="border", align_corners=False)

    return augment
