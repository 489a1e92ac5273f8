"""DP-SGD overhead: time per discriminator step and per full GAN iteration (D step + G step),
DP against non-DP, same networks, same batch, measured interleaved in one run.
Targets on CPU: D step <= 2.0x, whole iteration <= 1.6x.

    python benchmarks/dp_overhead.py [--steps 40] [--set key=value ...]

The DP arm is built by fedgan's own ``make_private_discriminator`` (what a hospital trains
with), so ``--set privacy.grad_sample_mode=ew`` or ``hooks`` measures Opacus's per-sample paths
against the default paired ghost clipping.

Prints one JSON line with the times and "d_step_ratio", "iteration_ratio".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch

from fedgan.config import load_config
from fedgan.device import resolve_device
from fedgan.models import FAMILIES, build_networks
from fedgan.privacy import HospitalAccountant, PrivacyPlan, make_private_discriminator
from fedgan.training import d_step, g_step, make_optimizers
from fedgan.training.hospital import config_shape


def setup(cfg, private: bool, device: torch.device):
    nets = build_networks(cfg.model, config_shape(cfg), seed=0)
    for n in nets.values():
        n.to(device)
    opts = make_optimizers(nets, cfg.train)
    d, opt_d = nets["discriminator"], opts["discriminator"]
    if private:
        n = cfg.train.batch_size * 20
        plan = PrivacyPlan(1.0, 1 / 20, 1e-5, 10.0, "rdp", 1.0, 1000)
        images = torch.zeros(n, 1, 1, 1)
        p = make_private_discriminator(
            d, opt_d, images, torch.zeros(n, dtype=torch.long), plan, HospitalAccountant("rdp"),
            batch_size=cfg.train.batch_size, secure_mode=False, seed=0, device=device,
            grad_sample_mode=cfg.privacy.grad_sample_mode,
        )  # fmt: skip
        d, opt_d = p.module, p.optimizer
    return nets["generator"], d, opts["generator"], opt_d


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(None, args.overrides)
    device = resolve_device(cfg.train.device)
    family = FAMILIES.get(cfg.model.family)
    b, shape = cfg.train.batch_size, config_shape(cfg)
    real = torch.rand(b, shape.channels, shape.size, shape.size, device=device) * 2 - 1
    z = torch.randn(b, cfg.model.latent_dim, device=device)
    arms = {"plain": setup(cfg, False, device), "dp": setup(cfg, True, device)}
    times: dict[str, dict[str, list[float]]] = {a: {"d": [], "it": []} for a in arms}
    for step in range(args.steps + 5):  # interleaved, so machine noise hits both arms alike
        for name, (g, d, opt_g, opt_d) in arms.items():
            td = timed(partial(d_step, family, g, d, opt_d, real, z), device)
            tg = timed(partial(g_step, family, g, d, opt_g, z), device)
            if step >= 5:  # warm-up
                times[name]["d"].append(td)
                times[name]["it"].append(td + tg)
    med = {a: {k: statistics.median(v) for k, v in t.items()} for a, t in times.items()}
    print(
        json.dumps(
            {
                "device": str(device),
                "batch": b,
                "image_size": shape.size,
                "grad_sample_mode": cfg.privacy.grad_sample_mode,
                "d_step_plain_ms": round(1e3 * med["plain"]["d"], 3),
                "d_step_dp_ms": round(1e3 * med["dp"]["d"], 3),
                "iteration_plain_ms": round(1e3 * med["plain"]["it"], 3),
                "iteration_dp_ms": round(1e3 * med["dp"]["it"], 3),
                "d_step_ratio": round(med["dp"]["d"] / med["plain"]["d"], 3),
                "iteration_ratio": round(med["dp"]["it"] / med["plain"]["it"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
