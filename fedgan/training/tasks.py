"""Image-to-image tasks: enhancement (pix2pix), super-resolution (SRGAN/ESRGAN), translation
(CycleGAN). Each task builds its networks, turns clean images into its inputs and targets,
and takes one training step; the loop is shared. No Flower here.

Networks are named so that federation and checkpoints treat them like the synthesis GANs:
``generator`` is always the network that maps an input to the task's output (the one
``fedgan enhance`` applies), ``discriminator`` judges the output domain; ``translate`` adds
``generator_ba`` and ``discriminator_a`` for the way back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from fedgan.data.degrade import degrade, downsample, mr_contrast, upsample
from fedgan.data.transforms import augmenter
from fedgan.models.base import FAMILIES
from fedgan.models.image2image import SRGenerator, patch_discriminator, unet_generator
from fedgan.registry import Registry
from fedgan.training.loop import LocalStats, batches, train_local

if TYPE_CHECKING:
    from torch.utils.data import TensorDataset

    from fedgan.config import Config, TaskSection

Nets = Mapping[str, nn.Module]
Opts = Mapping[str, Optimizer]


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _lsgan(out: torch.Tensor, target: float) -> torch.Tensor:
    return F.mse_loss(out, torch.full_like(out, target))


def _step(opt: Optimizer, loss: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@dataclass(frozen=True)
class Pairs:
    """A task's batch: generator ``inputs`` and the ``targets`` it should produce (for
    ``translate`` the targets are unpaired images of the other domain during training)."""

    inputs: torch.Tensor
    targets: torch.Tensor


class ImageTask:
    """What every task provides; subclasses fill in the networks and the step."""

    name = ""

    def build(self, cfg: Config) -> dict[str, nn.Module]:
        raise NotImplementedError

    def pairs(self, clean: torch.Tensor, other: torch.Tensor, cfg: TaskSection,
              gen: torch.Generator) -> Pairs:  # fmt: skip
        """Training pairs from a batch of clean images (``other``: a second, independent
        batch, for unpaired tasks)."""
        raise NotImplementedError

    def eval_pairs(self, clean: torch.Tensor, cfg: TaskSection, seed: int) -> Pairs:
        """Held-out pairs with their ground truth (seeded: every evaluation sees the same)."""
        return self.pairs(clean, clean, cfg, torch.Generator().manual_seed(seed))

    def step(self, nets: Nets, opts: Opts, batch: Pairs, cfg: TaskSection) -> tuple[float, float]:
        """One discriminator and one generator update; returns ``(d_loss, g_loss)``."""
        raise NotImplementedError

    def baselines(self, cfg: TaskSection) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Classical methods measured the same way (inputs -> outputs, in [-1, 1])."""
        return {}


TASKS: Registry[ImageTask] = Registry("task")


def _width(cfg: Config) -> int:
    return cfg.model.base_channels


