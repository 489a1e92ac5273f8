"""The cost of DiffAugment views (``train.diff_augment_views``, augmentation multiplicity):
time per private discriminator step with V views against one view, same networks, same batch,
measured interleaved in one run. Both arms run the hospital's own path: the synthesis
objective's discriminator phase on a discriminator made private by
``make_private_discriminator`` (paired ghost clipping), DiffAugment on.

    python benchmarks/augment_views.py [--views 4] [--steps 30] [--set key=value ...]

Prints one JSON line with the times and "views_d_step_ratio" (V views / one view; the
discriminator's forward and clipping see V times the rows, so about V is expected).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fedgan.config import load_config
from fedgan.device import resolve_device
from fedgan.privacy import HospitalAccountant, PrivacyPlan, make_private_discriminator
from fedgan.training.loop import make_optimizers, phase_step
from fedgan.training.objectives import make_objective, networks_for
from fedgan.training.private import step_context


def arm(overrides: list[str], views: int, device: torch.device):
    cfg = load_config(None, [*overrides, f"train.diff_augment_views={views}"])
    objective = make_objective(cfg)
    nets = {k: v.to(device) for k, v in networks_for(cfg, objective).items()}
    opts = make_optimizers(nets, cfg.train)
    n = cfg.train.batch_size * 20
    plan = PrivacyPlan(1.0, 1 / 20, 1e-5, 10.0, "rdp", 1.0, 1000)
    private = make_private_discriminator(
        nets["discriminator"], opts["discriminator"], torch.zeros(n, 1, 1, 1),
        torch.zeros(n, dtype=torch.long), plan, HospitalAccountant("rdp"),
        batch_size=cfg.train.batch_size, secure_mode=False, seed=0, device=device,
        grad_sample_mode="ghost",
    )  # fmt: skip
    nets = {**nets, "discriminator": private.module}
    ctx = step_context(private.module, device, None)
    return cfg, objective, nets, private.optimizer, ctx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    overrides = ["train.diff_augment=translation", *args.overrides]
    device = resolve_device(load_config(None, overrides).train.device)
    arms = {v: arm(overrides, v, device) for v in (1, args.views)}
    cfg = arms[1][0]
    size = cfg.data.image_size
    real = torch.rand(cfg.train.batch_size, 1, size, size, device=device) * 2 - 1
    labels = torch.zeros(cfg.train.batch_size, dtype=torch.long, device=device)
    times: dict[int, list[float]] = {v: [] for v in arms}
    for step in range(args.steps + 5):  # interleaved, so machine noise hits both arms alike
        for v, (_, objective, nets, opt_d, ctx) in arms.items():
            batch = objective.make_batch(real, labels, None, ctx)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            phase_step(objective, objective.phase("D"), nets, {"discriminator": opt_d}, batch, ctx)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 5:  # warm-up
                times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(t) for v, t in times.items()}
    print(
        json.dumps(
            {
                "device": str(device),
                "batch": cfg.train.batch_size,
                "image_size": size,
                "views": args.views,
                "d_step_one_view_ms": round(1e3 * med[1], 3),
                f"d_step_{args.views}_views_ms": round(1e3 * med[args.views], 3),
                "views_d_step_ratio": round(med[args.views] / med[1], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
