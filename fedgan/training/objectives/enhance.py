"""Enhancement (pix2pix): degraded -> clean; U-Net generator, conditional PatchGAN, LSGAN + L1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedgan.catalog import TASKS
from fedgan.data.degrade import degrade
from fedgan.models.image2image import patch_discriminator, unet_generator
from fedgan.training.objectives.base import Batch, Nets, StepContext, lsgan
from fedgan.training.objectives.image2image import ImageToImage, per_image


class EnhanceObjective(ImageToImage):
    """pix2pix with the least-squares GAN loss of its reference code (bounded generator
    gradients even when the discriminator is confident)."""

    def build(self) -> dict[str, nn.Module]:
        c, s, w = self.cfg.data.channels, self.cfg.data.image_size, self.cfg.model.base_channels
        return {
            "generator": unet_generator(c, s, w),
            "discriminator": patch_discriminator(2 * c, w, s),
        }

    def inputs(self, clean: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return degrade(clean, self.cfg.task, gen)

    def accumulate_gradients(
        self, phase: str, nets: Nets, batch: Batch, ctx: StepContext
    ) -> torch.Tensor:
        task = self.cfg.task
        if phase == "D":

            def d_loss(nets: Nets, b: Batch) -> torch.Tensor:
                d, x, y = nets["discriminator"], b["inputs"], b["targets"]
                with torch.no_grad():
                    fake = nets["generator"](x)
                real_out, _ = d(torch.cat([x, y], 1))
                fake_out, _ = d(torch.cat([x, fake], 1))
                return 0.5 * (lsgan(real_out, 1.0) + lsgan(fake_out, 0.0))

            return ctx.backward(d_loss, nets, batch)

        def g_loss(nets: Nets, b: Batch) -> torch.Tensor:
            x, y = b["inputs"], b["targets"]
            fake = nets["generator"](x)
            out, _ = nets["discriminator"](torch.cat([x, fake], 1))
            return task.adversarial_weight * lsgan(out, 1.0) + task.l1_weight * F.l1_loss(fake, y)

        return ctx.backward(g_loss, nets, batch)

    def baselines(self):  # type: ignore[no-untyped-def]
        from skimage import exposure, restoration

        task = self.cfg.task

        def nlm(img):  # type: ignore[no-untyped-def]
            # Given the true noise level of the degradation model: the strongest NLM baseline.
            photon = float(img.mean()) / task.photons if task.photons > 0 else 0.0
            noisy = "noise" in task.degradation
            sigma = (task.noise_sigma**2 + photon) ** 0.5 if noisy else 0.01
            return restoration.denoise_nl_means(img, h=0.8 * sigma, sigma=sigma, patch_size=3,
                                                patch_distance=5, fast_mode=True)  # fmt: skip

        return {
            "input": lambda x: x,
            "nlm": per_image(nlm),
            "tv": per_image(lambda img: restoration.denoise_tv_chambolle(img, weight=0.08)),
            "hist-eq": per_image(exposure.equalize_hist),
            "clahe": per_image(lambda img: exposure.equalize_adapthist(img, clip_limit=0.01)),
        }


TASKS.add("enhance", EnhanceObjective)