class EnhanceTask(ImageTask):
    """pix2pix: degraded -> clean; U-Net generator, conditional PatchGAN, LSGAN + L1."""

    name = "enhance"

    def build(self, cfg: Config) -> dict[str, nn.Module]:
        c, s = cfg.data.channels, cfg.data.image_size
        return {
            "generator": unet_generator(c, s, _width(cfg)),
            "discriminator": patch_discriminator(2 * c, _width(cfg), s),
        }

    def pairs(self, clean, other, cfg, gen):  # type: ignore[no-untyped-def]
        return Pairs(degrade(clean, cfg, gen), clean)

    def step(self, nets, opts, batch, cfg):  # type: ignore[no-untyped-def]
        g, d = nets["generator"], nets["discriminator"]
        x, y = batch.inputs, batch.targets
        fake = g(x)
        # Least-squares GAN loss (pix2pix's reference code): bounded generator gradients
        # even when the discriminator is confident.
        real_out, _ = d(torch.cat([x, y], 1))
        fake_out, _ = d(torch.cat([x, fake.detach()], 1))
        d_loss = _step(opts["discriminator"], 0.5 * (_lsgan(real_out, 1.0) + _lsgan(fake_out, 0.0)))
        out, _ = d(torch.cat([x, fake], 1))
        loss = cfg.adversarial_weight * _lsgan(out, 1.0) + cfg.l1_weight * F.l1_loss(fake, y)
        return d_loss, _step(opts["generator"], loss)

    def baselines(self, cfg):  # type: ignore[no-untyped-def]
        from skimage import exposure, restoration

        def nlm(img):
            # Given the true noise level of the degradation model: the strongest NLM baseline.
            photon = float(img.mean()) / cfg.photons if cfg.photons > 0 else 0.0
            noisy = "noise" in cfg.degradation
            sigma = (cfg.noise_sigma**2 + photon) ** 0.5 if noisy else 0.01
            return restoration.denoise_nl_means(img, h=0.8 * sigma, sigma=sigma, patch_size=3,
                                                patch_distance=5, fast_mode=True)  # fmt: skip

        return {
            "input": lambda x: x,
            "nlm": _per_image(nlm),
            "tv": _per_image(lambda img: restoration.denoise_tv_chambolle(img, weight=0.08)),
            "hist-eq": _per_image(exposure.equalize_hist),
            "clahe": _per_image(lambda img: exposure.equalize_adapthist(img, clip_limit=0.01)),
        }


class SuperResolutionTask(ImageTask):
    """SRGAN/ESRGAN: area-downsampled -> full resolution; residual pixel-shuffle generator,
    PatchGAN on full-resolution images, pixel L1 + feature loss + (relativistic) adversarial."""

    name = "super-resolution"

    def __init__(self) -> None:
        self._vgg: dict[str, nn.Module] = {}

    def build(self, cfg: Config) -> dict[str, nn.Module]:
        c, s = cfg.data.channels, cfg.data.image_size
        return {
            "generator": SRGenerator(c, cfg.task.scale, 2 * _width(cfg)),
            "discriminator": patch_discriminator(c, _width(cfg), s),
        }

    def pairs(self, clean, other, cfg, gen):  # type: ignore[no-untyped-def]
        return Pairs(downsample(clean, cfg.scale), clean)

    def _vgg_features(self, cfg: TaskSection, x: torch.Tensor) -> torch.Tensor:
        if cfg.vgg_weights not in self._vgg:
            from torchvision.models import vgg19

            net = vgg19()
            net.load_state_dict(torch.load(cfg.vgg_weights, map_location="cpu", weights_only=True))
            self._vgg[cfg.vgg_weights] = net.features[:18].eval().requires_grad_(False)  # relu3_4
        net = self._vgg[cfg.vgg_weights].to(x.device)
        rgb = ((x + 1) / 2).expand(-1, 3, -1, -1)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
        return net((rgb - mean) / std)

    def step(self, nets, opts, batch, cfg):  # type: ignore[no-untyped-def]
        g, d = nets["generator"], nets["discriminator"]
        y = batch.targets
        fake = g(batch.inputs)
        real_logits, real_feats = d(y)
        fake_logits, _ = d(fake.detach())
        if cfg.relativistic:
            d_loss = 0.5 * (_bce(real_logits - fake_logits.mean(), 1.0)
                            + _bce(fake_logits - real_logits.mean(), 0.0))  # fmt: skip
        else:
            d_loss = 0.5 * (_bce(real_logits, 1.0) + _bce(fake_logits, 0.0))
        d_value = _step(opts["discriminator"], d_loss)
        logits, feats = d(fake)
        real_logits = real_logits.detach()
        if cfg.relativistic:
            adv = 0.5 * (_bce(logits - real_logits.mean(), 1.0)
                         + _bce(real_logits - logits.mean(), 0.0))  # fmt: skip
        else:
            adv = _bce(logits, 1.0)
        loss = cfg.adversarial_weight * adv + cfg.l1_weight * F.l1_loss(fake, y)
        if cfg.perceptual == "discriminator":
            loss = loss + cfg.perceptual_weight * sum(
                F.l1_loss(f, r.detach()) for f, r in zip(feats, real_feats, strict=True)
            )
        elif cfg.perceptual == "vgg":
            loss = loss + cfg.perceptual_weight * F.l1_loss(
                self._vgg_features(cfg, fake), self._vgg_features(cfg, y)
            )
        return d_value, _step(opts["generator"], loss)

    def baselines(self, cfg):  # type: ignore[no-untyped-def]
        return {
            "bicubic": lambda x: upsample(x, cfg.scale, "bicubic"),
            "bilinear": lambda x: upsample(x, cfg.scale, "bilinear"),
        }


