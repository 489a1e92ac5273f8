"""Curves of a run's metrics against rounds."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def series(records: Sequence[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """Every numeric metric of the records as ``name -> (rounds, values)``: the losses, the
    largest epsilon and each evaluation metric."""
    out: dict[str, tuple[list[int], list[float]]] = {}

    def add(name: str, round_: int, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs, ys = out.setdefault(name, ([], []))
            xs.append(round_)
            ys.append(float(value))

    for r in records:
        agg = r.get("aggregate", {})
        for key in ("d_loss", "g_loss", "max_epsilon", "central_epsilon"):
            add(key, r["round"], agg.get(key))
        for key, value in r.get("eval", {}).items():
            if not key.endswith("_std") and not key.startswith(("gen_", "seconds_")):
                add(key, r["round"], value)
    return out


def plot_metrics(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Writes one small panel per metric (value against round) to ``path``."""
    data = series(records)
    if not data:
        return None
    cols = min(4, len(data))
    rows = (len(data) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (name, (xs, ys)) in zip(axes.flat, sorted(data.items()), strict=False):
        ax.plot(xs, ys, marker="o", markersize=2.5)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("round", fontsize=7)
    for ax in list(axes.flat)[len(data) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_partition(
    rows: Sequence[dict[str, Any]], path: Path, class_names: Sequence[str] = ()
) -> Path:
    """Stacked bars: images of each class at each hospital."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), 3.0))
    bottom = [0] * len(rows)
    hospitals = [str(r["hospital"]) for r in rows]
    num_classes = len(rows[0]["classes"]) if rows else 0
    for k in range(num_classes):
        counts = [r["classes"][k] for r in rows]
        name = class_names[k] if k < len(class_names) else f"class {k}"
        ax.bar(hospitals, counts, bottom=bottom, label=name)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set_xlabel("hospital")
    ax.set_ylabel("images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def sample_rows(rows: Sequence[Any], path: Path) -> Path:
    """One row of images (``[n, C, H, W]`` in [0, 1]) per hospital."""
    import torch
    from torchvision.utils import make_grid

    width = max(len(r) for r in rows)
    tiles = []
    for r in rows:
        pad = torch.zeros(width - len(r), *r.shape[1:])
        tiles.append(torch.cat([r.float(), pad]))
    grid = make_grid(torch.cat(tiles), nrow=width, padding=1, pad_value=1.0)
    fig, ax = plt.subplots(figsize=(width * 0.8, len(rows) * 0.8 + 0.3))
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([(i + 0.5) * grid.shape[1] / len(rows) for i in range(len(rows))])
    ax.set_yticklabels([f"hospital {i}" for i in range(len(rows))], fontsize=7)
    ax.set_xticks([])
    fig.tight_layout()
    return _save(fig, path)


def comparison_panels(
    curves: dict[str, dict[str, dict[str, list[float]]]], references: Collection[str] = ()
) -> tuple[list[str], dict[str, float]]:
    """The metrics that get a panel, and the real data's value to draw on a panel as a line
    (the median of what the arms measured for it), by panel."""
    # Final-only metrics have one point per arm: they live in the table, not in the curves.
    metrics = sorted({m for arm in curves.values() for m, c in arm.items() if len(c["value"]) > 1})
    lines: dict[str, float] = {}
    for ref in references:
        owner = ref.removesuffix("_real")
        values = [v for arm in curves.values() for v in arm.get(ref, {}).get("value", [])]
        if owner != ref and owner in metrics and values:
            lines[owner] = float(np.median(values))
            metrics = [m for m in metrics if m != ref]
    return metrics, lines


_X_LABELS = {
    "examples_seen": "training examples seen",
    "generator_steps": "sequential generator steps",
    "wall_seconds": "wall time (s)",
    "round": "round",
}


def plot_comparison_curves(
    curves: dict[str, dict[str, dict[str, list[float]]]],
    path: Path,
    *,
    x: str = "examples_seen",
    references: Collection[str] = (),
) -> Path:
    """One panel per metric: its value against ``x`` (a key of each curve), one line per arm.

    A reference metric (the real data's value, e.g. ``ms_ssim_diversity_real``) is drawn as a
    dashed horizontal line on the panel of the metric it belongs to (its name without
    ``_real``), not as a panel of its own."""
    metrics, lines = comparison_panels(curves, references)
    if not metrics:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no evaluated metrics", ha="center", va="center")
        ax.axis("off")
        return _save(fig, path)
    cols = min(3, len(metrics))
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for arm, series_ in curves.items():
            if metric in series_ and series_[metric].get(x):
                c = series_[metric]
                ax.plot(c[x], c["value"], marker="o", markersize=2.5, label=arm)
        if metric in lines:
            ax.axhline(lines[metric], color="black", linestyle="--", linewidth=1,
                       label="real data")  # fmt: skip
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(_X_LABELS.get(x, x), fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    axes.flat[0].legend(handles.values(), handles.keys(), fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def side_by_side(images: dict[str, Path], path: Path) -> Path:
    """Each arm's sample grid in one row, titled by the arm."""
    fig, axes = plt.subplots(1, len(images), figsize=(3.2 * len(images), 3.5), squeeze=False)
    for ax, (name, image_path) in zip(axes.flat, images.items(), strict=True):
        if image_path.exists():
            ax.imshow(plt.imread(image_path), cmap="gray")
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)
