"""Anomaly detection (f-AnoGAN, Schlegl et al. 2019): a GAN of healthy images
(``data.train_label``) and an encoder into its latent space, trained together; an image is as
abnormal as the GAN fails to reconstruct it.

Each iteration takes the family's discriminator and generator steps, then one encoder step
with the GAN frozen (izi_f: image residual plus ``task.feature_weight`` times the residual of
the discriminator's features). The encoder federates like the other networks (``encoder.``).

Under DP-SGD both data-reading phases are private, each step with its own Poisson batch and
per-sample clipping (:class:`fedgan.privacy.per_sample.GaussianMechanism`), and both are
charged: the discriminator's steps, and the encoder's, whose loss reads patient images through
the frozen generator (in eval mode, so its BatchNorm uses running statistics that only ever saw
generated images) and the frozen discriminator's features. The generator's steps read no image.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedgan.catalog import TASKS
from fedgan.data.degrade import shift_tolerant_residual
from fedgan.models import ImageShape
from fedgan.models.dcgan import Encoder
from fedgan.training.objectives.base import Batch, Nets, Phase, StepContext
from fedgan.training.objectives.synthesis import SynthesisObjective

if TYPE_CHECKING:
    from fedgan.config import Config


@contextmanager
def evaluating(*nets: nn.Module) -> Iterator[None]:
    """``nets`` in eval mode (a frozen generator's BatchNorm keeps its statistics), then back."""
    modes = [n.training for n in nets]
    for n in nets:
        n.eval()
    try:
        yield
    finally:
        for n, mode in zip(nets, modes, strict=True):
            n.train(mode)


class AnomalyObjective(SynthesisObjective):
    """f-AnoGAN: the family's GAN of healthy anatomy plus an encoder ``E``; the anomaly score
    of ``x`` is ``mean((x - G(E(x)))^2) + kappa * mean((f(x) - f(G(E(x))))^2)`` with ``f`` the
    discriminator's features, its map the per-pixel residual ``|x - G(E(x))|``."""

    detects = True

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.phases = (*self.phases, Phase("E", ("encoder",), reads_data=True))
        # n_critic D steps, one G step and one E step per iteration: the critic schedule
        # paces a two-phase loop, so it does not apply here (the encoder's steps are charged
        # too, and a fixed count is what the noise is calibrated for).
        self.schedule_mode = "fixed"

    def critic_schedule(self) -> None:
        return None

    def build(self) -> dict[str, nn.Module]:
        nets = super().build()
        if not isinstance(getattr(nets["discriminator"], "features", None), nn.Module):
            raise ValueError(
                f"task anomaly needs a discriminator with a feature layer; model.family "
                f"{self.cfg.model.family!r} has none: use dcgan or wgan-gp"
            )
        m = self.cfg.model
        shape = ImageShape(self.cfg.data.channels, self.cfg.data.image_size)
        nets["encoder"] = Encoder(m.latent_dim, shape, m.base_channels)
        return nets

    def accumulate_gradients(
        self, phase: str, nets: Nets, batch: Batch, ctx: StepContext
    ) -> torch.Tensor:
        if phase != "E":
            return super().accumulate_gradients(phase, nets, batch, ctx)
        kappa = self.cfg.task.feature_weight

        def e_loss(nets: Nets, b: Batch) -> torch.Tensor:
            g, d, e = nets["generator"], nets["discriminator"], nets["encoder"]
            real = b["real"]
            with evaluating(g, d):
                rec = g(e(real))
                with torch.no_grad():
                    target = d.features(real)
                return F.mse_loss(rec, real) + kappa * F.mse_loss(d.features(rec), target)

        return ctx.backward(e_loss, nets, batch)

    @torch.no_grad()
    def anomaly_maps(
        self, nets: Nets, images: torch.Tensor, batch: int = 128, shift: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scores [N], maps [N, 1, H, W], reconstructions)`` of ``images`` in [-1, 1],
        on the networks' device; maps are ``|x - G(E(x))|`` averaged over channels, each
        pixel's smallest over shifts of the reconstruction by up to ``shift`` px
        (:func:`fedgan.data.degrade.shift_tolerant_residual`; ``task.map_shift`` without
        one)."""
        g, d, e = nets["generator"], nets["discriminator"], nets["encoder"]
        device = next(g.parameters()).device
        kappa = self.cfg.task.feature_weight
        shift = self.cfg.task.map_shift if shift is None else shift
        scores, maps, recs = [], [], []
        with evaluating(g, d, e):
            for x in images.split(batch):
                x = x.to(device)
                rec = g(e(x))
                pixel = (x - rec).square().flatten(1).mean(1)
                feat = (d.features(x) - d.features(rec)).square().flatten(1).mean(1)
                scores.append((pixel + kappa * feat).cpu())
                maps.append(shift_tolerant_residual(x, rec, shift).cpu())
                recs.append(rec.cpu())
        return torch.cat(scores), torch.cat(maps), torch.cat(recs)

    @torch.no_grad()
    def critic_scores(self, nets: Nets, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
        """``[N]``: ``-D(x)``, how unreal the discriminator finds each image (higher = more
        abnormal), on the networks' device."""
        d = nets["discriminator"]
        device = next(d.parameters()).device
        with evaluating(d):
            return torch.cat([-d(x.to(device)).flatten().cpu() for x in images.split(batch)])


TASKS.add("anomaly", AnomalyObjective)
