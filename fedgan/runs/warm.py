"""Warm starts (``model.init_from``): a run begins from another run's networks, typically
``fedgan pretrain`` on public data, and records which data those networks saw."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedgan.config import Config, load_config
from fedgan.rundir import RunDir


def _checkpoint_path(init_from: str) -> Path:
    """The checkpoint ``model.init_from`` names: a file, or a run directory's latest.

    Raises:
        FileNotFoundError: If neither exists.
    """
    path = Path(init_from)
    if path.is_dir():
        latest = RunDir(path).latest_checkpoint_path()
        if latest is None:
            raise FileNotFoundError(
                f"model.init_from: {init_from!r} holds no checkpoint; point it at a finished "
                "run (fedgan pretrain ...) or a checkpoint file"
            )
        return latest
    if not path.is_file():
        raise FileNotFoundError(
            f"model.init_from: {init_from!r} does not exist; point it at a run directory or a "
            "checkpoint file (fedgan pretrain writes one)"
        )
    return path


def _data_of(checkpoint: Path) -> str:
    """What data the run behind ``checkpoint`` trained on, from its config (if it has one)."""
    config = checkpoint.parent.parent / "config.yaml"
    if not config.is_file():
        return "unknown (a checkpoint file outside a run directory)"
    data = load_config(config).data
    if data.source == "medmnist":
        return f"medmnist {data.subset}" + (f" ({data.path})" if data.path else "")
    if data.source == "phantom":
        return f"phantom ({data.num_images} images, seed-rendered)"
    return f"{data.source} {data.path}"


def describe(cfg: Config) -> dict[str, Any]:
    """The warm start of ``cfg`` as the report shows it (without loading any weights)."""
    path = _checkpoint_path(cfg.model.init_from)
    return {"checkpoint": str(path), "data": _data_of(path)}


def warm_start(
    cfg: Config, fresh: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The networks ``model.init_from`` holds, checked against the fresh ones of ``cfg``.

    Returns:
        The state to start from, and :func:`describe` with the source checkpoint's round.

    Raises:
        FileNotFoundError: If ``model.init_from`` names nothing.
        ValueError: If its networks are not this run's model (keys or shapes differ).
    """
    path = _checkpoint_path(cfg.model.init_from)
    ckpt = RunDir(path.parent.parent).load_checkpoint(path)
    state = {k: v for k, v in ckpt["state"].items()}
    missing = sorted(set(fresh) - set(state))
    extra = sorted(set(state) - set(fresh))
    shapes = sorted(k for k in set(fresh) & set(state) if fresh[k].shape != state[k].shape)
    if missing or extra or shapes:
        problem = (
            f"{len(missing)} weights missing" if missing
            else f"{len(extra)} unexpected weights" if extra
            else f"shapes differ at {shapes[0]} ({tuple(state[shapes[0]].shape)} vs "
            f"{tuple(fresh[shapes[0]].shape)})"
        )  # fmt: skip
        raise ValueError(
            f"config key 'model.init_from': {str(path)!r} holds other networks than this run's "
            f"({problem}); pretrain with this run's model.family, model.latent_dim, "
            "model.base_channels, data.image_size and data.channels"
        )
    info = {**describe(cfg), "round": int(ckpt["round"])}
    return {k: state[k].to(fresh[k].dtype) for k in fresh}, info


def check_warm_start(cfg: Config) -> None:
    """Fails before anything is written (before Flower starts) where ``model.init_from``
    names nothing or other networks than ``cfg``'s. A run that resumes is not checked: it
    goes on from its own checkpoints even if the source is gone.

    Raises:
        FileNotFoundError: If ``model.init_from`` names nothing.
        ValueError: If its networks are not this run's model.
    """
    if not cfg.model.init_from or (cfg.run.resume and RunDir(cfg.run_dir).has_run()):
        return
    from fedgan.models import pack_state
    from fedgan.training import networks_for

    warm_start(cfg, pack_state(networks_for(cfg)))


__all__ = ["check_warm_start", "describe", "warm_start"]
