"""Central evaluation of image-to-image tasks on a held-out paired set: PSNR, SSIM, MS-SSIM,
NMI and MAE of the global generator and of every classical baseline, measured the same way;
for unpaired tasks (``translate``) also the domain Fréchet/kernel distances to the target
domain; pictures of input | baselines | fedgan | ground truth with zoomed crops.

The task is passed in (anything with :class:`PairedTask`'s methods): evaluation never imports
training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from fedgan.device import resolve_device
from fedgan.evaluation.metrics import METRICS, Metric
from fedgan.models import load_state
from fedgan.rundir import atomic_save_image

if TYPE_CHECKING:
    from fedgan.config import Config


class PairedTask(Protocol):
    """What the evaluator needs of an image-to-image task."""

    unpaired: bool

    def build(self) -> dict[str, nn.Module]: ...

    def eval_pairs(self, clean: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def baselines(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]: ...


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def _psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    # PSNR per image, then averaged (the convention of restoration papers).
    return float(
        peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean()
    )


def _ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(structural_similarity_index_measure(x, y, data_range=1.0))  # type: ignore[arg-type]


def _ms_ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    size = x.shape[-1]
    # MS-SSIM needs room for each scale: 3 scales with a 5-pixel kernel from 32 px up,
    # torchmetrics' 5 scales with 11 pixels from 176 px.
    if size >= 176:
        return float(multiscale_structural_similarity_index_measure(x, y, data_range=1.0))
    return float(multiscale_structural_similarity_index_measure(
        x, y, data_range=1.0, kernel_size=5 if size >= 32 else 3,
        betas=(0.2856, 0.3001, 0.2363) if size >= 32 else (0.5, 0.5),
    ))  # fmt: skip


def _nmi(x: torch.Tensor, y: torch.Tensor) -> float:
    from skimage.metrics import normalized_mutual_information

    pairs = zip(x.numpy(), y.numpy(), strict=True)
    return float(np.mean([normalized_mutual_information(a[0], b[0], bins=64) for a, b in pairs]))


def _mae(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().mean())


for _name, _fn, _higher in (("psnr", _psnr, True), ("ssim", _ssim, True),
                            ("ms_ssim", _ms_ssim, True), ("nmi", _nmi, True),
                            ("mae", _mae, False)):  # fmt: skip
    METRICS.add(_name, Metric(_name, 0, _fn, higher_is_better=_higher, paired=True))

#: Every paired metric, in the order reports list them.
PAIRED_METRICS = ("psnr", "ssim", "ms_ssim", "nmi", "mae")


def paired_scores(
    output: torch.Tensor, target: torch.Tensor, names: tuple[str, ...] = PAIRED_METRICS
) -> dict[str, float]:
    """Means over the set of the named paired metrics (PSNR in dB, SSIM, MS-SSIM, NMI with
    1 = independent and 2 = identical, MAE), on images mapped to [0, 1] (data range 1)."""
    x, y = _unit(output), _unit(target)
    return {name: METRICS.get(name).compute(x, y) for name in names}


@torch.no_grad()
def apply_generator(generator: nn.Module, inputs: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """``generator`` over ``inputs`` in eval mode, in batches, on the generator's device."""
    generator.eval()
    device = next(generator.parameters()).device
    out = [generator(inputs[i : i + batch].to(device)).cpu() for i in range(0, len(inputs), batch)]
    return torch.cat(out)


