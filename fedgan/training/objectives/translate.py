"""Modality translation (CycleGAN): domain A (the data as held) <-> domain B (``task.target``),
unpaired; two U-Net generators, two PatchGANs, LSGAN + cycle-consistency + identity losses."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedgan.catalog import TASKS
from fedgan.data.degrade import mr_contrast
from fedgan.models.image2image import patch_discriminator, unet_generator
from fedgan.training.objectives.base import Batch, Nets, Phase, StepContext, lsgan
from fedgan.training.objectives.image2image import ImageToImage

#: Target domains of ``task.target``: how an image of domain A looks in domain B.
TARGETS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"mr-contrast": mr_contrast}


def cycle_loss(
    g_ab: Callable[[torch.Tensor], torch.Tensor],
    g_ba: Callable[[torch.Tensor], torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    fake_b: torch.Tensor | None = None,
    fake_a: torch.Tensor | None = None,
) -> torch.Tensor:
    """CycleGAN's cycle consistency: ``|G_ba(G_ab(a)) - a| + |G_ab(G_ba(b)) - b|`` (L1)."""
    fake_b = g_ab(a) if fake_b is None else fake_b
    fake_a = g_ba(b) if fake_a is None else fake_a
    return F.l1_loss(g_ba(fake_b), a) + F.l1_loss(g_ab(fake_a), b)


class TranslateObjective(ImageToImage):
    """CycleGAN: the generators' phase first, then both discriminators on the same fakes.

    Without DP the B images of a batch come from another batch, so no pair is ever seen.
    Under DP-SGD row ``i``'s B image is rendered from its own A image (one privacy unit per
    row); no loss compares the two, so the training stays unpaired in what it learns from.
    """

    unpaired = True
    phases = (
        Phase("G", ("generator", "generator_ba"), reads_data=True),
        Phase("D", ("discriminator", "discriminator_a"), reads_data=True),
    )

    def build(self) -> dict[str, nn.Module]:
        c, s, w = self.cfg.data.channels, self.cfg.data.image_size, self.cfg.model.base_channels
        return {
            "generator": unet_generator(c, s, w),  # A -> B
            "discriminator": patch_discriminator(c, w, s),  # judges B
            "generator_ba": unet_generator(c, s, w),
            "discriminator_a": patch_discriminator(c, w, s),
        }

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return TARGETS[self.cfg.task.target](x)

    def make_batch(self, real, labels, other, ctx):  # type: ignore[no-untyped-def]
        return Batch({"a": real, "b": self.target(real if other is None else other)})

    def eval_pairs(self, clean: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return clean, self.target(clean)  # the ground truth of the same anatomy

    def accumulate_gradients(
        self, phase: str, nets: Nets, batch: Batch, ctx: StepContext
    ) -> torch.Tensor:
        task = self.cfg.task
        if phase == "G":

            def g_loss(nets: Nets, bt: Batch) -> torch.Tensor:
                g_ab, g_ba = nets["generator"], nets["generator_ba"]
                a, b = bt["a"], bt["b"]
                fake_b, fake_a = g_ab(a), g_ba(b)
                bt.cache["fakes"] = (fake_b.detach(), fake_a.detach())
                adv = (lsgan(nets["discriminator"](fake_b)[0], 1.0)
                       + lsgan(nets["discriminator_a"](fake_a)[0], 1.0))  # fmt: skip
                loss = task.adversarial_weight * adv
                loss = loss + task.cycle_weight * cycle_loss(g_ab, g_ba, a, b, fake_b, fake_a)
                if task.identity_weight:
                    identity = F.l1_loss(g_ab(b), b) + F.l1_loss(g_ba(a), a)
                    loss = loss + task.identity_weight * identity
                return loss

            return ctx.backward(g_loss, nets, batch)

        def d_loss(nets: Nets, bt: Batch) -> torch.Tensor:
            a, b = bt["a"], bt["b"]
            if "fakes" in bt.cache:  # the fakes the generators' phase just made
                fake_b, fake_a = bt.cache["fakes"]
            else:
                with torch.no_grad():
                    fake_b, fake_a = nets["generator"](a), nets["generator_ba"](b)
            total: torch.Tensor | float = 0.0
            for d, real, fake in ((nets["discriminator"], b, fake_b),
                                  (nets["discriminator_a"], a, fake_a)):  # fmt: skip
                total = total + 0.5 * (lsgan(d(real)[0], 1.0) + lsgan(d(fake)[0], 0.0))
            return total  # type: ignore[return-value]

        # Each discriminator has its own loss; the sum's gradients are each one's own, and the
        # reported loss is their mean.
        return ctx.backward(d_loss, nets, batch) / 2

    def baselines(self):  # type: ignore[no-untyped-def]
        import numpy as np
        from skimage.exposure import match_histograms

        def matched(x: torch.Tensor) -> torch.Tensor:
            # Each image's histogram matched to another image of the target domain (unpaired).
            reference = self.target(x.roll(1, dims=0))
            out = [
                match_histograms(i[0].numpy(), r[0].numpy())
                for i, r in zip(x, reference, strict=True)
            ]
            return torch.from_numpy(np.stack(out)).to(x.dtype).unsqueeze(1)

        return {"input": lambda x: x, "histogram-matching": matched}


TASKS.add("translate", TranslateObjective)
