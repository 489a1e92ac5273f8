"""Evaluation off the round's path: the default job's steady-state round time with the
per-round evaluation in the background process, with it in line (on the round's path), and
with no per-round metrics at all. Target: background / none <= 1.05.

    python benchmarks/eval_overlap.py [--rounds 8] [--set key=value ...]

A round's time is the server's wall time from one round's replies to the next's (what every
hospital waits), median over the rounds after ``--warmup``. The evaluation cache (the domain
feature network, the real features) is filled first, so every arm measures steady rounds; the
run's total wall time is printed too (a background evaluation still owed at the end is waited
for there). Prints one JSON line ending with ``eval_overlap_ratio`` (background / none) beside
``inline_ratio`` (in line / none).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fedgan.config import load_config
from fedgan.experiment import resolve
from fedgan.federated.simulation import simulate
from fedgan.rundir import RunDir
from fedgan.runs import make_evaluator

REPO = Path(__file__).resolve().parent.parent
ARMS = {
    "background": ["eval.background=true"],
    "inline": ["eval.background=false"],
    "none": ["eval.metrics=", "eval.final_metrics=", "eval.background=false"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1, help="rounds left out of the steady state")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--arms", default=",".join(ARMS), help="which of the arms to run")
    args = p.parse_args()
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"federation.num_rounds={args.rounds}", f"run.output_dir={tmp}",
                  f"eval.cache_dir={tmp}/cache", *args.overrides]  # fmt: skip
        warm = resolve(load_config(args.config, [*common, "run.name=warm"]))
        t0 = time.perf_counter()
        make_evaluator(warm, Path(tmp) / "warm").prepare()
        out["prepare_s"] = round(time.perf_counter() - t0, 2)
        rounds: dict[str, float] = {}
        for arm, extra in ((a, ARMS[a]) for a in args.arms.split(",")):
            cfg = resolve(load_config(args.config, [*common, f"run.name={arm}", *extra]))
            t0 = time.perf_counter()
            simulate(cfg)
            out[f"{arm}_wall_s"] = round(time.perf_counter() - t0, 1)
            times = [r["round_seconds"] for r in RunDir(cfg.run_dir).read_metrics()]
            rounds[arm] = statistics.median(times[args.warmup :])
            out[f"{arm}_rounds_s"] = [round(x, 2) for x in times]
            out[f"{arm}_round_s"] = round(rounds[arm], 3)
    if {"inline", "none"} <= set(rounds):
        out["inline_ratio"] = round(rounds["inline"] / rounds["none"], 3)
    if {"background", "none"} <= set(rounds):
        out["eval_overlap_ratio"] = round(rounds["background"] / rounds["none"], 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
