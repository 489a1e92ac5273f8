"""Runs: the bookkeeping of a run directory (resume, checkpoints, ``metrics.jsonl``, sample
grids, summary), the typed records, the centralized baseline, and applying a trained run.
Above training and evaluation; below the federation, the studies and the command line."""

from fedgan.runs.recorder import RunRecorder, make_evaluator
from fedgan.runs.records import Failure, HospitalReport, PrivacySpent, RoundRecord

__all__ = [
    "Failure",
    "HospitalReport",
    "PrivacySpent",
    "RoundRecord",
    "RunRecorder",
    "make_evaluator",
]
