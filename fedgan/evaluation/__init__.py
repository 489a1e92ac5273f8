"""Central evaluation of the global generator."""

from fedgan.evaluation.central import CentralEvaluator

__all__ = ["CentralEvaluator", "make_evaluator"]


def make_evaluator(cfg, samples_dir):  # type: ignore[no-untyped-def]
    """The central evaluator of ``cfg``'s task: generated-image metrics for ``synthesis``,
    paired metrics against classical baselines for the image-to-image tasks."""
    if cfg.task.name == "synthesis":
        from fedgan.models import ImageShape

        return CentralEvaluator(
            cfg, ImageShape(cfg.data.channels, cfg.data.image_size), samples_dir
        )
    from fedgan.evaluation.paired import PairedEvaluator

    return PairedEvaluator(cfg, samples_dir)
