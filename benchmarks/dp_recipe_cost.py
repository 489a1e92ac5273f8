"""What the private-GAN recipe costs in time: one hospital's round (``local_round``, what a
hospital runs) without DP, with the old private round (one D step per generator step) and with
the recipe (the default under DP-SGD: n_D from 3, adaptive, and the generator's embedding
term), the recipe without that term, and with each schedule at n_D 3 and 5, same data and networks, measured interleaved in one run so the machine's noise hits every arm
alike. Target: recipe <= 2.5x.

    python benchmarks/dp_recipe_cost.py [--repeats 3] [--set key=value ...]

Prints one JSON line with the seconds per round and "recipe_cost_ratio" (the default),
"one_step_cost_ratio" and one "<arm>_cost_ratio" per schedule (each against the non-private round).
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
        # the recipe without the generator's embedding term (on by default under DP-SGD)
        "no_embedding": with_changes(base, privacy=private, train={"embedding_weight": 0.0}),
        "fixed_3": with_changes(
            base, privacy=private, train={"n_critic": 3, "critic_schedule": "fixed"}
        ),
        "fixed_5": with_changes(
            base, privacy=private, train={"n_critic": 5, "critic_schedule": "fixed"}
        ),
        "adaptive_5": with_changes(
            base, privacy=private, train={"n_critic": 5, "critic_schedule": "adaptive"}
        ),
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
    # Round 1 of each arm is the warm-up (imports; sigma's calibration, which a hospital does
    # once and then reads from its accountant's history). Every timed round is a round 2: it
    # gets round 1's optimizer state and accountant, as a hospital keeps them between rounds.
    kept = {}
    for name, cfg in configs.items():
        first = local_round(cfg, data, state, None, round_=1, hospital=0)
        kept[name] = (first.optimizer_state, first.accountant or None)
    for _ in range(args.repeats):
        for name, cfg in configs.items():
            optimizers, accountant = kept[name]
            t0 = time.perf_counter()
            local_round(cfg, data, state, optimizers, round_=2, hospital=0, accountant=accountant)
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        json.dumps(
            {
                "images": len(data),
                "local_steps": base.train.local_steps,
                "seconds_per_round": {k: round(v, 3) for k, v in median.items()},
                "one_step_cost_ratio": round(median["one_step"] / median["no_dp"], 3),
                **{
                    f"{name}_cost_ratio": round(median[name] / median["no_dp"], 3)
                    for name in configs
                    if name not in ("no_dp", "one_step", "recipe")
                },
                "recipe_cost_ratio": round(median["recipe"] / median["no_dp"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
