"""What each hospital holds: counts, class histograms, intensity statistics, pictures."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedgan.data import eval_dataset, hospital_pool

if TYPE_CHECKING:
    from fedgan.config import Config
    from fedgan.data.sources import ImagePool


@dataclass(frozen=True)
class HospitalSummary:
    """One hospital's share (images in [0, 1])."""

    hospital: int
    images: int
    classes: list[int]
    mean: float
    std: float
    min: float
    max: float
    skipped_files: int


def summarize(pool: ImagePool, hospital: int, num_classes: int) -> HospitalSummary:
    x = pool.images
    hist = torch.bincount(pool.labels, minlength=num_classes).tolist()
    return HospitalSummary(
        hospital=hospital,
        images=len(x),
        classes=hist,
        mean=float(x.mean()),
        std=float(x.std()) if x.numel() > 1 else 0.0,
        min=float(x.min()),
        max=float(x.max()),
        skipped_files=len(pool.skipped),
    )


def describe(cfg: Config, out: Path) -> list[dict]:
    """Summarizes the simulated partition of ``cfg`` and saves ``partition.png`` (class counts
    per hospital) and ``samples.png`` (a row of images per hospital) under ``out``.

    Raises:
        ValueError: As the data set or partitioner does for bad settings (e.g. an empty share).
    """
    from fedgan.report.plots import plot_partition, sample_rows

    n = cfg.federation.num_hospitals
    pools = [hospital_pool(cfg.data, cfg.run.seed, h, n) for h in range(n)]
    num_classes = max(int(p.labels.max()) + 1 for p in pools)
    rows = [asdict(summarize(p, h, num_classes)) for h, p in enumerate(pools)]
    held_out = eval_dataset(cfg.data, cfg.run.seed, n).tensors[0]
    rows.append({"hospital": "held-out", "images": len(held_out)})
    out.mkdir(parents=True, exist_ok=True)
    plot_partition(rows[:-1], out / "partition.png", pools[0].classes)
    sample_rows([p.images[:8] for p in pools], out / "samples.png")
    return rows


def format_table(rows: list[dict]) -> str:
    """The per-hospital summary as an aligned text table."""
    stats = " ".join(f"{name:>6}" for name in ("mean", "std", "min", "max"))
    head = f"{'hospital':>9} {'images':>7}  {'classes':<20} {stats} {'skipped':>7}"
    lines = [head]
    for r in rows:
        if r["hospital"] == "held-out":
            lines.append(f"{'held-out':>9} {r['images']:>7}  (central evaluation)")
            continue
        lines.append(
            f"{r['hospital']:>9} {r['images']:>7}  {r['classes']!s:<20} {r['mean']:6.3f} "
            f"{r['std']:6.3f} {r['min']:6.3f} {r['max']:6.3f} {r['skipped_files']:>7}"
        )
    return "\n".join(lines)
