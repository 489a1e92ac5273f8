"""Registered metrics. A metric's name fixes its protocol: ``fid_2k`` is 2,000 generated images
against the whole real evaluation split with the standard Inception features; ``domain_fd_1k``
is 1,000 against the same split in the domain classifier's features (not comparable to FID)."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedgan.catalog import METRICS as _METRICS
from fedgan.evaluation import functional as fn
from fedgan.evaluation.features import (
    DomainFeatures,
    InceptionFeatures,
    data_hash,
    train_classifier,
)
from fedgan.registry import Registry
from fedgan.rundir import atomic_save_image, atomic_write_bytes

logger = logging.getLogger(__name__)


class MetricUnavailable(Exception):
    """The metric does not apply to this run (e.g. TSTR for an unconditional generator)."""


def _load_cached(path: Path) -> Any:
    """A cached tensor, or None when it is missing or unreadable (a cache is safe to lose: an
    unreadable entry is computed again and replaced)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # truncated or foreign file
        logger.warning("cache file %s is unreadable; computing it again", path)
        return None


@dataclass
class EvalContext:
    """What metrics share within a run: real data, extractors and cached real features.

    Attributes:
        real_images: Real evaluation images in [-1, 1] (the full evaluation split).
        real_labels: Their labels.
        train_images: The training images (simulations only; None in a deployment, where the
            server never sees them).
        train_labels: Their labels.
        cache_dir: Extractor weights and real features are cached here.
        device: Where extractors run.
        inception_weights: Local FID Inception weights (empty: download).
        samples_dir: Where pictures go.
        seed: Seeds pairs, subsets and classifiers.
    """

    real_images: torch.Tensor
    real_labels: torch.Tensor
    train_images: torch.Tensor | None
    train_labels: torch.Tensor | None
    cache_dir: Path
    device: torch.device
    inception_weights: str = ""
    samples_dir: Path | None = None
    seed: int = 0
    _extractors: dict[str, Any] = field(default_factory=dict)
    _real_features: dict[str, torch.Tensor] = field(default_factory=dict)
    _fake_features: dict[tuple, torch.Tensor] = field(default_factory=dict)
    _constants: dict[str, Any] = field(default_factory=dict)

    def constant(self, key: str, compute: Callable[[], Any]) -> Any:
        """A value that depends on the real data only (e.g. the real images' own diversity),
        computed at the first evaluation and reused by the later ones."""
        if key not in self._constants:
            self._constants[key] = compute()
        return self._constants[key]

    def new_evaluation(self) -> None:
        """Forgets the generated images' features of the previous evaluation."""
        self._fake_features.clear()

    def fake_features(self, name: str, images: torch.Tensor) -> torch.Tensor:
        """Features of generated images, computed once per evaluation however many metrics
        use them (``fid_2k`` and ``kid_2k`` share one Inception pass)."""
        key = (name, images.data_ptr(), len(images))
        if key not in self._fake_features:
            self._fake_features[key] = self.extractor(name)(images)
        return self._fake_features[key]

    def extractor(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        if name not in self._extractors:
            if name == "domain":
                self._extractors[name] = DomainFeatures(
                    self.real_images, self.real_labels, self.cache_dir, self.device
                )
            elif name == "inception":
                self._extractors[name] = InceptionFeatures(self.inception_weights, self.device)
            else:
                raise KeyError(f"unknown feature extractor {name!r}; known: domain, inception")
        return self._extractors[name]

    def real_features(self, name: str) -> torch.Tensor:
        """Features of the real evaluation split, computed once and cached on disk by a hash of
        the images and the extractor (its weights, for the domain one)."""
        if name not in self._real_features:
            extractor = self.extractor(name)
            tag = str(getattr(extractor, "cache_path", self.inception_weights or "download"))
            path = self.cache_dir / f"real_{name}_{data_hash(self.real_images, extra=tag)}.pt"
            feats = _load_cached(path)
            if feats is None:
                feats = extractor(self.real_images)
                buf = io.BytesIO()
                torch.save(feats, buf)
                atomic_write_bytes(path, buf.getvalue())
            self._real_features[name] = feats
        return self._real_features[name]


#: How a reader should compare values of a metric's key.
HIGHER, LOWER, NEAR_REAL, REFERENCE, SPREAD = "higher", "lower", "near-real", "reference", "spread"


@dataclass(frozen=True)
class Metric:
    """A registered metric.

    Attributes:
        name: Registered name (fixes the protocol).
        n_generated: Generated images it consumes (0 for a paired metric).
        compute: ``(ctx, images, labels, round_) -> {key: value}`` for a metric of generated
            images; ``(output, target) -> value`` for a paired one.
        higher_is_better: Whether larger values of its main keys are better; None where the
            value closest to the real data's is best (e.g. diversity).
        keys: The keys it writes, in order (default: its name). Keys listed in
            ``references`` hold the real data's value, keys in ``spreads`` a standard
            deviation, keys in ``lower_keys`` are better lower whatever the main direction.
        inception: Whether it runs the Inception network (slow on CPU).
        paired: Scores an image-to-image output against its ground truth.
        extractors: The feature extractors it reads real features of (prepared before the
            first evaluation).
        validation: Keys measured on a validation split that its other keys never see: the
            only keys ``eval.select`` may choose a run's best round by (declared in
            :data:`fedgan.catalog.VALIDATION_KEYS` too, to check a config without torch).
    """

    name: str
    n_generated: int
    compute: Callable[..., Any]
    higher_is_better: bool | None = False
    keys: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    spreads: tuple[str, ...] = ()
    lower_keys: tuple[str, ...] = ()
    inception: bool = False
    paired: bool = False
    extractors: tuple[str, ...] = ()
    validation: tuple[str, ...] = ()

    def direction(self, key: str) -> str:
        """``higher``, ``lower``, ``near-real``, ``reference`` or ``spread`` for ``key``."""
        if key in self.references:
            return REFERENCE
        if key in self.spreads:
            return SPREAD
        if key in self.lower_keys:
            return LOWER
        if self.higher_is_better is None:
            return NEAR_REAL
        return HIGHER if self.higher_is_better else LOWER

    @property
    def output_keys(self) -> tuple[str, ...]:
        return self.keys or (self.name,)


METRICS: Registry[Metric] = _METRICS  # declared in fedgan.catalog


def _fd(extractor: str, key: str):
    def compute(ctx, images, labels, round_):
        return {
            key: fn.frechet_distance(
                ctx.real_features(extractor), ctx.fake_features(extractor, images)
            )
        }

    return compute


def _kd(extractor: str, key: str):
    def compute(ctx, images, labels, round_):
        mean, std = fn.kernel_distance(
            ctx.real_features(extractor), ctx.fake_features(extractor, images), seed=ctx.seed
        )
        return {key: mean, f"{key}_std": std}

    return compute


def _distances(extractor: str, fd: str, kd: str, size: int, inception: bool) -> None:
    METRICS.add(fd, Metric(fd, size, _fd(extractor, fd), inception=inception,
                           extractors=(extractor,)))  # fmt: skip
    METRICS.add(kd, Metric(kd, size, _kd(extractor, kd), keys=(kd, f"{kd}_std"),
                           spreads=(f"{kd}_std",), inception=inception,
                           extractors=(extractor,)))  # fmt: skip


for _n, _tag in ((1000, "1k"), (2000, "2k")):
    _distances("domain", f"domain_fd_{_tag}", f"domain_kd_{_tag}", _n, False)
for _n, _tag in ((2000, "2k"), (10000, "10k"), (50000, "50k")):
    _distances("inception", f"fid_{_tag}", f"kid_{_tag}", _n, True)


def _prdc(ctx, images, labels, round_):
    out = fn.prdc(ctx.real_features("domain"), ctx.fake_features("domain", images))
    return {f"domain_{k}": v for k, v in out.items()}


METRICS.add(
    "domain_prdc_1k",
    Metric("domain_prdc_1k", 1000, _prdc, higher_is_better=True,
           keys=tuple(f"domain_{k}" for k in ("precision", "recall", "density", "coverage")),
           extractors=("domain",)),
)  # fmt: skip


def _diversity(ctx, images, labels, round_):
    return {
        "ms_ssim_diversity": fn.pairwise_ssim(images, seed=ctx.seed),
        "ms_ssim_diversity_real": ctx.constant(
            "ms_ssim_diversity_real", lambda: fn.pairwise_ssim(ctx.real_images, seed=ctx.seed)
        ),
    }


METRICS.add(
    "ms_ssim_diversity",
    Metric("ms_ssim_diversity", 500, _diversity, higher_is_better=None,
           keys=("ms_ssim_diversity", "ms_ssim_diversity_real"),
           references=("ms_ssim_diversity_real",)),
)  # fmt: skip


def _memorization(ctx, images, labels, round_):
    if ctx.train_images is None:
        raise MetricUnavailable("needs the training images, which only a simulation's server has")
    out = fn.copy_statistics(images, ctx.train_images, ctx.real_images)
    if ctx.samples_dir is not None:  # the closest generated/training pairs, side by side
        d, idx = fn.nearest_distances(images, ctx.train_images)
        top = d.argsort()[:8]
        pairs = torch.stack([images[top], ctx.train_images[idx[top]]], 1).flatten(0, 1)
        ctx.samples_dir.mkdir(parents=True, exist_ok=True)
        atomic_save_image(
            pairs,
            ctx.samples_dir / f"memorization_{round_:04d}.png",
            nrow=2,
            normalize=True,
            value_range=(-1, 1),
            padding=1,
        )
    return {f"memorization_{k}": v for k, v in out.items()}


METRICS.add(
    "memorization_1k",
    Metric("memorization_1k", 1000, _memorization, higher_is_better=True,
           keys=tuple(f"memorization_{k}" for k in ("nn_ratio", "copy_fraction", "gen_nn_median",
                                                    "heldout_nn_median")),
           lower_keys=("memorization_copy_fraction",),
           references=("memorization_heldout_nn_median",)),
)  # fmt: skip


def classifier_auc(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    epochs: int = 10,
    seed: int = 0,
    device: torch.device | None = None,
) -> float:
    """ROC AUC (one-vs-rest macro for several classes) on ``test`` of a small CNN trained on
    ``train``: the train-on-synthetic-test-on-real protocol when ``train`` is synthetic."""
    from sklearn.metrics import roc_auc_score

    device = device or torch.device("cpu")
    classes = int(max(train_y.max(), test_y.max())) + 1
    model = train_classifier(
        train_x, train_y.long(), classes, epochs=epochs, seed=seed, device=device, balanced=True
    )
    with torch.no_grad():
        probs = torch.cat([model(b.to(device)).softmax(1).cpu() for b in test_x.split(256)])
    y = test_y.numpy()
    if len(np.unique(y)) < 2:
        raise MetricUnavailable("the real test split holds a single class: AUC is undefined")
    if classes == 2:
        return float(roc_auc_score(y, probs[:, 1].numpy()))
    return float(roc_auc_score(y, probs.numpy(), multi_class="ovr", labels=list(range(classes))))


def _tstr(ctx, images, labels, round_):
    if labels is None:
        raise MetricUnavailable("needs a conditional generator (model.family: cgan)")
    out = {
        "tstr_auc": classifier_auc(
            images, labels, ctx.real_images, ctx.real_labels, seed=ctx.seed, device=ctx.device
        )
    }
    if ctx.train_images is not None and ctx.train_labels is not None:
        out["trtr_auc"] = classifier_auc(
            ctx.train_images,
            ctx.train_labels,
            ctx.real_images,
            ctx.real_labels,
            seed=ctx.seed,
            device=ctx.device,
        )
    return out


METRICS.add(
    "tstr_auc",
    Metric("tstr_auc", 2000, _tstr, higher_is_better=True, keys=("tstr_auc", "trtr_auc"),
           references=("trtr_auc",)),
)  # fmt: skip


def parse_metric_list(text: str, key: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each checked against the registry.

    Raises:
        ValueError: Naming ``key`` and the known metrics.
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(
            f"config key {key!r}: unknown metric(s) {unknown}; known: {', '.join(METRICS.names())}"
        )
    return names


def direction(key: str) -> str | None:
    """How to read a value written under ``key`` (see :meth:`Metric.direction`), from the
    metric that writes it; a paired key may carry a baseline's prefix (``nlm_psnr``) or a
    gain suffix (``psnr_gain``). None for a key no registered metric writes."""
    for name in METRICS.names():
        metric = METRICS.get(name)
        if key in metric.output_keys:
            return metric.direction(key)
        # the same quantity under another protocol (e.g. a paired task's ``domain_fd``)
        for own in metric.output_keys:
            if re.sub(r"_\d+k(?=_std$|$)", "", own) == key:
                return metric.direction(own)
    if key.endswith("_gain"):  # fedgan's margin over the best baseline
        return HIGHER if direction(key.removesuffix("_gain")) is not None else None
    for paired in (True, False):  # a baseline's value: ``<baseline>_<key>``
        for name in METRICS.names():
            metric = METRICS.get(name)
            if metric.paired != paired:
                continue
            for own in metric.output_keys:
                if key.endswith(f"_{own}"):
                    return metric.direction(own)
    return None
