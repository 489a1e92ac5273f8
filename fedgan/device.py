"""Which torch device a setting names: ``auto`` is CUDA where there is one, else the CPU."""

from __future__ import annotations

import torch


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        setting: What the messages call it (a site's kit calls it ``DEVICE``).

    Raises:
        ValueError: If the name is no device, CUDA is asked for on a machine without it, or a
            CUDA device it lacks.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{setting} is {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{setting} is {name!r} but CUDA is not available; use auto or cpu")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(
                f"{setting} is {name!r} but this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}; use one of those, or auto"
            )
    return device