def cycle_loss(
    g_ab: nn.Module,
    g_ba: nn.Module,
    a: torch.Tensor,
    b: torch.Tensor,
    fake_b: torch.Tensor | None = None,
    fake_a: torch.Tensor | None = None,
) -> torch.Tensor:
    """CycleGAN's cycle consistency: ``|G_ba(G_ab(a)) - a| + |G_ab(G_ba(b)) - b|`` (L1)."""
    fake_b = g_ab(a) if fake_b is None else fake_b
    fake_a = g_ba(b) if fake_a is None else fake_a
    return F.l1_loss(g_ba(fake_b), a) + F.l1_loss(g_ab(fake_a), b)


class TranslateTask(ImageTask):
    """CycleGAN: domain A (the data as held) <-> domain B (``task.target``), unpaired; two
    U-Net generators, two PatchGANs, LSGAN + cycle-consistency + identity losses."""

    name = "translate"

    def build(self, cfg: Config) -> dict[str, nn.Module]:
        c, s, w = cfg.data.channels, cfg.data.image_size, _width(cfg)
        return {
            "generator": unet_generator(c, s, w),  # A -> B
            "discriminator": patch_discriminator(c, w, s),  # judges B
            "generator_ba": unet_generator(c, s, w),
            "discriminator_a": patch_discriminator(c, w, s),
        }

    def pairs(self, clean, other, cfg, gen):  # type: ignore[no-untyped-def]
        # Training: B images come from another batch, so no pair is ever seen.
        return Pairs(clean, mr_contrast(other))

    def step(self, nets, opts, batch, cfg):  # type: ignore[no-untyped-def]
        g_ab, g_ba = nets["generator"], nets["generator_ba"]
        d_b, d_a = nets["discriminator"], nets["discriminator_a"]
        a, b = batch.inputs, batch.targets
        fake_b, fake_a = g_ab(a), g_ba(b)
        adv = _lsgan(d_b(fake_b)[0], 1.0) + _lsgan(d_a(fake_a)[0], 1.0)
        cycle = cycle_loss(g_ab, g_ba, a, b, fake_b, fake_a)
        identity = F.l1_loss(g_ab(b), b) + F.l1_loss(g_ba(a), a) if cfg.identity_weight else 0.0
        g_loss = cfg.adversarial_weight * adv + cfg.cycle_weight * cycle
        g_loss = g_loss + cfg.identity_weight * identity
        for name in ("generator", "generator_ba"):
            opts[name].zero_grad(set_to_none=True)
        g_loss.backward()  # type: ignore[union-attr]
        for name in ("generator", "generator_ba"):
            opts[name].step()
        d_value = 0.0
        for d, real, fake, name in ((d_b, b, fake_b, "discriminator"),
                                    (d_a, a, fake_a, "discriminator_a")):  # fmt: skip
            loss = 0.5 * (_lsgan(d(real)[0], 1.0) + _lsgan(d(fake.detach())[0], 0.0))
            d_value += _step(opts[name], loss) / 2
        return d_value, float(g_loss.detach())  # type: ignore[union-attr]

    def eval_pairs(self, clean, cfg, seed):  # type: ignore[no-untyped-def]
        return Pairs(clean, mr_contrast(clean))  # the ground truth of the same anatomy

    def baselines(self, cfg):  # type: ignore[no-untyped-def]
        import numpy as np
        from skimage.exposure import match_histograms

        def matched(x: torch.Tensor) -> torch.Tensor:
            # Each image's histogram matched to another image of the target domain (unpaired).
            reference = mr_contrast(x.roll(1, dims=0))
            out = [
                match_histograms(i[0].numpy(), r[0].numpy())
                for i, r in zip(x, reference, strict=True)
            ]
            return torch.from_numpy(np.stack(out)).to(x.dtype).unsqueeze(1)

        return {"input": lambda x: x, "histogram-matching": matched}


