"""Central evaluation: registered metrics (each with its direction), feature extractors, the
evaluator of generated images and the evaluator of image-to-image outputs. Never imports
training: an image-to-image evaluator is handed its task."""

from fedgan.evaluation.central import CentralEvaluator
from fedgan.evaluation.paired import PairedEvaluator

__all__ = ["CentralEvaluator", "PairedEvaluator"]
