"""Central evaluation of image-to-image tasks on a held-out paired set: PSNR, SSIM, MS-SSIM,
GMSD, MS-GMSD, LPIPS, NMI, MAE and MSE of the global generator and of every classical
baseline, measured the same way;
for unpaired tasks (``translate``) also the domain Fréchet/kernel distances to the target
domain; pictures of input | baselines | fedgan | ground truth with zoomed crops.

The task is passed in (anything with :class:`PairedTask`'s methods): evaluation never imports
training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from fedgan.device import resolve_device
from fedgan.evaluation import functional as fn
from fedgan.evaluation.features import LPIPSDistance
from fedgan.evaluation.metrics import METRICS, Metric, MetricUnavailable
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

    def visible(self, inputs: torch.Tensor) -> torch.Tensor: ...

    def region(self, inputs: torch.Tensor) -> torch.Tensor | None: ...


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


@dataclass(frozen=True)
class PairedSettings:
    """What a paired metric may need beyond the two images.

    Attributes:
        lpips_weights: ``eval.lpips_weights`` (a folder, ``download``, or empty: no LPIPS).
        device: Where network metrics (LPIPS) run.
        region: The task's region of each image (``[N, 1, H, W]``, 1 inside: an inpainting
            hole) that ``hole`` scores on its own; None for tasks without one.
    """

    lpips_weights: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    region: torch.Tensor | None = None


def _psnr(x: torch.Tensor, y: torch.Tensor, settings: PairedSettings) -> float:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    # PSNR per image, then averaged (the convention of restoration papers).
    return float(
        peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean()
    )


def _ssim(x: torch.Tensor, y: torch.Tensor, settings: PairedSettings) -> float:
    """SSIM with an 11-px Gaussian window (sigma 1.5) over the image's interior; see
    :data:`fedgan.evaluation.functional.SSIM_WINDOW`."""
    return float(fn.ssim(x, y).mean())


def _ms_ssim(x: torch.Tensor, y: torch.Tensor, settings: PairedSettings) -> float:
    """MS-SSIM: 3 scales of a 5-px Gaussian window under 161 px, the paper's 5 scales of 11 px
    from there; see :func:`fedgan.evaluation.functional.ms_ssim_protocol`."""
    return float(fn.ms_ssim(x, y).mean())


#: GMSD's scale weights in MS-GMSD (Zhang et al. 2017, as in piq); images under 17 px keep
#: the finest scales that fit (a scale needs 2**k + 1 pixels).
MS_GMSD_WEIGHTS = (0.096, 0.596, 0.289, 0.019)


def _gmsd(x: torch.Tensor, y: torch.Tensor, settings: PairedSettings) -> float:
    """Gradient magnitude similarity deviation (Xue et al. 2014; piq): 0 for identical
    images, larger is worse."""
    import piq

    return float(piq.gmsd(x.float(), y.float(), data_range=1.0, reduction="none").mean())


def _ms_gmsd(x: torch.Tensor, y: torch.Tensor, settings: PairedSettings) -> float:
    """Multi-scale GMSD (Zhang et al. 2017; piq), the MedGAN paper's MS-GMSD."""
    import piq

    size = min(x.shape[-2:])
    levels = max(k for k in range(1, len(MS_GMSD_WEIGHTS) + 1) if 2**k + 1 <= size)
    weights = torch.tensor(MS_GMSD_WEIGHTS[:levels])
    return float(piq.multi_scale_gmsd(x.float(), y.float(), data_range=1.0, reduction="none",
                                      scale_weights=weights).mean())  # fmt: skip


_LPIPS: dict[tuple[str, str], LPIPSDistance] = {}


def _lpips(x: torch.Tensor, y: torch.Tensor, settings: PairedSettings) -> float:
    """LPIPS (VGG16, Zhang et al. 2018) from ``eval.lpips_weights``; the network is loaded
    once per process."""
    if not settings.lpips_weights:
        raise ValueError(
            "config key 'eval.lpips_weights': LPIPS needs its weights; set it to a folder "
            f"holding {LPIPSDistance.VGG_FILE} and {LPIPSDistance.LINEAR_FILE}, or to download"
        )
    key = (settings.lpips_weights, str(settings.device))
    if key not in _LPIPS:
        _LPIPS[key] = LPIPSDistance(settings.lpips_weights, settings.device)
    return float(_LPIPS[key](x, y).mean())


def _hole(x: torch.Tensor, y: torch.Tensor, settings: PairedSettings) -> dict[str, float]:
    """PSNR, SSIM and MAE inside the task's region (an inpainting hole), per image then
    averaged: PSNR and MAE over the hole's pixels, SSIM as the mean of the SSIM map (the
    protocol of :data:`~fedgan.evaluation.functional.SSIM_WINDOW`, skimage's map) over them."""
    from skimage.metrics import structural_similarity

    if settings.region is None:
        raise MetricUnavailable("scores a hole: it needs task inpaint")
    m = settings.region.expand_as(x).double()
    area = m.sum((1, 2, 3)).clamp(min=1)
    mse = ((x.double() - y.double()) ** 2 * m).sum((1, 2, 3)) / area
    mae = ((x.double() - y.double()).abs() * m).sum((1, 2, 3)) / area
    ssims = []
    for a, b, hole in zip(x.double().numpy(), y.double().numpy(), m.numpy(), strict=True):
        _, smap = structural_similarity(
            a, b, channel_axis=0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.0, full=True,
        )  # fmt: skip
        ssims.append(float((smap * hole).sum() / max(hole.sum(), 1)))
    return {
        "hole_psnr": float((10 * torch.log10(1 / mse)).mean()),
        "hole_ssim": float(np.mean(ssims)),
        "hole_mae": float(mae.mean()),
    }


