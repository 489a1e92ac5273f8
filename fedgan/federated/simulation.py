"""``fedgan simulate``: N simulated hospitals through Flower's simulation runtime, on a SuperLink
started for this run and stopped after it."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fedgan.config import Config, to_run_config, with_changes
from fedgan.experiment import check_resume
from fedgan.federated.launcher import (
    RunFailed,
    run_details,
    submit_run,
    superlink,
    wait_for_run,
    write_connection,
    write_run_config,
)
from fedgan.rundir import RunDir, UnreadableCheckpoint
from fedgan.training import settle


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT reached ``fedgan simulate``: every process it started is stopped on
    the way out, and the run stays resumable."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stopped_by_signals() -> Iterator[None]:
    """Turns SIGTERM (a scheduler, ``timeout``, ``kill``) and SIGINT into :class:`Stopped`, so
    that the ``finally`` blocks that stop the SuperLink and its children run (the default
    SIGTERM kills Python without them). Only in the main thread, where signals arrive."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        for sig in previous:  # a second signal must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def absolute(cfg: Config) -> Config:
    """``cfg`` with an absolute ``run.output_dir`` (the ServerApp runs in another process)."""
    return with_changes(cfg, run={"output_dir": str(Path(cfg.run.output_dir).resolve())})


def check_run_dir(cfg: Config) -> None:
    """Refuses, before anything starts, to write over a finished or crashed run.

    Raises:
        FileExistsError: If the run directory holds a run and ``run.resume`` is false.
        FileNotFoundError: If ``run.resume`` is true and there is no run to continue.
        ValueError: See :func:`check_server_state`.
    """
    rd = RunDir(cfg.run_dir)
    if cfg.run.resume and not rd.has_run():
        raise FileNotFoundError(
            f"run.resume=true but {str(rd.path)!r} holds no run to continue; check run.name "
            "and run.output_dir, or drop run.resume to start a new run"
        )
    if not cfg.run.resume and rd.has_run():
        raise FileExistsError(
            f"run directory {str(rd.path)!r} already holds a run; pass --set run.resume=true to "
            "continue it, or --set run.name=<new name>"
        )
    if cfg.run.resume:
        check_resume(cfg, settle)
        check_server_state(cfg, rd)


def check_server_state(cfg: Config, rd: RunDir) -> None:
    """Refuses a resume the server could not continue, before any process starts: a server
    optimizer of another kind than the checkpoint's, or a central DP budget that the rounds
    already released have spent. The ServerApp would raise the same error, but inside the
    Flower run, where it reads as a failed run rather than a config to fix.

    Raises:
        ValueError: Naming the setting to change.
    """
    from fedgan.federated.strategies import build_strategy
    from fedgan.models import ModelKeys
    from fedgan.training import networks_for

    try:
        ckpt, _ = rd.load_resumable()
    except (FileNotFoundError, UnreadableCheckpoint):
        return  # metrics only, or no readable checkpoint: the recorder says what it does
    remaining = cfg.federation.num_rounds - int(ckpt["round"])
    if remaining <= 0:
        return
    meta = ckpt.get("meta", {})
    flower = logging.getLogger("flwr")
    level = flower.level
    flower.setLevel(logging.ERROR)  # a trial build: its notices belong to the real run's log
    try:
        build_strategy(
            cfg.federation,
            privacy=cfg.privacy,
            keys=ModelKeys.of(networks_for(cfg)),
            resumed=meta.get("server", {}) if isinstance(meta, dict) else {},
            rounds_left=remaining,
        )
    finally:
        flower.setLevel(level)


def federation_config(cfg: Config) -> dict[str, int | float]:
    """Simulation settings: one SuperNode per hospital; ``federation.concurrent_hospitals``
    worker processes (one per CPU core by default), each training one hospital at a time with
    one torch thread; a share of the GPU per hospital when there is one."""
    hospitals = cfg.federation.num_hospitals
    workers = cfg.federation.concurrent_hospitals or max(1, os.cpu_count() or 1)
    fed: dict[str, int | float] = {
        "num_supernodes": hospitals,
        "client_resources_num_cpus": 1,
        "init_args_num_cpus": workers,
    }
    if torch.cuda.is_available() and cfg.train.device != "cpu":
        fed["client_resources_num_gpus"] = round(1.0 / min(hospitals, 8), 3)
        fed["init_args_num_gpus"] = torch.cuda.device_count()
    return fed


def simulate(cfg: Config, *, timeout: float = 24 * 3600.0, app: Path | None = None) -> dict:
    """Runs the federated simulation described by ``cfg`` and returns its summary.

    Args:
        cfg: The resolved config.
        timeout: Seconds the whole run may take.
        app: Another Flower app folder to run (default: fedgan's own).

    Raises:
        FileExistsError: See :func:`check_run_dir`.
        RunFailed: If the Flower run does not finish as completed.
    """
    cfg = absolute(cfg)
    check_run_dir(cfg)
    flwr_home = cfg.run_dir / ".flwr"
    with stopped_by_signals(), superlink(flwr_home, simulation=True) as link:
        write_connection(flwr_home, link.address)
        rc_file = write_run_config(flwr_home / "run_config.toml", to_run_config(cfg))
        run_id = submit_run(
            flwr_home,
            rc_file,
            federation_config=federation_config(cfg),
            timeout=timeout,
            app=app,
        )
        status = wait_for_run(flwr_home, run_id, timeout=timeout, link=link)
        details = run_details(flwr_home, run_id) if status != "finished:completed" else ""
    if status != "finished:completed":
        raise RunFailed(
            f"Flower run {run_id} ended as {status!r}"
            + (f" ({details})" if details else "")
            + f"; its completed rounds are kept: fix the cause, then continue with --set "
            f"run.resume=true (log: {link.log_file})"
        )
    summary_path = RunDir(cfg.run_dir).summary_path
    if not summary_path.exists():
        raise RunFailed(f"run {run_id} completed but wrote no {summary_path}")
    return json.loads(summary_path.read_text(encoding="utf-8"))
