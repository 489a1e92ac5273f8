"""Federated round overhead: the steady-state time of a federated round (4 hospitals, fixed
local steps, real Flower simulation) against the same local training run directly in one
process. Target: ratio <= 1.10.

    python benchmarks/overhead.py [--rounds 6] [--set key=value ...]

Prints one JSON line: {"fed_round_s": ..., "direct_round_s": ..., "overhead_ratio": ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedgan.config import load_config
from fedgan.data import hospital_dataset
from fedgan.federated.simulation import simulate
from fedgan.models import build_networks, pack_state
from fedgan.rundir import RunDir
from fedgan.training.hospital import config_shape, local_round


def direct_rounds(cfg, rounds: int) -> list[float]:
    """The hospitals' local rounds called one after another in this process (same data, same
    steps, same state handling, no Flower)."""
    n = cfg.federation.num_hospitals
    data = [hospital_dataset(cfg.data, cfg.run.seed, h, n) for h in range(n)]
    state = pack_state(build_networks(cfg.model, config_shape(cfg), seed=cfg.run.seed))
    opt_states: list[bytes | None] = [None] * n
    times = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        results = []
        for h in range(n):
            res = local_round(cfg, data[h], state, opt_states[h], round_=r, hospital=h)
            opt_states[h] = res.optimizer_state
            results.append(res)
        total = sum(res.num_examples for res in results)
        state = {
            k: sum(res.state[k].double() * res.num_examples for res in results) / total
            for k in state
        }
        state = {k: v.float() for k, v in state.items()}
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="rounds left out of the steady state")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            [
                "federation.num_hospitals=4",
                f"federation.num_rounds={args.rounds}",
                f"eval.every={args.rounds + 1}",
                f"run.output_dir={tmp}",
                "run.name=overhead",
                *args.overrides,
            ],
        )
        simulate(cfg)
        fed = [r["round_seconds"] for r in RunDir(Path(tmp) / "overhead").read_metrics()]
    torch.set_num_threads(torch.get_num_threads())
    direct = direct_rounds(cfg, args.rounds)
    fed_s = statistics.median(fed[args.warmup :])
    direct_s = statistics.median(direct[args.warmup :])
    print(
        json.dumps(
            {
                "hospitals": cfg.federation.num_hospitals,
                "local_steps": cfg.train.local_steps,
                "fed_round_s": round(fed_s, 3),
                "direct_round_s": round(direct_s, 3),
                "fed_rounds_s": [round(x, 3) for x in fed],
                "direct_rounds_s": [round(x, 3) for x in direct],
                "overhead_ratio": round(fed_s / direct_s, 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
