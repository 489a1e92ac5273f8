"""Inpainting: fill a missing or corrupted region from the rest of the image (pix2pix with the
mask as an input channel); seeded box and stroke holes; biharmonic inpainting as the baseline."""

from __future__ import annotations

import torch
from torch import nn

from fedgan.catalog import TASKS
from fedgan.data.degrade import hole_masks, mask_images
from fedgan.models.image2image import InpaintGenerator, biharmonic_fill, patch_discriminator
from fedgan.training.objectives.enhance import EnhanceObjective


class InpaintObjective(EnhanceObjective):
    """pix2pix's losses (those of ``enhance``) on other inputs: the generator sees the image
    with its hole set to mid-grey and the mask; the discriminator judges (input, completed
    image) pairs. The L1 loss reaches the hole only: the generator passes the given pixels
    through unchanged."""

    def build(self) -> dict[str, nn.Module]:
        c, s, w = self.cfg.data.channels, self.cfg.data.image_size, self.cfg.model.base_channels
        return {
            "generator": InpaintGenerator(c, s, w, prior=self.cfg.task.fill_prior),
            "discriminator": patch_discriminator(2 * c + 1, w, s),
        }

    def inputs(self, clean: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        task = self.cfg.task
        mask = hole_masks(len(clean), clean.shape[-1], task.hole, task.hole_fraction, gen)
        mask = mask.to(clean.device)
        return torch.cat([mask_images(clean, mask), mask], 1)

    def visible(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs[:, : self.cfg.data.channels]

    def region(self, inputs: torch.Tensor) -> torch.Tensor | None:
        return inputs[:, self.cfg.data.channels :]

    def file_inputs(self, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The hole is ``mask`` (1 = missing) or, without one, the image's zero pixels (the
        darkest value, -1 here)."""
        if mask is None:
            mask = (images <= -1).any(1, keepdim=True).float()
        mask = mask.expand(len(images), 1, *images.shape[-2:]).float()
        return torch.cat([mask_images(images, mask), mask], 1)

    def baselines(self):  # type: ignore[no-untyped-def]
        c = self.cfg.data.channels
        return {
            "input": lambda x: x[:, :c],
            "biharmonic": lambda x: biharmonic_fill(x[:, :c], x[:, c : c + 1]),
        }


TASKS.add("inpaint", InpaintObjective)
