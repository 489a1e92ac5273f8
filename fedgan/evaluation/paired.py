"""Central evaluation of image-to-image tasks on a held-out paired set: PSNR, SSIM, MS-SSIM,
NMI and MAE of the global generator and of every classical baseline, measured the same way;
for ``translate`` also the domain Fréchet/kernel distances to the target domain; pictures of
input | baselines | fedgan | ground truth with zoomed crops."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchvision.utils import save_image

from fedgan.models import load_state
from fedgan.training.loop import resolve_device
from fedgan.training.tasks import TASKS, Pairs, apply_generator, networks_for

if TYPE_CHECKING:
    from fedgan.config import Config

PAIRED_METRICS = ("psnr", "ssim", "ms_ssim", "nmi", "mae")


def paired_scores(output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Means over the set of PSNR (dB), SSIM, MS-SSIM, NMI (1 = independent, 2 = identical)
    and MAE, on images mapped to [0, 1] (data range 1)."""
    from skimage.metrics import normalized_mutual_information
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure,
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    x = ((output.float() + 1) / 2).clamp(0, 1)
    y = ((target.float() + 1) / 2).clamp(0, 1)
    size = x.shape[-1]
    # MS-SSIM needs room for each scale: 3 scales with a 5-pixel kernel from 32 px up,
    # torchmetrics' 5 scales with 11 pixels from 176 px.
    if size >= 176:
        ms = multiscale_structural_similarity_index_measure(x, y, data_range=1.0)
    else:
        ms = multiscale_structural_similarity_index_measure(
            x, y, data_range=1.0, kernel_size=5 if size >= 32 else 3,
            betas=(0.2856, 0.3001, 0.2363) if size >= 32 else (0.5, 0.5),
        )  # fmt: skip
    pairs = zip(x.numpy(), y.numpy(), strict=True)
    nmi = np.mean([normalized_mutual_information(a[0], b[0], bins=64) for a, b in pairs])
    # PSNR per image, then averaged (the convention of restoration papers).
    psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean()
    return {
        "psnr": float(psnr),
        "ssim": float(structural_similarity_index_measure(x, y, data_range=1.0)),  # type: ignore[arg-type]
        "ms_ssim": float(ms),
        "nmi": float(nmi),
        "mae": float((x - y).abs().mean()),
    }


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
    save_image(torch.stack(tiles), path, nrow=len(columns), normalize=True, value_range=(-1, 1),
               padding=1, pad_value=1.0)  # fmt: skip
    (path.parent / f"{path.stem}.columns.txt").write_text(" | ".join(columns) + "\n")
    return path


class PairedEvaluator:
    """The central evaluator of an image-to-image run (same surface as
    :class:`fedgan.evaluation.CentralEvaluator`).

    Args:
        cfg: The experiment config.
        samples_dir: Where the comparison pictures go.
    """

    def __init__(self, cfg: Config, samples_dir: Path) -> None:
        self.cfg = cfg
        self.task = TASKS.get(cfg.task.name)
        self.samples_dir = samples_dir
        self.device = resolve_device(cfg.train.device)
        self.skipped: dict[str, str] = {}
        self._pairs: Pairs | None = None
        self._baselines: dict[str, dict[str, float]] | None = None
        self._baseline_outputs: dict[str, torch.Tensor] = {}

    def pairs(self) -> Pairs:
        """The held-out pairs (central evaluation images, degraded with a fixed seed)."""
        if self._pairs is None:
            from fedgan.data import eval_dataset

            cfg = self.cfg
            clean = eval_dataset(cfg.data, cfg.run.seed, cfg.federation.num_hospitals).tensors[0]
            self._pairs = self.task.eval_pairs(clean, cfg.task, cfg.run.seed + 515_151)
        return self._pairs

    def baselines(self) -> dict[str, dict[str, float]]:
        """Every classical baseline's scores on the held-out pairs (computed once)."""
        if self._baselines is None:
            p = self.pairs()
            self._baselines = {}
            for name, method in self.task.baselines(self.cfg.task).items():
                out = method(p.inputs)
                self._baseline_outputs[name] = out
                self._baselines[name] = paired_scores(out, p.targets)
        return self._baselines

    def generator(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        g = networks_for(self.cfg)["generator"]
        load_state({"generator": g}, {k: v for k, v in state.items() if k.startswith("generator.")})
        return g.to(self.device).eval()

    def outputs(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return apply_generator(self.generator(state), self.pairs().inputs)

    def sample_grid(self, round_: int, state: dict[str, torch.Tensor]) -> Path:
        p = self.pairs()
        self.baselines()
        columns = {"input": p.inputs, **{k: v for k, v in self._baseline_outputs.items()
                                        if k != "input"}}  # fmt: skip
        columns["fedgan"] = self.outputs(state)
        columns["ground truth"] = p.targets
        return comparison_picture(columns, self.samples_dir / f"round_{round_:04d}.png")

    def metrics(self, round_: int, state: dict[str, torch.Tensor], names: list[str] | None = None
                ) -> dict[str, float]:  # fmt: skip
        """fedgan's paired scores, each baseline's as ``<baseline>_<metric>``, and fedgan's
        PSNR gain over the best baseline (``psnr_gain``); for ``translate`` also the domain
        Fréchet and kernel distances of the translations to the target domain."""
        p = self.pairs()
        out = self.outputs(state)
        result = paired_scores(out, p.targets)
        baselines = self.baselines()
        for name, scores in baselines.items():
            for key, value in scores.items():
                result[f"{name}_{key}"] = value
        best = max((s["psnr"] for n, s in baselines.items() if n != "input"), default=None)
        if best is not None:
            result["psnr_gain"] = result["psnr"] - best
        if self.cfg.task.name == "translate":
            result.update(self._domain_distances(out, p.targets))
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
