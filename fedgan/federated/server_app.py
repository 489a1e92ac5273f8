"""The coordinator's ServerApp: aggregate the hospitals' GANs round after round, evaluate the
global generator, and keep the run directory."""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fedgan.config import Config, from_run_config, with_changes
from fedgan.experiment import resolve
from fedgan.federated.grid import PromptGrid
from fedgan.federated.records import from_arrays, to_arrays
from fedgan.federated.strategies import RoundLog, build_strategy, server_state
from fedgan.models import ModelKeys
from fedgan.privacy.accounting import BUDGET_EXHAUSTED
from fedgan.runs import Failure, RoundRecord, RunRecorder
from fedgan.training import networks_for

app = ServerApp()


PRIVACY_KEYS = ("epsilon", "delta", "noise_multiplier", "sample_rate", "dp_steps", "budget",
                "release_noise")  # fmt: skip


class AllBudgetsExhausted(Exception):
    """Every hospital has spent its privacy budget: training ends early, as planned."""


def round_record(round_: int, log_: RoundLog, names: dict[int, str] | None = None) -> RoundRecord:
    """The round's record from what the strategy received: each hospital's report, their
    example-weighted aggregate, and the hospitals that failed (named where known)."""
    names = names or {}
    failures = [
        Failure(
            node_id=node,
            reason=reason,
            hospital=names.get(node, f"node_{node}"),
            budget_exhausted=reason.startswith(BUDGET_EXHAUSTED),
        )
        for node, reason in log_.failures
    ]
    return RoundRecord.federated(round_, log_.reports, failures,
                                 bytes_down=log_.bytes_down, bytes_up=log_.bytes_up)  # fmt: skip


def log_privacy_table(table: dict[str, dict], cfg: Config) -> None:
    """The end-of-run privacy table in the log."""
    if "central" in table:
        row = table["central"]
        log(
            INFO,
            "central DP (%s clipping): epsilon %.3f / %.3f at delta %.1e, %d releases, sigma %.3f",
            row["clipping"],
            row["epsilon"],
            row["budget"],
            row["delta"],
            row["releases"],
            row["noise_multiplier"],
        )
        return
    log(
        INFO,
        "DP-SGD (%s): hospital  epsilon / budget  delta  sigma  q  steps  release sigma",
        cfg.privacy.accountant,
    )
    for name, row in sorted(table.items()):
        log(
            INFO,
            "  %s  %.3f / %.3f  %.1e  %.3f  %.4f  %d  %s%s",
            name,
            row["epsilon"],
            row["budget"],
            row["delta"],
            row["noise_multiplier"],
            row["sample_rate"],
            row["dp_steps"],
            f"{row['release_noise']:.3f}" if row.get("release_noise") else "-",
            "  (exhausted)" if row["exhausted"] else "",
        )


def wait_for_hospitals(grid: Grid, cfg: Config, timeout: float) -> int:
    """Waits until every hospital is connected, or ``timeout`` seconds; then goes on if the
    quorum is.

    Raises:
        RuntimeError: If fewer than the quorum connect within ``timeout`` (e.g. a simulation
            federation with fewer SuperNodes than ``federation.num_hospitals``).
    """
    fed = cfg.federation
    deadline = time.monotonic() + timeout
    while True:
        have = len(list(grid.get_node_ids()))
        if have >= fed.num_hospitals:
            return have
        if time.monotonic() > deadline:
            if have >= fed.quorum:
                log(WARNING, "%s of %s hospitals connected after %.0fs; starting with the "
                    "quorum (federation.min_hospitals=%s)", have, fed.num_hospitals, timeout,
                    fed.quorum)  # fmt: skip
                return have
            raise RuntimeError(
                f"only {have} SuperNode(s) connected but the config needs {fed.quorum} "
                f"(federation.num_hospitals={fed.num_hospitals}); in a simulation run "
                f'`flwr run . --federation-config "num_supernodes={fed.num_hospitals}"` or '
                f"`--run-config federation.num_hospitals={have}`; in a deployment start more "
                "SuperNodes or lower federation.min_hospitals"
            )
        time.sleep(1.0)


