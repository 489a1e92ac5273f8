"""Central evaluation of anomaly detection: image-level ROC AUC and average precision, and,
where the data know their lesions (the phantom), pixel-level Dice and IoU of the thresholded
anomaly map at the threshold chosen on a validation half, never on the test half. fedgan and
the classical baselines (distance to the mean healthy image; PCA reconstruction of healthy
images) are scored the same way, on the same images, with the same map smoothing.

The task is passed in (anything with :class:`AnomalyTask`'s methods): evaluation never
imports training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from fedgan.data.degrade import gaussian_blur, shift_tolerant_residual
from fedgan.device import resolve_device
from fedgan.evaluation import functional as fn
from fedgan.evaluation.metrics import METRICS, Metric, MetricUnavailable
from fedgan.models import load_state
from fedgan.rundir import atomic_write_bytes

if TYPE_CHECKING:
    from fedgan.config import Config

Detector = Callable[[torch.Tensor], tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]]
"""images -> (own scores, or scores by rule name (:data:`Scores`), maps)."""


class AnomalyTask(Protocol):
    """What the evaluator needs of an anomaly-detection task."""

    def build(self) -> dict[str, nn.Module]: ...

    def anomaly_maps(
        self,
        nets: dict[str, nn.Module],
        images: torch.Tensor,
        batch: int = ...,
        shift: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def critic_scores(self, nets: dict[str, nn.Module], images: torch.Tensor) -> torch.Tensor: ...


def smooth_map(maps: torch.Tensor) -> torch.Tensor:
    """Every method's anomaly map is smoothed the same way before thresholding: a Gaussian of
    1 px at 32 px (scaled with the size), which turns single-pixel residual noise into
    regions."""
    return gaussian_blur(maps, maps.shape[-1] / 32)


def mean_image_detector(healthy: torch.Tensor, shift: int = 0) -> Detector:
    """The pixel-wise distance to the mean healthy image (score: mean squared distance), each
    pixel's smallest over shifts of the mean image by up to ``shift`` px."""
    mean = healthy.mean(0, keepdim=True)

    def detect(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diff = shift_tolerant_residual(x, mean.expand_as(x), shift)
        return diff.square().flatten(1).mean(1), diff

    return detect


def pca_detector(
    healthy: torch.Tensor, components: int = 32, seed: int = 0, shift: int = 0
) -> Detector:
    """Reconstruction by the leading principal components of healthy images (score: mean
    squared residual), each pixel's residual the smallest over shifts of the reconstruction
    by up to ``shift`` px."""
    from sklearn.decomposition import PCA

    k = max(1, min(components, len(healthy) - 1))
    pca = PCA(n_components=k, random_state=seed).fit(healthy.flatten(1).double().numpy())

    def detect(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(1).double().numpy()
        rec = torch.from_numpy(pca.inverse_transform(pca.transform(flat))).float()
        diff = shift_tolerant_residual(x, rec.view_as(x), shift)
        return diff.square().flatten(1).mean(1), diff

    return detect


TOP_FRACTION = 0.01
"""The ``top`` image score: the mean of the largest 1 % of a smoothed map's pixels (at least
one), the residual where it is worst, which a lesion of a few pixels moves and a whole-image
mean does not."""

SCORE_RULES = ("own", "top", "critic", "ztop")
"""The image-score rules, in the order ``anomaly_score_rule`` numbers them: the method's own
score (f-AnoGAN's residual plus feature residual; a baseline's mean squared residual),
``top``, ``critic``: how unreal the released discriminator finds the image, ``-D(x)``
(the discrimination score of AnoGAN and of Zenati et al. 2018's BiGAN detector; fedgan only,
a baseline has no discriminator), and ``ztop``: ``top`` of the map standardized by healthy
images' residuals (:func:`standardize`)."""

Scores = dict[str, torch.Tensor]
"""A method's image scores by rule name: ``own`` always, ``critic`` where it has one."""

HealthyStats = tuple[torch.Tensor, torch.Tensor]
"""``(mean, std)``, each ``[1, 1, H, W]``: a method's smoothed map, pixel by pixel, over
healthy images (:func:`healthy_stats`)."""

#: Healthy images that estimate :data:`HealthyStats` (a seeded subset of larger references).
STATS_IMAGES = 512


def healthy_stats(maps: torch.Tensor) -> HealthyStats:
    """Each pixel's mean and standard deviation of a method's smoothed maps of healthy images."""
    if len(maps) < 2:
        raise MetricUnavailable("standardized maps need at least two healthy images")
    return maps.mean(0, keepdim=True), maps.std(0, keepdim=True)


def standardize(maps: torch.Tensor, stats: HealthyStats) -> torch.Tensor:
    """How far each pixel's residual exceeds what healthy anatomy leaves there: the smoothed
    map minus the healthy mean, over the healthy standard deviation plus 10 % of its average
    (a pixel where healthy residuals never vary cannot explode), clipped at 0. A detector that
    always misses an organ's edge by a little stops flagging that edge; a lesion stands out."""
    mean, std = stats
    return ((maps - mean) / (std + 0.1 * std.mean())).clamp(min=0)


def top_score(maps: torch.Tensor, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """``[N]``: the mean of each map's largest ``fraction`` of values (at least one)."""
    flat = maps.flatten(1)
    k = max(1, int(flat.shape[1] * fraction))
    return flat.topk(k, dim=1).values.mean(1)


def candidates(
    scores: Scores | torch.Tensor, maps: torch.Tensor, stats: HealthyStats | None = None
) -> Scores:
    """Every image score a method offers, by rule name: its own (``scores`` alone, or with
    ``critic``), ``top`` of its smoothed ``maps``, and with the healthy ``stats`` of those
    maps, ``ztop``."""
    out = {"own": scores} if isinstance(scores, torch.Tensor) else dict(scores)
    out["top"] = top_score(maps)
    if stats is not None:
        out["ztop"] = top_score(standardize(maps, stats))
    return out


def choose_score_rule(scores: Scores, labels: torch.Tensor) -> int:
    """The index in :data:`SCORE_RULES` of the candidate score (see :func:`candidates`) with
    the highest ROC AUC on these (validation) images; the earlier rule on a tie, ``own``
    where the labels hold one class. Small lesions favour ``top``, diffuse disease a
    whole-image score."""
    from sklearn.metrics import roc_auc_score

    y = labels.numpy()
    if len(np.unique(y)) < 2:
        return 0
    aucs = [(roc_auc_score(y, scores[name].double().numpy()), -i)
            for i, name in enumerate(SCORE_RULES) if name in scores]  # fmt: skip
    return -max(aucs)[1]


def rule_scores(rule: int, scores: Scores) -> torch.Tensor:
    """The image scores of rule ``rule`` (an index in :data:`SCORE_RULES`) among a method's
    :func:`candidates`."""
    name = SCORE_RULES[rule]
    if name not in scores:
        raise MetricUnavailable(f"image score {name!r} needs a method that has it")
    return scores[name]


def detection_scores(
    val: tuple[Scores | torch.Tensor, torch.Tensor],
    test: tuple[Scores | torch.Tensor, torch.Tensor],
    test_labels: torch.Tensor,
    val_masks: torch.Tensor | None,
    test_masks: torch.Tensor | None,
    val_labels: torch.Tensor | None = None,
    stats: HealthyStats | None = None,
) -> dict[str, float]:
    """Image-level ROC AUC and AP on the test half, and pixel-level Dice and IoU where masks
    exist, every choice made on the validation half, never on the test half:

    - ``anomaly_auc``, ``anomaly_ap``: of the image score whose AUC is highest on the
      validation half among the method's own, ``top``, (fedgan) ``critic`` and (with
      ``stats``) ``ztop`` (:func:`choose_score_rule`; ``anomaly_score_rule`` says which, an
      index in :data:`SCORE_RULES`); the own score without ``val_labels``.
    - ``anomaly_val_auc``: the chosen score's AUC on the validation half (with
      ``val_labels`` of both classes): what ``eval.select`` may choose a run's best round by,
      as no test image enters it.
    - ``anomaly_auc_own``: the own score's AUC, whichever was chosen.
    - ``anomaly_auc_map``: the largest value of the smoothed map, the same rule for every method.
    - ``anomaly_dice``, ``anomaly_iou``: at the pixel threshold that maximizes Dice on the
      validation half.

    Args:
        val: ``(scores, smoothed maps)`` of the validation half: the method's own scores, or
            its :data:`Scores`.
        test: The same of the test half.
        test_labels: 1 = abnormal.
        val_masks: Lesion masks of the validation half (None where unknown).
        test_masks: Lesion masks of the test half.
        val_labels: The validation half's labels (1 = abnormal), which choose the image score.
        stats: The method's :data:`HealthyStats`, from healthy images outside the test half.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = test_labels.numpy()
    if len(np.unique(y)) < 2:
        raise MetricUnavailable("the test half holds a single class: AUC is undefined")
    offered = candidates(test[0], test[1], stats)
    on_val = candidates(val[0], val[1], stats)
    rule = 0 if val_labels is None else choose_score_rule(on_val, val_labels)
    scores = rule_scores(rule, offered).double().numpy()
    out: dict[str, float] = {
        "anomaly_auc": float(roc_auc_score(y, scores)),
        "anomaly_ap": float(average_precision_score(y, scores)),
        "anomaly_score_rule": float(rule),
        "anomaly_auc_own": float(roc_auc_score(y, offered["own"].double().numpy())),
        "anomaly_auc_map": float(roc_auc_score(y, test[1].flatten(1).amax(1).double().numpy())),
    }
    if val_labels is not None and len(np.unique(val_labels.numpy())) == 2:
        val_scores = rule_scores(rule, on_val).double().numpy()
        out["anomaly_val_auc"] = float(roc_auc_score(val_labels.numpy(), val_scores))
    if val_masks is not None and test_masks is not None and val_masks.any():
        threshold = fn.best_threshold(val[1], val_masks)
        out["anomaly_dice"] = fn.dice(test[1] > threshold, test_masks)
        out["anomaly_iou"] = fn.iou(test[1] > threshold, test_masks)
        out["anomaly_threshold"] = threshold
    return out


def stats_path(samples_dir: Path, round_: int) -> Path:
    """Where a round's fedgan :data:`HealthyStats` are kept (beside its sample grid)."""
    return samples_dir / f"round_{round_:04d}.healthy.pt"


def save_stats(stats: HealthyStats, path: Path) -> None:
    """Writes ``stats`` atomically."""
    import io

    buf = io.BytesIO()
    torch.save({"mean": stats[0], "std": stats[1]}, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def load_stats(path: Path) -> HealthyStats:
    """What :func:`save_stats` wrote.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
    """
    got = torch.load(path, map_location="cpu", weights_only=True)
    return got["mean"], got["std"]


def _unavailable(*args: object) -> dict[str, float]:
    raise MetricUnavailable("scores an anomaly detector: it needs task anomaly")


METRICS.add("anomaly", Metric(
    "anomaly", 0, _unavailable, higher_is_better=True,
    keys=("anomaly_auc", "anomaly_ap", "anomaly_auc_own", "anomaly_auc_map", "anomaly_dice",
          "anomaly_iou", "anomaly_threshold", "anomaly_score_rule", "anomaly_val_auc",
          "anomaly_map_shift"),
    references=("anomaly_threshold", "anomaly_score_rule", "anomaly_map_shift"),
    validation=("anomaly_val_auc",),
))  # fmt: skip


class AnomalyEvaluator:
    """The central evaluator of an anomaly-detection run (the surface of the others).

    The held-out images are split in two seeded halves: validation (chooses the pixel
    threshold) and test (is scored). The baselines' healthy reference is the healthy training
    images where the server may read them (a simulation, ``eval.use_training_images``), else
    the validation half's healthy images.

    Args:
        cfg: The experiment config.
        samples_dir: Where the pictures go.
        task: The anomaly task (its networks and maps).
    """

    def __init__(self, cfg: Config, samples_dir: Path, task: AnomalyTask) -> None:
        self.cfg = cfg
        self.task = task
        self.samples_dir = samples_dir
        self.device = resolve_device(cfg.train.device)
        self.skipped: dict[str, str] = {}
        self._data: dict[str, torch.Tensor | None] | None = None
        self._baselines: dict[str, dict[str, float]] | None = None
        self._baseline_maps: dict[str, torch.Tensor] = {}
        self._stats_images: torch.Tensor | None = None
        self._chosen_shift: dict[int, int] = {}

    def data(self) -> dict[str, torch.Tensor | None]:
        """The validation and test halves: images, labels (1 = abnormal) and masks."""
        if self._data is None:
            from fedgan.data import eval_dataset, eval_masks

            cfg = self.cfg
            n = cfg.federation.num_hospitals
            images, labels = eval_dataset(cfg.data, cfg.run.seed, n).tensors
            abnormal = (labels != max(cfg.data.train_label, 0)).long()
            masks = eval_masks(cfg.data, cfg.run.seed)
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(
                cfg.run.seed + 424_242))  # fmt: skip
            half = len(order) // 2
            parts = {"val": order[:half], "test": order[half:]}
            self._data = {}
            for part, idx in parts.items():
                self._data[f"{part}_images"] = images[idx]
                self._data[f"{part}_labels"] = abnormal[idx]
                self._data[f"{part}_masks"] = None if masks is None else masks[idx]
        return self._data

    def _healthy_reference(self) -> torch.Tensor:
        data = self.data()
        if self.cfg.eval.use_training_images:
            from fedgan.data import pooled_dataset

            cfg = self.cfg
            train = pooled_dataset(cfg.data, cfg.run.seed, cfg.federation.num_hospitals)
            images, labels = train.tensors
            healthy = images[labels == max(cfg.data.train_label, 0)]
            if len(healthy) > 1:
                return healthy
        val_images, val_labels = data["val_images"], data["val_labels"]
        assert val_images is not None and val_labels is not None
        return val_images[val_labels == 0]

    def _stats_reference(self) -> torch.Tensor:
        """The healthy images that estimate every method's :data:`HealthyStats`: the baselines'
        reference, at most :data:`STATS_IMAGES` of them (a seeded subset)."""
        if self._stats_images is None:
            healthy = self._healthy_reference()
            order = torch.randperm(len(healthy), generator=torch.Generator().manual_seed(
                self.cfg.run.seed + 515_151))  # fmt: skip
            self._stats_images = healthy[order[:STATS_IMAGES]]
        return self._stats_images

    def _score(self, detect: Detector) -> tuple[dict[str, float], torch.Tensor, HealthyStats]:
        d = self.data()
        val = detect(d["val_images"])  # type: ignore[arg-type]
        test = detect(d["test_images"])  # type: ignore[arg-type]
        stats = healthy_stats(smooth_map(detect(self._stats_reference())[1]))
        val = (val[0], smooth_map(val[1]))
        test = (test[0], smooth_map(test[1]))
        scores = detection_scores(val, test, d["test_labels"],  # type: ignore[arg-type]
                                  d["val_masks"], d["test_masks"], d["val_labels"],
                                  stats)  # fmt: skip
        return scores, test[1], stats

    def _shifts(self) -> list[int]:
        """The map shifts every method chooses among: none, and ``task.map_shift``."""
        return sorted({0, self.cfg.task.map_shift})

    def _best_of(
        self, make: Callable[[int], Detector]
    ) -> tuple[dict[str, float], torch.Tensor, HealthyStats]:
        """The scores, test maps and healthy statistics of ``make(shift)`` for the shift in
        :meth:`_shifts` whose validation AUC is highest (the plain map on a tie, or where the
        validation half cannot say), with ``anomaly_map_shift`` saying which."""
        best: tuple[dict[str, float], torch.Tensor, HealthyStats] | None = None
        for shift in self._shifts():
            scores, maps, stats = self._score(make(shift))
            scores["anomaly_map_shift"] = float(shift)
            val = scores.get("anomaly_val_auc", float("-inf"))
            if best is None or val > best[0].get("anomaly_val_auc", float("-inf")):
                best = (scores, maps, stats)
        assert best is not None
        return best

    def baselines(self) -> dict[str, dict[str, float]]:
        """Each classical detector's scores (computed once), on the map :meth:`_best_of`
        chooses on validation images, as fedgan's is."""
        if self._baselines is None:
            healthy = self._healthy_reference()
            seed = self.cfg.run.seed
            self._baselines = {}
            makers: dict[str, Callable[[int], Detector]] = {
                "mean": lambda shift: mean_image_detector(healthy, shift),
                "pca": lambda shift: pca_detector(healthy, seed=seed, shift=shift),
            }
            for name, make in makers.items():
                self._baselines[name], self._baseline_maps[name], _ = self._best_of(make)
        return self._baselines

    def prepare(self) -> None:
        """Loads the halves and scores the baselines (before the first evaluation)."""
        self.baselines()

    def networks(self, state: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
        nets = self.task.build()
        load_state(nets, state)
        return {k: v.to(self.device).eval() for k, v in nets.items()}

    def detector(self, state: dict[str, torch.Tensor], shift: int | None = None) -> Detector:
        """fedgan's detector with ``state``'s networks and the map of ``shift`` (the
        config's ``task.map_shift`` without one)."""
        return self._detect_with(self.networks(state), shift)

    def _detect_with(self, nets: dict[str, nn.Module], shift: int | None) -> Detector:
        def detect(x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            scores, maps, _ = self.task.anomaly_maps(nets, x, shift=shift)
            return {"own": scores, "critic": self.task.critic_scores(nets, x)}, maps

        return detect

    def metrics(self, round_: int, state: dict[str, torch.Tensor], names: list[str] | None = None
                ) -> dict[str, float]:  # fmt: skip
        """fedgan's detection scores, each baseline's as ``<baseline>_<key>``, and fedgan's AUC
        (and Dice) gain over the best baseline. Every method's map is the plain or the
        shift-tolerant one, whichever scores better on validation images (:meth:`_best_of`;
        ``anomaly_map_shift``). fedgan's :data:`HealthyStats` of this round, of its chosen map,
        go to ``<samples>/round_<k>.healthy.pt`` (:func:`save_stats`), which ``fedgan detect``
        reads to apply ``ztop``."""
        nets = self.networks(state)
        result, _, stats = self._best_of(lambda shift: self._detect_with(nets, shift))
        self._chosen_shift[round_] = int(result["anomaly_map_shift"])
        save_stats(stats, stats_path(self.samples_dir, round_))
        baselines = self.baselines()
        for name, scores in baselines.items():
            for key, value in scores.items():
                result[f"{name}_{key}"] = value
        for key in ("anomaly_auc", "anomaly_auc_map", "anomaly_dice"):
            best = max((s[key] for s in baselines.values() if key in s), default=None)
            if key in result and best is not None:
                result[f"{key}_gain"] = result[key] - best
        return result

    def sample_grid(self, round_: int, state: dict[str, torch.Tensor]) -> Path:
        """Abnormal test images: input | reconstruction | fedgan's map | each baseline's map |
        the lesion mask (where known); maps scaled by their own 99th percentile."""
        from fedgan.evaluation.paired import comparison_picture

        d = self.data()
        labels = d["test_labels"]
        assert labels is not None
        rows = torch.nonzero(labels == 1).flatten()[:4]
        images = d["test_images"][rows]  # type: ignore[index]
        nets = self.networks(state)
        shift = self._chosen_shift.get(round_)  # the evaluation's choice; config's before one
        _, maps, rec = self.task.anomaly_maps(nets, images, shift=shift)
        self.baselines()

        def shown(m: torch.Tensor) -> torch.Tensor:
            top = torch.quantile(m.flatten().double(), 0.99).clamp(min=1e-8).float()
            return (m / top).clamp(0, 1) * 2 - 1

        columns = {"input": images, "reconstruction": rec, "fedgan map": shown(smooth_map(maps))}
        for name, bmaps in self._baseline_maps.items():
            columns[f"{name} map"] = shown(bmaps[rows])
        if d["test_masks"] is not None:
            columns["lesion"] = d["test_masks"][rows] * 2 - 1  # type: ignore[index]
        return comparison_picture(columns, self.samples_dir / f"round_{round_:04d}.png")

    def evaluate(self, round_: int, state: dict[str, torch.Tensor], *, final: bool = False
                 ) -> dict[str, float]:  # fmt: skip
        result = self.metrics(round_, state)
        self.sample_grid(round_, state)  # with the map the evaluation chose
        return result
