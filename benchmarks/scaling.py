"""Scaling the number of simulated hospitals: round time, time per hospital-step and peak
memory (sum of RSS over this process and every process under it: SuperLink, simulation
runtime, Ray workers) at several federation sizes, with the same number of hospitals trained
per round (``federation.fraction_train`` = trained / N).

    python benchmarks/scaling.py [--sizes 16,100,500] [--trained 8] [--rounds 3] [--set k=v ...]

Each size is its own Flower simulation on the embedded phantom (16 images per hospital, 32 px).
Prints one row per size, then one JSON line with ``step_time_ratio`` (s/hospital-step at the
largest size / at the smallest) and ``peak_rss_gib`` per size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import psutil

from fedgan.config import load_config
from fedgan.experiment import resolve
from fedgan.federated.simulation import simulate
from fedgan.rundir import RunDir


class PeakMemory:
    """Samples the sum of RSS over this process tree every ``interval`` seconds."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(n: int, args: argparse.Namespace, tmp: str) -> dict:
    trained = min(args.trained, n)
    cfg = resolve(
        load_config(
            None,
            [
                "data.image_size=32",
                f"data.num_images={16 * n}",
                f"federation.num_hospitals={n}",
                f"federation.fraction_train={trained / n}",
                f"federation.num_rounds={args.rounds}",
                f"train.local_steps={args.steps}",
                "train.batch_size=16",
                "eval.metrics=",
                "eval.final_metrics=",
                f"run.output_dir={tmp}",
                f"run.name=n{n}",
                *args.overrides,
            ],
        )
    )
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        simulate(cfg)
    wall = time.perf_counter() - t0
    records = RunDir(cfg.run_dir).read_metrics()
    rounds = [r["round_seconds"] for r in records][1:] or [records[0]["round_seconds"]]
    per_round = statistics.median(rounds)
    hospitals = statistics.median(r["aggregate"]["hospitals"] for r in records)
    return {
        "hospitals": n,
        "trained_per_round": hospitals,
        "wall_s": round(wall, 1),
        "round_s": round(per_round, 3),
        "hospital_step_s": round(per_round / (hospitals * cfg.train.local_steps), 4),
        "peak_rss_gib": round(mem.peak / 2**30, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="16,100,500")
    p.add_argument("--trained", type=int, default=8, help="hospitals trained per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="local steps per hospital and round")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            rows.append(run(n, args, tmp))
            print(json.dumps(rows[-1]), flush=True)
    first, last = rows[0], rows[-1]
    print(
        json.dumps(
            {
                "rows": rows,
                "peak_rss_gib": {r["hospitals"]: r["peak_rss_gib"] for r in rows},
                "step_time_ratio": round(last["hospital_step_s"] / first["hospital_step_s"], 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
