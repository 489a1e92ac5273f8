"""Super-resolution (SRGAN/ESRGAN): area-downsampled -> full resolution; residual
pixel-shuffle generator, PatchGAN on full-resolution images, pixel L1 + feature loss +
(relativistic) adversarial loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedgan.catalog import TASKS
from fedgan.data.degrade import downsample, upsample
from fedgan.models.image2image import SRGenerator, patch_discriminator
from fedgan.training.objectives.base import Batch, Nets, StepContext, bce
from fedgan.training.objectives.image2image import ImageToImage


class SuperResolutionObjective(ImageToImage):
    """SRGAN/ESRGAN. The relativistic loss compares each image with the batch's mean, so the
    configuration refuses it under DP-SGD."""

    def __init__(self, cfg) -> None:  # type: ignore[no-untyped-def]
        super().__init__(cfg)
        self._vgg: nn.Module | None = None

    def build(self) -> dict[str, nn.Module]:
        c, s, w = self.cfg.data.channels, self.cfg.data.image_size, self.cfg.model.base_channels
        return {
            "generator": SRGenerator(c, self.cfg.task.scale, 2 * w),
            "discriminator": patch_discriminator(c, w, s),
        }

    def inputs(self, clean: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return downsample(clean, self.cfg.task.scale)

    @property
    def input_size(self) -> int:
        return self.cfg.data.image_size // self.cfg.task.scale

    def _vgg_features(self, x: torch.Tensor) -> torch.Tensor:
        if self._vgg is None:
            from torchvision.models import vgg19

            net = vgg19()
            path = self.cfg.task.vgg_weights
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            self._vgg = net.features[:18].eval().requires_grad_(False)  # relu3_4
        net = self._vgg.to(x.device)
        rgb = ((x + 1) / 2).expand(-1, 3, -1, -1)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
        return net((rgb - mean) / std)

    def accumulate_gradients(
        self, phase: str, nets: Nets, batch: Batch, ctx: StepContext
    ) -> torch.Tensor:
        task = self.cfg.task
        if phase == "D":

            def d_loss(nets: Nets, b: Batch) -> torch.Tensor:
                d, y = nets["discriminator"], b["targets"]
                with torch.no_grad():
                    fake = nets["generator"](b["inputs"])
                real_logits, real_feats = d(y)
                fake_logits, _ = d(fake)
                # The generator step of this batch compares with these (pre-update) outputs.
                b.cache["real_d"] = (real_logits.detach(), [f.detach() for f in real_feats])
                if task.relativistic:
                    return 0.5 * (bce(real_logits - fake_logits.mean(), 1.0)
                                  + bce(fake_logits - real_logits.mean(), 0.0))  # fmt: skip
                return 0.5 * (bce(real_logits, 1.0) + bce(fake_logits, 0.0))

            return ctx.backward(d_loss, nets, batch)

        def g_loss(nets: Nets, b: Batch) -> torch.Tensor:
            d, y = nets["discriminator"], b["targets"]
            fake = nets["generator"](b["inputs"])
            logits, feats = d(fake)
            if "real_d" in b.cache:
                real_logits, real_feats = b.cache["real_d"]
            else:
                with torch.no_grad():
                    real_logits, real_feats = d(y)
            if task.relativistic:
                adv = 0.5 * (bce(logits - real_logits.mean(), 1.0)
                             + bce(real_logits - logits.mean(), 0.0))  # fmt: skip
            else:
                adv = bce(logits, 1.0)
            loss = task.adversarial_weight * adv + task.l1_weight * F.l1_loss(fake, y)
            if task.perceptual == "discriminator":
                loss = loss + task.perceptual_weight * sum(
                    F.l1_loss(f, r) for f, r in zip(feats, real_feats, strict=True)
                )
            elif task.perceptual == "vgg":
                loss = loss + task.perceptual_weight * F.l1_loss(
                    self._vgg_features(fake), self._vgg_features(y)
                )
            return loss

        return ctx.backward(g_loss, nets, batch)

    def baselines(self):  # type: ignore[no-untyped-def]
        scale = self.cfg.task.scale
        return {
            "bicubic": lambda x: upsample(x, scale, "bicubic"),
            "bilinear": lambda x: upsample(x, scale, "bilinear"),
        }


TASKS.add("super-resolution", SuperResolutionObjective)
