"""Runs: the bookkeeping of a run directory (resume, checkpoints, ``metrics.jsonl``, sample
grids, summary), the typed records, the centralized baseline, and applying a trained run.
Above training and evaluation; below the federation, the studies and the command line.

The names below are imported on first use: a hospital's round needs only the records, and a
deployed round is a fresh process that should not pay for the evaluation stack (torchmetrics,
torchvision, matplotlib) it never runs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedgan.runs.evaluators import make_evaluator
    from fedgan.runs.recorder import RunRecorder
    from fedgan.runs.records import Failure, HospitalReport, PrivacySpent, RoundRecord

_WHERE = {
    "Failure": "fedgan.runs.records",
    "HospitalReport": "fedgan.runs.records",
    "PrivacySpent": "fedgan.runs.records",
    "RoundRecord": "fedgan.runs.records",
    "RunRecorder": "fedgan.runs.recorder",
    "make_evaluator": "fedgan.runs.evaluators",
}

__all__ = [
    "Failure",
    "HospitalReport",
    "PrivacySpent",
    "RoundRecord",
    "RunRecorder",
    "make_evaluator",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'fedgan.runs' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
