"""The cost of the shift-tolerant anomaly map (``task.map_shift``): time to score a set of
images with f-AnoGAN (encoder, generator, the discriminator's features, the map) with the
shift against the plain map, same networks, same images, interleaved in one run.

    python benchmarks/anomaly_map_shift.py [--shift 1] [--images 256] [--repeats 10]
                                           [--set key=value ...]

Prints one JSON line with the times and "map_shift_ratio" (shift / plain). The shift adds
(2K+1)^2 residuals per image beside the networks' forward passes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fedgan.config import load_config
from fedgan.device import resolve_device
from fedgan.training.objectives import make_objective, networks_for


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shift", type=int, default=1)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    base = ["task.name=anomaly", "data.train_label=0", *args.overrides]
    device = resolve_device(load_config(None, base).train.device)
    arms = {}
    for shift in (0, args.shift):
        cfg = load_config(None, [*base, f"task.map_shift={shift}"])
        objective = make_objective(cfg)
        torch.manual_seed(0)  # the same networks in both arms
        nets = {k: v.to(device).eval() for k, v in networks_for(cfg, objective).items()}
        arms[shift] = (objective, nets)
    size = cfg.data.image_size
    images = torch.rand(args.images, cfg.data.channels, size, size) * 2 - 1
    times: dict[int, list[float]] = {s: [] for s in arms}
    for rep in range(args.repeats + 2):  # interleaved, so machine noise hits both arms alike
        for shift, (objective, nets) in arms.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            objective.anomaly_maps(nets, images)  # type: ignore[attr-defined]
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep >= 2:  # warm-up
                times[shift].append(time.perf_counter() - t0)
    med = {s: statistics.median(t) for s, t in times.items()}
    print(json.dumps({
        "device": str(device), "images": args.images, "image_size": size, "shift": args.shift,
        "plain_s": round(med[0], 4), "shifted_s": round(med[args.shift], 4),
        "map_shift_ratio": round(med[args.shift] / med[0], 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
