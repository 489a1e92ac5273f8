"""The coordinator's ServerApp: aggregate the hospitals' GANs round after round, evaluate the
global generator, and keep the run directory."""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedgan.config import Config, from_run_config, with_changes
from fedgan.federated.records import from_arrays, to_arrays
from fedgan.federated.strategies import RoundLog, build_strategy
from fedgan.training.recorder import RunRecorder

app = ServerApp()


def round_record(log_: RoundLog) -> dict:
    """The per-round metrics record: each hospital's report and their weighted aggregate."""
    nan = float("nan")
    hospitals: dict[str, dict[str, float]] = {}
    for rep in log_.reports:
        hid = int(rep.metrics.get("hospital", -1))
        name = f"hospital_{hid}" if hid >= 0 else f"node_{rep.node_id}"
        hospitals[name] = {
            "node_id": rep.node_id,
            "num_examples": int(rep.metrics.get("num-examples", 0)),
            "examples_seen": int(rep.metrics.get("examples-seen", 0)),
            "d_loss": rep.metrics.get("d-loss", nan),
            "g_loss": rep.metrics.get("g-loss", nan),
            "train_seconds": rep.metrics.get("train-seconds", nan),
        }
    total = sum(h["num_examples"] for h in hospitals.values())
    aggregate: dict[str, float] = {
        "hospitals": len(hospitals),
        "num_examples": total,
        "examples_seen": sum(h["examples_seen"] for h in hospitals.values()),
    }
    for key in ("d_loss", "g_loss"):
        if total:
            aggregate[key] = sum(h[key] * h["num_examples"] for h in hospitals.values()) / total
    return {
        "hospitals": hospitals,
        "aggregate": aggregate,
        "failures": [{"node_id": n, "reason": r} for n, r in log_.failures],
        "bytes_down": log_.bytes_down,
        "bytes_up": sum(r.bytes_up for r in log_.reports),
    }


def wait_for_hospitals(grid: Grid, cfg: Config, timeout: float) -> int:
    """Waits until enough SuperNodes are connected.

    Raises:
        RuntimeError: If fewer than the configured hospitals connect within ``timeout`` (e.g. a
            simulation federation with fewer SuperNodes than ``federation.num_hospitals``).
    """
    need = cfg.federation.min_hospitals or cfg.federation.num_hospitals
    deadline = time.monotonic() + timeout
    while True:
        have = len(list(grid.get_node_ids()))
        if have >= need:
            return have
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {have} SuperNode(s) connected but the config needs {need} "
                f"(federation.num_hospitals={cfg.federation.num_hospitals}); in a simulation run "
                f'`flwr run . --federation-config "num_supernodes={need}"` or '
                f"`--run-config federation.num_hospitals={have}`; in a deployment start more "
                "SuperNodes or lower federation.min_hospitals"
            )
        time.sleep(1.0)


def run_server(grid: Grid, cfg: Config) -> dict:
    """Runs the whole federated training described by ``cfg`` on ``grid``.

    Returns:
        The run's summary (also written to ``summary.json``).
    """
    recorder = RunRecorder(cfg, "federated", log=lambda line: log(INFO, line))
    # Check the federation before anything is written, so a mis-sized one leaves no run behind.
    connected = wait_for_hospitals(grid, cfg, timeout=cfg.federation.connect_timeout)
    initial = recorder.start()
    remaining = cfg.federation.num_rounds - recorder.start_round
    if remaining <= 0:
        log(WARNING, "run already completed %s rounds; nothing to do", recorder.start_round)
        return recorder.finish()
    log(INFO, "%s hospital(s) connected; training %s round(s)", connected, remaining)
    round_log = RoundLog()
    strategy = build_strategy(cfg.federation, round_log)

    def on_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        round_ = recorder.start_round + server_round
        record = round_record(round_log)
        for node, reason in round_log.failures:
            log(WARNING, "round %s: node %s did not train: %s", round_, node, reason)
        if not round_log.reports:
            reasons = "; ".join(r for _, r in round_log.failures) or "no replies"
            raise RuntimeError(f"round {round_}: no hospital trained ({reasons})")
        done = recorder.end_round(round_, from_arrays(arrays), record)
        return MetricRecord({k: v for k, v in done.get("eval", {}).items()})

    strategy.start(
        grid=grid,
        initial_arrays=to_arrays(initial),
        num_rounds=remaining,
        timeout=cfg.federation.round_timeout,
        train_config=ConfigRecord({"round-offset": recorder.start_round}),
        evaluate_fn=on_round,
    )
    return recorder.finish()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``: the run-config becomes the typed config."""
    cfg = from_run_config(context.run_config)
    if not Path(cfg.run.output_dir).is_absolute():
        cfg = with_changes(cfg, run={"output_dir": str(Path(cfg.run.output_dir).resolve())})
    run_server(grid, cfg)
