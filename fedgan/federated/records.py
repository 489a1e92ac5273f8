"""Conversions between torch state dicts and Flower records."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord


def to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A packed state dict (``generator.*`` / ``discriminator.*``) as one ArrayRecord."""
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def from_arrays(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_arrays` (copies, so the record's buffers stay untouched)."""
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in arrays.items()}


def nbytes(arrays: ArrayRecord) -> int:
    """Payload size of an ArrayRecord in bytes."""
    return int(sum(len(a.data) for a in arrays.values()))