def run_server(grid: Grid, cfg: Config) -> dict:
    """Runs the whole federated training described by ``cfg`` on ``grid``.

    Returns:
        The run's summary (also written to ``summary.json``).
    """
    grid = PromptGrid(grid)
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
    keys = ModelKeys.of(networks_for(cfg))
    strategy = build_strategy(
        cfg.federation,
        round_log,
        cfg.privacy,
        keys,
        resumed=recorder.resumed_meta.get("server", {}),
        rounds_left=remaining,
    )
    # Privacy accountants of every hospital, checkpointed so that a resumed run (whose fresh
    # SuperNodes have forgotten them) continues each hospital's history.
    accountants: dict[str, str] = dict(recorder.resumed_meta.get("accountants", {}))
    privacy_table: dict[str, dict] = dict(recorder.resumed_meta.get("privacy", {}))
    nodes: dict[int, str] = {}

    def on_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        round_ = recorder.start_round + server_round
        nodes.update(round_log.names)
        record = round_record(round_, round_log, nodes)
        for hospital, history in round_log.accountants.items():
            accountants[str(hospital)] = history
        for rep in round_log.reports:
            if rep.privacy is not None:
                row = record.hospitals[rep.name]
                privacy_table[rep.name] = {k: row.get(k, 0.0) for k in PRIVACY_KEYS} | {
                    "accountant": cfg.privacy.accountant,
                    "exhausted": False,
                }
        for failure in record.failures:
            log(WARNING, "round %s: %s did not train: %s", round_, failure.hospital,
                failure.reason)  # fmt: skip
        if round_log.kept and round_log.reports:
            log(WARNING, "round %s: %s", round_, round_log.kept)
            record.aggregate["global_kept"] = 1
            if failure.budget_exhausted and failure.hospital in privacy_table:
                privacy_table[failure.hospital]["exhausted"] = True
        if not round_log.reports:
            if record.failures and all(f.budget_exhausted for f in record.failures):
                raise AllBudgetsExhausted(round_)
            counted: dict[str, int] = {}
            for _, reason in round_log.failures:
                counted[reason] = counted.get(reason, 0) + 1
            reasons = "; ".join(f"{n} x {r}" if n > 1 else r for r, n in counted.items())
            raise RuntimeError(f"round {round_}: no hospital trained ({reasons or 'no replies'})")
        spent = getattr(strategy, "privacy_spent", lambda: None)()
        if spent is not None:  # central DP: one accountant for the whole federation
            record.aggregate["central_epsilon"] = spent.epsilon
            privacy_table["central"] = {
                "epsilon": spent.epsilon,
                "delta": spent.delta,
                "budget": cfg.privacy.target_epsilon,
                "noise_multiplier": strategy.noise_multiplier,  # type: ignore[attr-defined]
                "clipping_norm": cfg.privacy.max_grad_norm,
                "releases": spent.num_releases,
                "accountant": spent.accounting_method,
                "clipping": cfg.privacy.central_clipping,
            }
        done = recorder.end_round(
            record,
            from_arrays(arrays),
            meta={
                "accountants": accountants,
                "privacy": privacy_table,
                "server": server_state(strategy),
            },
        )
        return MetricRecord(dict(done.eval or {}))

    train_config = ConfigRecord({"round-offset": recorder.start_round})
    for hid, history in accountants.items():
        train_config[f"accountant.{hid}"] = history
    extra: dict = {}
    try:
        strategy.start(
            grid=grid,
            initial_arrays=to_arrays(initial),
            num_rounds=remaining,
            timeout=cfg.federation.round_timeout,
            train_config=train_config,
            evaluate_fn=on_round,
        )
    except AllBudgetsExhausted as stop:
        extra["stopped_early"] = (
            f"round {stop.args[0]}: every hospital has spent its privacy budget"
        )
        log(WARNING, "%s; training ends here", extra["stopped_early"])
    except PrivacyBudgetExhausted as stop:  # central DP: the next release would pass the budget
        extra["stopped_early"] = f"central privacy budget: {stop}"
        log(WARNING, "%s; training ends here", extra["stopped_early"])
    finally:  # a run that fails still keeps every round it trained
        recorder.flush()
    if privacy_table:
        extra["privacy"] = privacy_table
        log_privacy_table(privacy_table, cfg)
    return recorder.finish(extra)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``: the run-config becomes the typed config."""
    cfg = resolve(from_run_config(context.run_config))
    if not Path(cfg.run.output_dir).is_absolute():
        cfg = with_changes(cfg, run={"output_dir": str(Path(cfg.run.output_dir).resolve())})
    run_server(grid, cfg)
