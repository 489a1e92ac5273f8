"""Seconds per central evaluation at 2,000 generated images: the per-round set (domain
features: Fréchet/kernel distances, precision/recall/density/coverage, diversity) against the
Inception set (fid_2k + kid_2k, one shared Inception pass). Real-data features are cached, as in
a run, so both figures are steady-state per-evaluation costs.

    python benchmarks/eval_cost.py [--inception-weights PATH] [--set key=value ...]

Prints one JSON line: seconds of each set and "inception_to_per_round_ratio".
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from fedgan.config import load_config
from fedgan.evaluation import CentralEvaluator
from fedgan.models import build_networks, pack_state
from fedgan.training.hospital import config_shape

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = (
    Path(os.environ.get("FEDGAN_SHARED", REPO.parent / "shared"))
    / "weights"
    / ("fid_inception_2015-12-05.pth")
)
PER_ROUND = "domain_fd_2k,domain_kd_2k,domain_prdc_1k,ms_ssim_diversity"
INCEPTION = "fid_2k,kid_2k"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--inception-weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            [
                f"run.output_dir={tmp}",
                f"eval.inception_weights={args.inception_weights}",
                *args.overrides,
            ],
        )
        shape = config_shape(cfg)
        state = pack_state(build_networks(cfg.model, shape, seed=0))
        ev = CentralEvaluator(cfg, shape, Path(tmp) / "samples")
        figures: dict[str, float | str] = {"device": str(ev.device), "image_size": shape.size}
        for label, names in (("per_round", PER_ROUND), ("inception", INCEPTION)):
            metric_names = names.split(",")
            t0 = time.perf_counter()
            ev.metrics(0, state, metric_names)  # first call: extractors, real features cached
            figures[f"{label}_first_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            ev.metrics(1, state, metric_names)
            if ev.device.type == "cuda":
                torch.cuda.synchronize()
            figures[f"{label}_s"] = round(time.perf_counter() - t0, 2)
        figures["inception_to_per_round_ratio"] = round(
            float(figures["inception_s"]) / float(figures["per_round_s"]), 1
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
