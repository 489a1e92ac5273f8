"""Bytes on the wire: the default job's bytes per round with weights sent in float32, float16
and bfloat16 (a real Flower simulation each; figures from ``metrics.jsonl``), and the final
domain FD of each, so that what half precision costs in quality is on the same line.

    python benchmarks/message_bytes.py [--rounds 3] [--set key=value ...]

Prints one JSON line ending with ``bytes_ratio`` (float16 / float32 bytes per round).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from fedgan.config import load_config
from fedgan.experiment import resolve
from fedgan.federated.simulation import simulate
from fedgan.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    out: dict[str, object] = {}
    per_round: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16", "bfloat16"):
            cfg = resolve(
                load_config(
                    args.config,
                    [
                        f"federation.num_rounds={args.rounds}",
                        f"federation.message_dtype={dtype}",
                        f"run.output_dir={tmp}",
                        f"eval.cache_dir={tmp}/cache",
                        f"run.name={dtype}",
                        "eval.final_metrics=",
                        *args.overrides,
                    ],
                )
            )
            simulate(cfg)
            records = RunDir(cfg.run_dir).read_metrics()
            per_round[dtype] = statistics.median(r["bytes_down"] + r["bytes_up"] for r in records)
            out[f"{dtype}_bytes_per_round"] = int(per_round[dtype])
            out[f"{dtype}_domain_fd_1k"] = records[-1].get("eval", {}).get("domain_fd_1k")
    out["bf16_bytes_ratio"] = round(per_round["bfloat16"] / per_round["float32"], 4)
    out["bytes_ratio"] = round(per_round["float16"] / per_round["float32"], 4)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
