"""What the private-GAN recipe costs in time: one hospital's round (``local_round``, what a
hospital runs) without DP, with the old private round (one D step per generator step) and with
the recipe (the default under DP-SGD: n_D from 5, adaptive), same data and networks, measured
interleaved in one run so the machine's noise hits every arm alike. Target: recipe <= 2.5x.

    python benchmarks/dp_recipe_cost.py [--repeats 3] [--set key=value ...]

Prints one JSON line with the seconds per round and "recipe_cost_ratio", "one_step_cost_ratio"
(each against the non-private round).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from fedgan.config import Config, load_config, with_changes
from fedgan.data import hospital_dataset
from fedgan.models import build_networks, pack_state
from fedgan.training.hospital import config_shape, local_round


def arms(base: Config) -> dict[str, Config]:
    private = {"mode": "dp-sgd", "target_epsilon": 10.0}
    return {
        "no_dp": base,
        "one_step": with_changes(
            base, privacy=private, train={"n_critic": 1, "critic_schedule": "fixed"}
        ),
        "recipe": with_changes(base, privacy=private),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    base = load_config(None, ["data.num_images=600", "federation.num_rounds=3", *args.overrides])
    configs = arms(base)
    data = hospital_dataset(base.data, base.run.seed, 0, base.federation.num_hospitals)
    state = pack_state(build_networks(base.model, config_shape(base), seed=0))
    times: dict[str, list[float]] = {name: [] for name in configs}
    for cfg in configs.values():  # warm-up: imports, calibration (cached per process)
        local_round(cfg, data, state, None, round_=1, hospital=0)
    for r in range(args.repeats):
        for name, cfg in configs.items():
            t0 = time.perf_counter()
            local_round(cfg, data, state, None, round_=2 + r, hospital=0)
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        json.dumps(
            {
                "images": len(data),
                "local_steps": base.train.local_steps,
                "seconds_per_round": {k: round(v, 3) for k, v in median.items()},
                "one_step_cost_ratio": round(median["one_step"] / median["no_dp"], 3),
                "recipe_cost_ratio": round(median["recipe"] / median["no_dp"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
