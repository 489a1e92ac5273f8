"""Registered metrics. A metric's name fixes its protocol: ``fid_2k`` is 2,000 generated images
against the whole real evaluation split with the standard Inception features; ``domain_fd_1k``
is 1,000 against the same split in the domain classifier's features (not comparable to FID)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.utils import save_image

from fedgan.evaluation import functional as fn
from fedgan.evaluation.features import (
    DomainFeatures,
    InceptionFeatures,
    data_hash,
    train_classifier,
)
from fedgan.registry import Registry


class MetricUnavailable(Exception):
    """The metric does not apply to this run (e.g. TSTR for an unconditional generator)."""


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
            if path.exists():
                feats = torch.load(path, weights_only=True)
            else:
                feats = extractor(self.real_images)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(feats, path)
            self._real_features[name] = feats
        return self._real_features[name]


@dataclass(frozen=True)
class Metric:
    """A registered metric.

    Attributes:
        name: Registered name (fixes the protocol).
        n_generated: Generated images it consumes.
        compute: ``(ctx, images, labels, round_) -> {key: value}``.
        inception: Whether it runs the Inception network (slow on CPU).
    """

    name: str
    n_generated: int
    compute: Callable[[EvalContext, torch.Tensor, torch.Tensor | None, int], dict[str, float]]
    inception: bool = False


METRICS: Registry[Metric] = Registry("metric")


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


for _n, _tag in ((1000, "1k"), (2000, "2k")):
    METRICS.add(
        f"domain_fd_{_tag}", Metric(f"domain_fd_{_tag}", _n, _fd("domain", f"domain_fd_{_tag}"))
    )
    METRICS.add(
        f"domain_kd_{_tag}", Metric(f"domain_kd_{_tag}", _n, _kd("domain", f"domain_kd_{_tag}"))
    )
for _n, _tag in ((2000, "2k"), (10000, "10k"), (50000, "50k")):
    METRICS.add(f"fid_{_tag}", Metric(f"fid_{_tag}", _n, _fd("inception", f"fid_{_tag}"), True))
    METRICS.add(f"kid_{_tag}", Metric(f"kid_{_tag}", _n, _kd("inception", f"kid_{_tag}"), True))


def _prdc(ctx, images, labels, round_):
    out = fn.prdc(ctx.real_features("domain"), ctx.fake_features("domain", images))
    return {f"domain_{k}": v for k, v in out.items()}


METRICS.add("domain_prdc_1k", Metric("domain_prdc_1k", 1000, _prdc))


def _diversity(ctx, images, labels, round_):
    return {
        "ms_ssim_diversity": fn.pairwise_ssim(images, seed=ctx.seed),
        "ms_ssim_diversity_real": fn.pairwise_ssim(ctx.real_images, seed=ctx.seed),
    }


METRICS.add("ms_ssim_diversity", Metric("ms_ssim_diversity", 500, _diversity))


def _memorization(ctx, images, labels, round_):
    if ctx.train_images is None:
        raise MetricUnavailable("needs the training images, which only a simulation's server has")
    out = fn.copy_statistics(images, ctx.train_images, ctx.real_images)
    if ctx.samples_dir is not None:  # the closest generated/training pairs, side by side
        d, idx = fn.nearest_distances(images, ctx.train_images)
        top = d.argsort()[:8]
        pairs = torch.stack([images[top], ctx.train_images[idx[top]]], 1).flatten(0, 1)
        ctx.samples_dir.mkdir(parents=True, exist_ok=True)
        save_image(
            pairs,
            ctx.samples_dir / f"memorization_{round_:04d}.png",
            nrow=2,
            normalize=True,
            value_range=(-1, 1),
            padding=1,
        )
    return {f"memorization_{k}": v for k, v in out.items()}


METRICS.add("memorization_1k", Metric("memorization_1k", 1000, _memorization))


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


METRICS.add("tstr_auc", Metric("tstr_auc", 2000, _tstr))


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
