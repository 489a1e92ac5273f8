"""Synthesis: new images from noise with any registered GAN family (``model.family``).

Only the discriminator reads real images, so under DP-SGD only its phase is private and the
generator is private by post-processing.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedgan.catalog import TASKS
from fedgan.data.transforms import augmenter
from fedgan.models import FAMILIES, GanFamily, ImageShape
from fedgan.training import augment
from fedgan.training.embedding import (
    RandomFeatures,
    embedding_loss,
    embedding_noise,
    embedding_weight,
)
from fedgan.training.objectives.base import Batch, Nets, Objective, Phase, StepContext
from fedgan.training.schedule import CriticSchedule

if TYPE_CHECKING:
    from fedgan.config import Config


def forward(net: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``net(x)``, or ``net(x, labels)`` for a conditional network."""
    return net(x) if labels is None else net(x, labels)


def gradient_penalty(
    discriminator: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """WGAN-GP's penalty: ``(||grad_x D(x_hat)|| - 1)^2`` at random interpolates of real and
    fake images (Gulrajani et al. 2017)."""
    alpha = torch.rand(len(real), 1, 1, 1, device=real.device, generator=generator)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(
        forward(discriminator, mixed, labels).sum(), mixed, create_graph=True
    )
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def mode_seeking(fake: torch.Tensor, z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """MSGAN's mode-seeking term (Mao et al. 2019): rows ``i`` and ``n + i`` of a batch of
    ``2n`` form pair ``i``; the term is ``1 / (mean|x1 - x2| / mean|z1 - z2| + eps)``, whole-
    batch means as in the reference code. Minimizing it pulls apart the images of different
    latent codes (an odd last row is left out)."""
    n = len(fake) // 2
    images = (fake[:n] - fake[n : 2 * n]).abs().mean()
    codes = (z[:n] - z[n : 2 * n]).abs().mean()
    return 1.0 / (images / codes + eps)


def check_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels of a conditional family, checked against ``model.num_classes``.

    Raises:
        ValueError: If a label is outside ``0..num_classes-1``.
    """
    if len(labels) and (int(labels.max()) >= num_classes or int(labels.min()) < 0):
        raise ValueError(
            f"class label {int(labels.max())} is outside 0..{num_classes - 1}: set "
            "model.num_classes to the number of classes in the data"
        )
    return labels.long()


#: Discriminator steps per generator step a private GAN starts from when ``train.n_critic``
#: is left at 0: only D's steps cost privacy, and a stronger D per generator step is what
#: made DP-SGD GANs usable (Bie et al. 2023). 3 rather than 5: at epsilon 10 it measured as
#: good (simulations/README.md, study 11) at 2.4x a non-private round's time, 5 at 4.5x.
PRIVATE_N_CRITIC = 3


def critic_steps(family: GanFamily, n_critic: int, private: bool = False) -> int:
    """Discriminator steps per generator step: ``train.n_critic``, or the family's default
    (at least :data:`PRIVATE_N_CRITIC` under DP-SGD)."""
    if n_critic:
        return n_critic
    return max(family.n_critic, PRIVATE_N_CRITIC) if private else family.n_critic


def schedule_mode(cfg: Config, family: GanFamily) -> str:
    """``train.critic_schedule`` resolved: ``auto`` is adaptive under DP-SGD (for a family
    whose discriminator has a decision boundary), fixed otherwise.

    Raises:
        ValueError: If ``adaptive`` is asked of a family without a decision boundary.
    """
    mode = cfg.train.critic_schedule
    if mode == "auto":
        private = cfg.privacy.mode == "dp-sgd"
        return "adaptive" if private and family.decision_boundary is not None else "fixed"
    if mode == "adaptive" and family.decision_boundary is None:
        raise ValueError(
            f"config key 'train.critic_schedule': the adaptive schedule watches the "
            f"discriminator's accuracy, and {family.name!r}'s critic has no real/fake boundary; "
            "set train.critic_schedule=fixed (with train.n_critic) or choose another family"
        )
    return mode


#: Under DP-SGD the default critic ceiling is off below this budget per hospital (study 40:
#: at epsilon 1 it slowed two 40-round runs of four, helped two, one of which diverged
#: without it: the extra generator steps are taken against a very noisy discriminator).
CEILING_MIN_EPSILON = 3.0
#: The default ceiling's distance above ``train.critic_threshold``.
CEILING_MARGIN = 0.05


def critic_ceiling(cfg: Config) -> float:
    """``train.critic_ceiling`` with its default rule: -1 is ``critic_threshold + 0.05``
    (0.65), or 0 (off) under DP-SGD below epsilon 3 and for a threshold above 0.95, whose
    ceiling could never be reached; any other value as it is."""
    t = cfg.train
    if t.critic_ceiling != -1:
        return t.critic_ceiling
    if cfg.privacy.mode == "dp-sgd" and cfg.privacy.target_epsilon < CEILING_MIN_EPSILON:
        return 0.0
    ceiling = round(t.critic_threshold + CEILING_MARGIN, 6)
    return ceiling if ceiling <= 1.0 else 0.0


#: The default cap on the adaptive schedule's n_D where the default ceiling is on under DP-SGD
#: (study 42: a round of 120 discriminator steps at n_D 50 buys a hospital two generator steps,
#: and under Dirichlet 0.5 the hospitals that climbed there held the federation back).
CRITIC_MAX = 10


def critic_max(cfg: Config) -> int:
    """``train.critic_max`` with its default rule: -1 is :data:`CRITIC_MAX` under DP-SGD from
    epsilon 3 (where the default ceiling is on), 0 (no cap) elsewhere; any other value as it
    is."""
    t = cfg.train
    if t.critic_max != -1:
        return t.critic_max
    private = cfg.privacy.mode == "dp-sgd"
    return CRITIC_MAX if private and cfg.privacy.target_epsilon >= CEILING_MIN_EPSILON else 0


class SynthesisObjective(Objective):
    """A GAN family's losses: ``n_critic`` discriminator steps on real and generated images,
    then one generator step through the discriminator."""

    def __init__(self, cfg: Config, family: GanFamily | None = None) -> None:
        super().__init__(cfg)
        self.family = family or FAMILIES.get(cfg.model.family)
        self.augment = augmenter(cfg.data)
        self.diff_augment = cfg.train.diff_augment_policies
        self.views = cfg.train.diff_augment_views if self.diff_augment else 1
        self.phases = (
            Phase("D", ("discriminator",), reads_data=True,
                  repeats=critic_steps(self.family, cfg.train.n_critic,
                                       private=cfg.privacy.mode == "dp-sgd")),
            Phase("G", ("generator",), reads_data=False),
        )  # fmt: skip
        self.schedule_mode = schedule_mode(cfg, self.family)
        cap, start = critic_max(cfg), self.phases[0].repeats
        if self.schedule_mode == "adaptive" and 0 < cap < start:
            raise ValueError(
                f"config key 'train.critic_max': {cap} is below {start}, where the adaptive "
                "schedule starts (train.n_critic, at least 3 under DP-SGD); raise it, or set 0 "
                "for no cap"
            )
        #: ``train.embedding_weight``'s feature map, and the mean embedding the generator is
        #: pulled towards, which the caller sets for each stretch of training
        #: (:func:`fedgan.training.embedding.hospital_target`).
        self.embedding_weight = embedding_weight(cfg, self.family.conditional)
        self.embedding = RandomFeatures.for_config(cfg) if self.embedding_weight else None
        self.embedding_target: torch.Tensor | None = None

    def private_steps(self, steps: int) -> int:
        t = self.cfg.train
        if self.schedule_mode == "adaptive" and t.d_steps_per_round:
            # per local_steps iterations (the pooled baseline runs several hospitals' worth)
            return t.d_steps_per_round * steps // t.local_steps
        return super().private_steps(steps)

    def settled(self) -> dict[str, Any]:
        """The discriminator's steps and schedule, and the embedding term's weight, bandwidth
        and release noise, as the default rules gave them."""
        adaptive = self.schedule_mode == "adaptive"
        values: dict[str, Any] = {
            "train.n_critic": self.phase("D").repeats,
            "train.critic_schedule": self.schedule_mode,
            "train.critic_ceiling": critic_ceiling(self.cfg) if adaptive else 0.0,
            "train.critic_max": critic_max(self.cfg) if adaptive else 0,
            "train.embedding_weight": self.embedding_weight,
        }
        if self.embedding is not None:
            values["train.embedding_bandwidth"] = self.embedding.bandwidth
            if self.cfg.privacy.mode == "dp-sgd":
                values["privacy.embedding_noise"] = embedding_noise(self.cfg)
        return values

    def critic_schedule(self) -> CriticSchedule | None:
        """The adaptive schedule, or under DP-SGD the fixed one (whose accuracy on generated
        images is what a private round reports instead of the discriminator's loss on real
        images); None for a non-private fixed schedule."""
        reports = self.cfg.privacy.mode == "dp-sgd" and self.family.decision_boundary is not None
        if self.schedule_mode == "fixed" and not reports:
            return None
        t = self.cfg.train
        return CriticSchedule(
            n_d=self.phase("D").repeats,
            adaptive=self.schedule_mode == "adaptive",
            threshold=t.critic_threshold,
            beta=t.critic_beta,
            grace=t.critic_grace,
            ceiling=critic_ceiling(self.cfg),
            floor=self.phase("D").repeats,
            top=critic_max(self.cfg),
        )

    def critic_accuracy(self, nets: Nets, ctx: StepContext) -> float:
        batch = self.free_batch("G", None, ctx)
        y = batch.get("labels")
        with torch.no_grad():
            scores = forward(nets["discriminator"], forward(nets["generator"], batch["z"], y), y)
        boundary = self.family.decision_boundary
        return float((scores.flatten() <= (0.0 if boundary is None else boundary)).float().mean())

    def check_private(self) -> None:
        if self.family.dp_incompatibility:
            raise ValueError(
                f"model.family {self.family.name!r} cannot be trained with DP-SGD: "
                f"{self.family.dp_incompatibility}"
            )

    def build(self) -> dict[str, nn.Module]:
        shape = ImageShape(self.cfg.data.channels, self.cfg.data.image_size)
        return self.family.build(self.cfg.model, shape)

    def make_batch(self, real, labels, other, ctx):  # type: ignore[no-untyped-def]
        if self.augment is not None and len(real):
            real = self.augment(real, ctx.cpu)
        tensors = {"real": real}
        if self.family.conditional:
            tensors["labels"] = check_labels(labels, self.cfg.model.num_classes)
        latent = self.cfg.model.latent_dim
        tensors["z"] = torch.randn(len(real), latent, device=ctx.device, generator=ctx.noise)
        if self.diff_augment:  # one row of draws per image, drawn here so every use agrees
            tensors["aug_real"] = augment.draw(len(real), ctx.cpu, ctx.device, self.views)
            tensors["aug_fake"] = augment.draw(len(real), ctx.cpu, ctx.device, self.views)
        return Batch(tensors)

    def _seen(self, images: torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
        """What the discriminator sees of ``images``: their DiffAugment transforms, if on, one
        block of rows per view (``train.diff_augment_views``; :func:`augment.apply_views`)."""
        if draws is None:
            return images
        return augment.apply_views(images, draws, self.diff_augment)

    def _repeat(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """``labels`` for every view's rows (see :meth:`_seen`)."""
        return labels if labels is None or self.views == 1 else labels.repeat(self.views)

    def accumulate_gradients(
        self, phase: str, nets: Nets, batch: Batch, ctx: StepContext
    ) -> torch.Tensor:
        family, gp_weight = self.family, self.cfg.train.gp_weight
        if phase == "D":
            # The whole batch's fakes at once: a generator with BatchNorm draws them from the
            # batch's statistics, so a private step split into physical batches sees the same.
            with torch.no_grad():
                fakes = forward(nets["generator"], batch["z"], batch.get("labels"))
            batch = Batch({**batch.tensors, "fake": fakes})

            def d_loss(nets: Nets, b: Batch) -> torch.Tensor:
                d = nets["discriminator"]
                y = self._repeat(b.get("labels"))
                real = self._seen(b["real"], b.get("aug_real"))
                fake = self._seen(b["fake"], b.get("aug_fake"))
                if ctx.paired_forward:
                    # rows i, n + i, ... (every view of real i, then of fake i) are pair i's:
                    # paired ghost clipping clips them as one unit
                    n = len(real)
                    both = forward(d, torch.cat([real, fake]),
                                   None if y is None else torch.cat([y, y]))  # fmt: skip
                    loss = family.d_loss(both[:n], both[n:])
                else:
                    loss = family.d_loss(forward(d, real, y), forward(d, fake, y))
                if family.gradient_penalty:
                    loss = loss + gp_weight * gradient_penalty(d, real, fake, y, ctx.noise)
                return loss

            return ctx.backward(d_loss, nets, batch)

        weight = self.cfg.train.mode_seeking
        matching = self.embedding_weight
        if self.embedding is not None and self.embedding_target is None:
            raise RuntimeError("train.embedding_weight is set but no embedding target was given")

        def g_loss(nets: Nets, b: Batch) -> torch.Tensor:
            y = b.get("labels")
            fake = forward(nets["generator"], b["z"], y)
            loss = family.g_loss(
                forward(nets["discriminator"], self._seen(fake, b.get("aug_fake")), self._repeat(y))
            )
            if weight and len(fake) >= 2:
                loss = loss + weight * mode_seeking(fake, b["z"])
            if self.embedding is not None and self.embedding_target is not None:
                loss = loss + matching * embedding_loss(self.embedding, fake, self.embedding_target)
            return loss

        return ctx.backward(g_loss, nets, batch)

    def free_batch(self, phase: str, batch: Batch | None, ctx: StepContext) -> Batch:
        """The generator's batch: ``train.batch_size`` latent codes (and balanced-at-random
        labels for a conditional family), no real image."""
        size = self.cfg.train.batch_size
        z = torch.randn(size, self.cfg.model.latent_dim, device=ctx.device, generator=ctx.noise)
        tensors = {"z": z}
        if self.family.conditional:
            labels = torch.randint(0, self.cfg.model.num_classes, (size,),
                                   device=ctx.device, generator=ctx.noise)  # fmt: skip
            if self.cfg.train.mode_seeking and size >= 2:
                # the mode-seeking term compares rows i and n + i: give each pair one class
                n = size // 2
                labels[n : 2 * n] = labels[:n]
            tensors["labels"] = labels
        if self.diff_augment:
            tensors["aug_fake"] = augment.draw(size, ctx.cpu, ctx.device, self.views)
        return Batch(tensors)


@lru_cache(maxsize=32)
def _step_objective(family: GanFamily, latent_dim: int, gp_weight: float) -> SynthesisObjective:
    """The objective behind :func:`d_step`/:func:`g_step` (cached: they run every step)."""
    from fedgan.config import Config, ModelSection, TrainSection

    cfg = Config(
        model=ModelSection(family=family.name, latent_dim=latent_dim),
        train=TrainSection(gp_weight=gp_weight),
    )
    return SynthesisObjective(cfg, family)


def _step(
    family: GanFamily,
    phase: str,
    nets: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    labels: torch.Tensor | None,
    *,
    gp_weight: float = 10.0,
    noise: torch.Generator | None = None,
) -> torch.Tensor:
    """One phase step of ``family`` through the loop's :func:`phase_step`."""
    from fedgan.training.loop import phase_step
    from fedgan.training.private import step_context

    objective = _step_objective(family, int(tensors["z"].shape[1]), gp_weight)
    if labels is not None:
        tensors["labels"] = labels
    trained = "discriminator" if phase == "D" else "generator"
    private = nets["discriminator"] if phase == "D" else None
    ctx = step_context(private, tensors["z"].device, noise)
    return phase_step(objective, objective.phase(phase), nets, {trained: optimizer},
                      Batch(tensors), ctx)  # fmt: skip


def d_step(
    family: GanFamily,
    generator: nn.Module,
    discriminator: nn.Module,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    z: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    gp_weight: float = 10.0,
    noise: torch.Generator | None = None,
) -> torch.Tensor:
    """One discriminator update of ``family`` on a real and a generated batch (the loop's
    phase step, for callers that hold the pieces; a private discriminator brings its own
    clipped backward). Returns the detached loss."""
    nets = {"generator": generator, "discriminator": discriminator}
    return _step(family, "D", nets, opt_d, {"real": real, "z": z}, labels,
                 gp_weight=gp_weight, noise=noise)  # fmt: skip


def g_step(
    family: GanFamily,
    generator: nn.Module,
    discriminator: nn.Module,
    opt_g: torch.optim.Optimizer,
    z: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """One generator update through the frozen discriminator (which keeps no gradient and
    records no per-sample gradient). Returns the detached loss."""
    nets = {"generator": generator, "discriminator": discriminator}
    return _step(family, "G", nets, opt_g, {"z": z}, labels)


TASKS.add("synthesis", SynthesisObjective)
