"""Central evaluation of the global generator."""

from fedgan.evaluation.central import CentralEvaluator

__all__ = ["CentralEvaluator"]
