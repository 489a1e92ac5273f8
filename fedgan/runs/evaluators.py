"""The central evaluator of a run's task, for the recorder, the evaluation process and
``fedgan evaluate``."""

from __future__ import annotations

from pathlib import Path

from fedgan.config import Config
from fedgan.evaluation import CentralEvaluator, PairedEvaluator
from fedgan.evaluation.anomaly import AnomalyEvaluator
from fedgan.models import ImageShape
from fedgan.training import Objective, make_objective

Evaluator = CentralEvaluator | PairedEvaluator | AnomalyEvaluator


def make_evaluator(cfg: Config, samples_dir: Path, objective: Objective | None = None) -> Evaluator:
    """The central evaluator of ``cfg``'s task: generated-image metrics for an objective that
    generates from noise, paired metrics against its classical baselines for an image-to-image
    one, detection metrics against classical detectors for an anomaly detector."""
    objective = objective or make_objective(cfg)
    if objective.detects:
        return AnomalyEvaluator(cfg, samples_dir, objective)  # type: ignore[arg-type]
    if objective.paired:
        return PairedEvaluator(cfg, samples_dir, objective)  # type: ignore[arg-type]
    return CentralEvaluator(cfg, ImageShape(cfg.data.channels, cfg.data.image_size), samples_dir)