def comparison_picture(columns: dict[str, torch.Tensor], path: Path, rows: int = 4) -> Path:
    """Rows of examples, one column per method (input, baselines, fedgan, ground truth), then
    the same with a 2x zoom on the image centre. Inputs of another size are resized."""
    import torch.nn.functional as F

    size = max(t.shape[-1] for t in columns.values())
    size *= max(1, 96 // size)  # small images are enlarged (nearest) so the picture is legible
    tiles = []
    for zoom in (False, True):
        for i in range(min(rows, len(next(iter(columns.values()))))):
            for images in columns.values():
                img = images[i : i + 1].float()
                if img.shape[-1] != size:
                    img = F.interpolate(img, size=(size, size), mode="nearest")
                if zoom:
                    c = size // 4
                    img = F.interpolate(img[..., c : c + size // 2, c : c + size // 2],
                                        size=(size, size), mode="nearest")  # fmt: skip
                tiles.append(img[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_image(torch.stack(tiles), path, nrow=len(columns), normalize=True,
                      value_range=(-1, 1), padding=1, pad_value=1.0)  # fmt: skip
    (path.parent / f"{path.stem}.columns.txt").write_text(" | ".join(columns) + "\n")
    return path


class PairedEvaluator:
    """The central evaluator of an image-to-image run (same surface as
    :class:`fedgan.evaluation.CentralEvaluator`).

    Args:
        cfg: The experiment config.
        samples_dir: Where the comparison pictures go.
        task: The image-to-image task (its held-out pairs, baselines and networks).
    """

    def __init__(self, cfg: Config, samples_dir: Path, task: PairedTask) -> None:
        self.cfg = cfg
        self.task = task
        self.samples_dir = samples_dir
        self.device = resolve_device(cfg.train.device)
        self.skipped: dict[str, str] = {}
        self._pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._baselines: dict[str, dict[str, float]] | None = None
        self._baseline_outputs: dict[str, torch.Tensor] = {}

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out ``(inputs, ground truth)`` (central evaluation images, degraded with a
        fixed seed)."""
        if self._pairs is None:
            from fedgan.data import eval_dataset

            cfg = self.cfg
            clean = eval_dataset(cfg.data, cfg.run.seed, cfg.federation.num_hospitals).tensors[0]
            self._pairs = self.task.eval_pairs(clean, cfg.run.seed + 515_151)
        return self._pairs

    def metric_names(self) -> tuple[str, ...]:
        """The paired metrics of ``eval.metrics`` (every paired metric if it names none)."""
        named = tuple(n for n in self.cfg.eval.metric_list if METRICS.get(n).paired)
        return named or PAIRED_METRICS

    def baselines(self) -> dict[str, dict[str, float]]:
        """Every classical baseline's scores on the held-out pairs (computed once)."""
        if self._baselines is None:
            inputs, targets = self.pairs()
            self._baselines = {}
            for name, method in self.task.baselines().items():
                out = method(inputs)
                self._baseline_outputs[name] = out
                self._baselines[name] = paired_scores(out, targets, self.metric_names())
        return self._baselines

    def prepare(self) -> None:
        """Loads the held-out pairs and scores the baselines (before the first evaluation)."""
        self.baselines()

    def generator(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        g = self.task.build()["generator"]
        load_state({"generator": g}, {k: v for k, v in state.items() if k.startswith("generator.")})
        return g.to(self.device).eval()

    def outputs(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return apply_generator(self.generator(state), self.pairs()[0])

    def sample_grid(self, round_: int, state: dict[str, torch.Tensor]) -> Path:
        inputs, targets = self.pairs()
        self.baselines()
        columns = {"input": inputs, **{k: v for k, v in self._baseline_outputs.items()
                                      if k != "input"}}  # fmt: skip
        columns["fedgan"] = self.outputs(state)
        columns["ground truth"] = targets
        return comparison_picture(columns, self.samples_dir / f"round_{round_:04d}.png")

    def metrics(self, round_: int, state: dict[str, torch.Tensor], names: list[str] | None = None
                ) -> dict[str, float]:  # fmt: skip
        """fedgan's paired scores, each baseline's as ``<baseline>_<metric>``, and fedgan's
        PSNR gain over the best baseline (``psnr_gain``); for ``translate`` also the domain
        Fréchet and kernel distances of the translations to the target domain."""
        _, targets = self.pairs()
        out = self.outputs(state)
        chosen = self.metric_names()
        if names:
            for name in names:
                if not METRICS.get(name).paired:
                    self.skipped[name] = "scores generated images: it needs task synthesis"
            chosen = tuple(n for n in names if METRICS.get(n).paired)
        result = paired_scores(out, targets, chosen)
        baselines = self.baselines()
        for name, scores in baselines.items():
            for key, value in scores.items():
                result[f"{name}_{key}"] = value
        if "psnr" in result:
            best = max((s["psnr"] for n, s in baselines.items() if n != "input"), default=None)
            if best is not None:
                result["psnr_gain"] = result["psnr"] - best
        if self.task.unpaired:  # trained without pairs: how close to the target domain
            result.update(self._domain_distances(out, targets))
        return result

    def _domain_distances(self, out: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Fréchet and kernel distances between translations and target-domain images in a
        feature space trained on the target domain (cached like the synthesis metrics')."""
        from fedgan.evaluation.features import DomainFeatures
        from fedgan.evaluation.functional import frechet_distance, kernel_distance

        cfg = self.cfg
        cache = (
            Path(cfg.eval.cache_dir) if cfg.eval.cache_dir else Path(cfg.run.output_dir) / ".cache"
        )
        labels = torch.zeros(len(target), dtype=torch.long)
        features = DomainFeatures(target, labels, cache, self.device)
        fake, real = features(out), features(target)
        kd, _ = kernel_distance(real, fake, seed=cfg.run.seed, subset_size=min(500, len(real)))
        return {"domain_fd": float(frechet_distance(real, fake)), "domain_kd": kd}

    def evaluate(self, round_: int, state: dict[str, torch.Tensor], *, final: bool = False
                 ) -> dict[str, float]:  # fmt: skip
        self.sample_grid(round_, state)
        return self.metrics(round_, state)
