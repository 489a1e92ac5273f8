"""Networks of the image-to-image tasks, built from MONAI's blocks.

- :func:`unet_generator`: pix2pix / CycleGAN generator (MONAI ``UNet``, instance norm, residual).
- :class:`SRGenerator`: SRGAN/ESRGAN-style residual generator with pixel-shuffle upsampling
  (MONAI ``SubpixelUpsample``), predicting a residual over bicubic interpolation.
- :class:`InpaintGenerator`: a U-Net that fills a masked hole and keeps the given pixels.
- :func:`patch_discriminator`: PatchGAN (MONAI ``PatchDiscriminator``) with GroupNorm, never
  BatchNorm, so Opacus can privatize it; it returns its intermediate features too, which the
  feature (perceptual) loss matches without any downloaded weights.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn


class ResidualMap(nn.Module):
    """``x + gain * net(x)`` clipped to [-1, 1], with ``gain`` learnt from 0 (ReZero): the
    generator starts as the identity (its input is already close to the output in enhancement
    and translation of the same anatomy), so the adversarial loss of a strong early
    discriminator cannot throw it far from the data."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.gain = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.gain * self.net(x)).clamp(-1, 1)


def _levels(size: int, deepest: int = 4) -> int:
    # Down to 4x4 at most: a 16 px image gets 3 levels, 32 px and more get 4.
    return max(2, min(deepest, int(math.log2(size)) - 2))


def unet_generator(channels: int, size: int, width: int) -> nn.Module:
    """A residual U-Net from ``channels`` to ``channels`` images (skip connections at every
    level; see :class:`ResidualMap`)."""
    from monai.networks.nets import UNet

    levels = _levels(size)
    return ResidualMap(
        UNet(
            spatial_dims=2,
            in_channels=channels,
            out_channels=channels,
            channels=tuple(width * 2**i for i in range(levels + 1)),
            strides=(2,) * levels,
            num_res_units=1,
            norm="INSTANCE",
        )
    )


def biharmonic_fill(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``image`` ([N, C, H, W] in [-1, 1]) with its hole (``mask`` = 1) filled by biharmonic
    inpainting (``skimage.restoration.inpaint_biharmonic``, the inpainting task's classical
    baseline), image by image on the CPU; the given pixels come back unchanged. No gradient
    flows through it: the fill depends on the given pixels only."""
    import numpy as np
    from skimage.restoration import inpaint_biharmonic

    unit = ((image.detach().cpu().double() + 1) / 2).clamp(0, 1).numpy()
    holes = mask.detach().cpu().numpy()[:, 0] > 0.5
    out = np.stack([
        inpaint_biharmonic(img, hole, channel_axis=0) if hole.any() else img
        for img, hole in zip(unit, holes, strict=True)
    ])  # fmt: skip
    filled = torch.from_numpy(out).to(image).clamp(0, 1) * 2 - 1
    return image * (1 - mask) + filled * mask


class InpaintGenerator(nn.Module):
    """Fills holes: ``[N, C + 1, H, W]`` (the image with its hole set to 0, then the mask, 1 =
    missing) -> ``[N, C, H, W]``, a U-Net's output inside the hole and the given pixels,
    unchanged, outside it (so only the hole is learnt and scored).

    With ``prior="biharmonic"`` the hole is first filled by :func:`biharmonic_fill` and the U-Net,
    given that filled image, learns a correction to it from zero (a ReZero gain, as in
    :class:`ResidualMap`): training starts from a classical inpainting, not from mid-grey.
    The fill depends on the input alone, so it is solved once per input tensor: the
    discriminator's and the generator's phases of one step share their batch and its fill."""

    def __init__(self, channels: int, size: int, width: int, prior: str = "none") -> None:
        super().__init__()
        from monai.networks.nets import UNet

        if prior not in ("none", "biharmonic"):
            raise ValueError(f"prior must be none or biharmonic, got {prior!r}")
        self.channels = channels
        self.prior = prior
        if prior == "biharmonic":
            self.gain = nn.Parameter(torch.zeros(()))
        # (the input, its version counter, its fill): the last fill solved, reused while the
        # same tensor comes back unmodified.
        self._last: tuple[weakref.ref[torch.Tensor], int, torch.Tensor] | None = None
        levels = _levels(size)
        self.net = UNet(
            spatial_dims=2,
            in_channels=channels + 1,
            out_channels=channels,
            channels=tuple(width * 2**i for i in range(levels + 1)),
            strides=(2,) * levels,
            num_res_units=1,
            norm="INSTANCE",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image, mask = x[:, : self.channels], x[:, self.channels :]
        if self.prior == "biharmonic":
            start = self._fill(x, image, mask)
            fill = (start + self.gain * self.net(torch.cat([start, mask], 1))).clamp(-1, 1)
        else:
            fill = torch.tanh(self.net(x))
        return image * (1 - mask) + fill * mask

    def _fill(self, x: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version:
            return last[2]
        start = biharmonic_fill(image, mask)
        self._last = (weakref.ref(x), x._version, start)
        return start

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_last"] = None  # a cache: never pickled or copied
        return state


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.PReLU(width),
            nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.body(x)  # residual scaling, as in ESRGAN


class SRGenerator(nn.Module):
    """Low-resolution ``[N, C, h, w]`` to ``[N, C, h*scale, w*scale]``: residual blocks at low
    resolution, then one pixel-shuffle x2 stage per factor of two, added to bicubic upsampling
    (the network learns only what interpolation misses)."""

    def __init__(self, channels: int, scale: int, width: int, blocks: int = 6) -> None:
        super().__init__()
        from monai.networks.blocks import SubpixelUpsample

        self.scale = scale
        self.head = nn.Conv2d(channels, width, 3, padding=1)
        self.body = nn.Sequential(*(_Residual(width) for _ in range(blocks)))
        self.up = nn.Sequential(
            *(
                nn.Sequential(
                    SubpixelUpsample(2, width, width, scale_factor=2, apply_pad_pool=False),
                    nn.PReLU(width),
                )
                for _ in range(int(math.log2(scale)))
            )
        )
        self.tail = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # start as plain bicubic interpolation
        nn.init.zeros_(self.tail.bias)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        features = self.head(x)
        features = features + self.body(features)
        return (base + self.tail(self.up(features))).clamp(-1, 1)


class PatchD(nn.Module):
    """MONAI's PatchGAN discriminator returning ``(patch logits, [intermediate features])``."""

    def __init__(self, in_channels: int, width: int, size: int) -> None:
        super().__init__()
        from monai.networks.nets import PatchDiscriminator

        self.net = PatchDiscriminator(
            spatial_dims=2,
            channels=width,
            in_channels=in_channels,
            num_layers_d=2 if size <= 16 else 3,
            norm=("GROUP", {"num_groups": 4}),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        *features, logits = self.net(x)
        return logits, features


def patch_discriminator(in_channels: int, width: int, size: int) -> PatchD:
    return PatchD(in_channels, width, size)