def _per_image(fn: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """A scikit-image function on [0, 1] grayscale arrays, applied to ``[N, 1, H, W]`` in
    [-1, 1]."""
    import numpy as np

    def apply(x: torch.Tensor) -> torch.Tensor:
        unit = ((x.detach().cpu() + 1) / 2).clamp(0, 1).numpy().astype(np.float64)
        out = np.stack([[fn(img) for img in sample] for sample in unit])
        return torch.from_numpy(out).float() * 2 - 1

    return apply


for _task in (EnhanceTask(), SuperResolutionTask(), TranslateTask()):
    TASKS.add(_task.name, _task)


def train_task(
    task: ImageTask,
    nets: Nets,
    optimizers: Opts,
    dataset: TensorDataset,
    cfg: Config,
    *,
    steps: int,
    seed: int,
    device: torch.device,
) -> LocalStats:
    """Runs ``steps`` updates of ``task`` on ``dataset``'s images (pairs made on the fly,
    seeded by ``seed``)."""
    start = time.perf_counter()
    for net in nets.values():
        net.train()
    cpu_gen = torch.Generator().manual_seed(seed)
    images = dataset.tensors[0].to(device)
    labels = dataset.tensors[1].to(device)
    real = batches(images, labels, cfg.train.batch_size, cpu_gen)
    other = batches(images, labels, cfg.train.batch_size, torch.Generator().manual_seed(seed + 1))
    d_total = g_total = 0.0
    examples = 0
    for _ in range(steps):
        clean, _ = next(real)
        unpaired, _ = next(other)
        batch = task.pairs(clean, unpaired, cfg.task, cpu_gen)
        d_loss, g_loss = task.step(nets, optimizers, batch, cfg.task)
        d_total += d_loss
        g_total += g_loss
        examples += len(clean)
    return LocalStats(
        steps=steps,
        examples=examples,
        d_loss=d_total / max(steps, 1),
        g_loss=g_total / max(steps, 1),
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def apply_generator(generator: nn.Module, inputs: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """``generator`` over ``inputs`` in eval mode, in batches, on the generator's device."""
    generator.eval()
    device = next(generator.parameters()).device
    out = [generator(inputs[i : i + batch].to(device)).cpu() for i in range(0, len(inputs), batch)]
    return torch.cat(out)


def networks_for(cfg: Config) -> dict[str, nn.Module]:
    """Every network of the configured task, seeded by ``run.seed``: the GAN family's
    generator and discriminator for ``synthesis``, the task's networks otherwise."""
    from fedgan.models import ImageShape, build_networks

    if cfg.task.name == "synthesis":
        shape = ImageShape(cfg.data.channels, cfg.data.image_size)
        return build_networks(cfg.model, shape, seed=cfg.run.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        return TASKS.get(cfg.task.name).build(cfg)


def train_steps(
    cfg: Config,
    nets: Nets,
    optimizers: Opts,
    dataset: TensorDataset,
    *,
    steps: int,
    seed: int,
    device: torch.device,
) -> LocalStats:
    """``steps`` non-private updates of whatever ``cfg`` trains: the task's networks, or the
    GAN family's generator and discriminator (with ``data.augment``). The one dispatch that a
    hospital's round and the centralized baseline share."""
    if cfg.task.name != "synthesis":
        return train_task(TASKS.get(cfg.task.name), nets, optimizers, dataset, cfg,
                          steps=steps, seed=seed, device=device)  # fmt: skip
    family = FAMILIES.get(cfg.model.family)
    return train_local(family, nets, optimizers, dataset, cfg.train, steps=steps, seed=seed,
                       device=device, augment=augmenter(cfg.data))  # fmt: skip