def _nmi(x: torch.Tensor, y: torch.Tensor, settings: PairedSettings) -> float:
    from skimage.metrics import normalized_mutual_information

    pairs = zip(x.numpy(), y.numpy(), strict=True)
    return float(np.mean([normalized_mutual_information(a[0], b[0], bins=64) for a, b in pairs]))


def _mae(x: torch.Tensor, y: torch.Tensor, settings: PairedSettings) -> float:
    return float((x - y).abs().mean())


def _mse(x: torch.Tensor, y: torch.Tensor, settings: PairedSettings) -> float:
    return float((x - y).square().mean())


for _name, _fn, _higher in (("psnr", _psnr, True), ("ssim", _ssim, True),
                            ("ms_ssim", _ms_ssim, True), ("gmsd", _gmsd, False),
                            ("ms_gmsd", _ms_gmsd, False), ("lpips", _lpips, False),
                            ("nmi", _nmi, True), ("mae", _mae, False),
                            ("mse", _mse, False)):  # fmt: skip
    METRICS.add(_name, Metric(_name, 0, _fn, higher_is_better=_higher, paired=True))
METRICS.add("hole", Metric("hole", 0, _hole, higher_is_better=True, paired=True,
                           keys=("hole_psnr", "hole_ssim", "hole_mae"),
                           lower_keys=("hole_mae",)))  # fmt: skip

#: The paired metrics every image-to-image evaluation reports, in the order reports list them
#: (``lpips`` joins them where ``eval.lpips_weights`` is set).
PAIRED_METRICS = ("psnr", "ssim", "ms_ssim", "gmsd", "ms_gmsd", "nmi", "mae", "mse")


def paired_scores(
    output: torch.Tensor,
    target: torch.Tensor,
    names: tuple[str, ...] = PAIRED_METRICS,
    settings: PairedSettings | None = None,
    skipped: dict[str, str] | None = None,
) -> dict[str, float]:
    """Means over the set of the named paired metrics (PSNR in dB, SSIM, MS-SSIM, GMSD,
    MS-GMSD, LPIPS, NMI with 1 = independent and 2 = identical, MAE, MSE), on images mapped to
    [0, 1] (data range 1). A metric that does not apply (``hole`` without a hole) raises
    :class:`MetricUnavailable`, or, given ``skipped``, is left out with its reason there."""
    x, y = _unit(output), _unit(target)
    settings = settings or PairedSettings()
    out: dict[str, float] = {}
    for name in names:
        try:
            value = METRICS.get(name).compute(x, y, settings)
        except MetricUnavailable as why:
            if skipped is None:
                raise
            skipped[name] = str(why)
            continue
        out.update(value if isinstance(value, dict) else {name: value})
    return out


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
        self.settings = PairedSettings(cfg.eval.lpips_weights, self.device)
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
            self.settings = replace(self.settings, region=self.task.region(self._pairs[0]))
        return self._pairs

    def metric_names(self) -> tuple[str, ...]:
        """The paired metrics of ``eval.metrics`` (every paired metric if it names none)."""
        named = tuple(n for n in self.cfg.eval.metric_list if METRICS.get(n).paired)
        if named:
            return named
        extra = ("hole",) if self.pairs() and self.settings.region is not None else ()
        return PAIRED_METRICS + (("lpips",) if self.cfg.eval.lpips_weights else ()) + extra

    def baselines(self) -> dict[str, dict[str, float]]:
        """Every classical baseline's scores on the held-out pairs (computed once)."""
        if self._baselines is None:
            inputs, targets = self.pairs()
            self._baselines = {}
            for name, method in self.task.baselines().items():
                out = method(inputs)
                self._baseline_outputs[name] = out
                self._baselines[name] = paired_scores(
                    out, targets, self.metric_names(), self.settings, self.skipped
                )
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
        columns = {"input": self.task.visible(inputs),
                   **{k: v for k, v in self._baseline_outputs.items() if k != "input"}}  # fmt: skip
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
        result = paired_scores(out, targets, chosen, self.settings, self.skipped)
        baselines = self.baselines()
        for name, scores in baselines.items():
            for key, value in scores.items():
                result[f"{name}_{key}"] = value
        for key in ("psnr", "hole_psnr"):  # the gain over the best classical method
            best = max((s[key] for n, s in baselines.items() if n != "input" and key in s),
                       default=None)  # fmt: skip
            if key in result and best is not None:
                result[f"{key}_gain"] = result[key] - best
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
        kd, _ = kernel_distance(real, fake, seed=cfg.run.seed)
        return {"domain_fd": float(frechet_distance(real, fake)), "domain_kd": kd}

    def evaluate(self, round_: int, state: dict[str, torch.Tensor], *, final: bool = False
                 ) -> dict[str, float]:  # fmt: skip
        self.sample_grid(round_, state)
        return self.metrics(round_, state)
