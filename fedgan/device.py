"""Which torch device a setting names: ``auto`` is CUDA where there is one, else the CPU."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given.

    Raises:
        ValueError: If CUDA is asked for on a machine without it, or a CUDA device it lacks.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but CUDA is not available; use auto or cpu")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(
                f"train.device is {name!r} but this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}; use one of those, or auto"
            )
    return device
