"""The central evaluator: the global generator's sample grid and registered metrics, every few
rounds on the server (and on demand with ``fedgan evaluate``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedgan.device import resolve_device
from fedgan.evaluation.metrics import METRICS, EvalContext, MetricUnavailable
from fedgan.models import ImageShape, build_networks, load_state
from fedgan.rundir import atomic_save_image

if TYPE_CHECKING:
    from fedgan.config import Config

logger = logging.getLogger(__name__)


@torch.no_grad()
def sample(
    generator: nn.Module, n: int, *, seed: int, device: torch.device, batch: int = 500
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` images in [-1, 1] (CPU) from ``generator``, batched; a conditional generator (one
    with ``num_classes``) gets balanced labels, which are returned too."""
    g = torch.Generator().manual_seed(seed)
    num_classes = int(getattr(generator, "num_classes", 0))
    latent = int(getattr(generator, "latent_dim"))  # noqa: B009
    labels = torch.arange(n) % num_classes if num_classes else None
    out = []
    for start in range(0, n, batch):
        z = torch.randn(min(batch, n - start), latent, generator=g).to(device)
        if labels is None:
            out.append(generator(z).cpu())
        else:
            out.append(generator(z, labels[start : start + len(z)].to(device)).cpu())
    return torch.cat(out), labels


class CentralEvaluator:
    """Evaluates packed global networks round after round.

    Args:
        cfg: The experiment config (model, seed, eval settings).
        shape: Image shape of the data.
        samples_dir: Where sample grids and pictures go.
    """

    def __init__(self, cfg: Config, shape: ImageShape, samples_dir: Path) -> None:
        self.cfg = cfg
        self.shape = shape
        self.samples_dir = samples_dir
        self.device = resolve_device(cfg.train.device)
        g = torch.Generator().manual_seed(cfg.run.seed + 424_242)
        self.fixed_noise = torch.randn(cfg.eval.grid_size, cfg.model.latent_dim, generator=g)
        self._ctx: EvalContext | None = None
        self.skipped: dict[str, str] = {}

    def context(self) -> EvalContext:
        """Real evaluation data (and, in a simulation, training data), loaded on first use."""
        if self._ctx is None:
            from fedgan.data import eval_dataset, pooled_dataset

            cfg = self.cfg
            n = cfg.federation.num_hospitals
            real = eval_dataset(cfg.data, cfg.run.seed, n)
            train = (
                pooled_dataset(cfg.data, cfg.run.seed, n) if cfg.eval.use_training_images else None
            )
            cache = (
                Path(cfg.eval.cache_dir)
                if cfg.eval.cache_dir
                else Path(cfg.run.output_dir) / ".cache"
            )
            self._ctx = EvalContext(
                real_images=real.tensors[0],
                real_labels=real.tensors[1],
                train_images=train.tensors[0] if train is not None else None,
                train_labels=train.tensors[1] if train is not None else None,
                cache_dir=cache,
                device=self.device,
                inception_weights=cfg.eval.inception_weights,
                samples_dir=self.samples_dir,
                seed=cfg.run.seed,
            )
        return self._ctx

    def prepare(self) -> None:
        """Loads what every evaluation shares: the real data, then the extractors and real
        features that ``eval.metrics`` and ``eval.final_metrics`` read (training the domain
        feature network on first use; both are cached on disk). Evaluations do the same on
        demand; this only moves the cost before the first one."""
        names = [*self.cfg.eval.metric_list, *self.cfg.eval.final_metric_list]
        extractors = {e for n in names for e in METRICS.get(n).extractors}
        if not extractors and not names:
            return
        ctx = self.context()
        for name in sorted(extractors):
            try:
                ctx.real_features(name)
            except Exception as err:  # recorded against the metric when it runs
                logger.warning("evaluation: the %s features could not be prepared: %s", name, err)

    def generator(self, state: dict[str, torch.Tensor]) -> nn.Module:
        nets = build_networks(self.cfg.model, self.shape, seed=self.cfg.run.seed)
        generator = nets["generator"]
        load_state(
            {"generator": generator}, {k: v for k, v in state.items() if k.startswith("generator.")}
        )
        return generator.to(self.device).eval()

    def sample_grid(self, round_: int, state: dict[str, torch.Tensor]) -> Path:
        """Writes the fixed-noise grid of ``round_`` and returns its path."""
        generator = self.generator(state)
        with torch.no_grad():
            z = self.fixed_noise.to(self.device)
            num_classes = int(getattr(generator, "num_classes", 0))
            if num_classes:
                images = generator(z, (torch.arange(len(z)) % num_classes).to(self.device))
            else:
                images = generator(z)
        path = self.samples_dir / f"round_{round_:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        nrow = max(1, int(len(images) ** 0.5))
        atomic_save_image(
            images.cpu(), path, nrow=nrow, normalize=True, value_range=(-1, 1), padding=1
        )
        return path

    def metrics(
        self, round_: int, state: dict[str, torch.Tensor], names: list[str]
    ) -> dict[str, float]:
        """Computes the registered metrics ``names`` for the generator in ``state``. A metric
        that does not apply here is skipped and its reason kept in ``skipped`` (and logged)."""
        for name in [n for n in names if METRICS.get(n).paired]:
            if name not in self.skipped:
                logger.warning("metric %s skipped: it scores image-to-image outputs", name)
            self.skipped[name] = "a paired metric: it needs an image-to-image task"
        names = [n for n in names if not METRICS.get(n).paired]
        if not names:
            return {}
        ctx = self.context()
        ctx.new_evaluation()
        generator = self.generator(state)
        n = max(METRICS.get(name).n_generated for name in names)
        images, labels = sample(
            generator, n, seed=self.cfg.run.seed + 7 + round_, device=self.device
        )
        finite = torch.isfinite(images.flatten(1)).all(1)
        if not finite.all():
            # A diverged generator is a finding to record, not a reason to stop the federation.
            bad = float(1 - finite.float().mean())
            logger.warning(
                "round %s: %.0f%% of generated images are not finite; metrics skipped",
                round_,
                100 * bad,
            )
            return {"nonfinite_fraction": bad}
        out: dict[str, float] = {}
        for name in names:
            metric = METRICS.get(name)
            k = metric.n_generated
            t0 = time.perf_counter()
            try:
                out.update(
                    metric.compute(ctx, images[:k], None if labels is None else labels[:k], round_)
                )
            except MetricUnavailable as why:
                if name not in self.skipped:
                    logger.warning("metric %s skipped: %s", name, why)
                self.skipped[name] = str(why)
                continue
            except Exception as err:  # one metric's failure never ends a study
                failure = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
                logger.warning("round %s: metric %s %s", round_, name, failure)
                self.skipped[name] = failure
                continue
            out[f"seconds_{name}"] = time.perf_counter() - t0
        return out

    def evaluate(
        self, round_: int, state: dict[str, torch.Tensor], *, final: bool
    ) -> dict[str, float]:
        """One round's evaluation: the sample grid and ``eval.metrics`` (plus
        ``eval.final_metrics`` at the last round)."""
        self.sample_grid(round_, state)
        names = list(self.cfg.eval.metric_list)
        if final:
            names += [n for n in self.cfg.eval.final_metric_list if n not in names]
        return self.metrics(round_, state, names)
