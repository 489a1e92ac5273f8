"""Runs the Flower app on a SuperLink this process starts and stops (``fedgan simulate``).

Flower's state (``FLWR_HOME``: the connection config, the SuperLink database and logs) lives in
the run directory, so runs never share or clobber a user's ``~/.flwr``. Runtime dependency
installation stays off: the app runs in the environment fedgan is installed in.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

import fedgan

CONNECTION = "fedgan"
_FINISHED = "finished"


class RunFailed(RuntimeError):
    """The Flower run ended in a state other than completed."""


def app_dir() -> Path:
    """The Flower app's project folder (holding ``pyproject.toml`` with ``[tool.flwr.app]``).

    Raises:
        FileNotFoundError: If fedgan is not run from a source checkout.
    """
    root = Path(fedgan.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text(encoding="utf-8"):
        raise FileNotFoundError(
            f"no Flower app found at {root}: install fedgan from its source checkout "
            "(pip install -e .) so that `flwr run` can package it"
        )
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for Flower processes of this run: own ``FLWR_HOME``, no runtime
    dependency installation, no update checks."""
    env = dict(os.environ)
    # The SuperLink starts flower-superexec (and the apps) by name: find them beside this
    # Python even when fedgan was called by its full path without an activated venv.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_connection(
    flwr_home: Path,
    address: str,
    *,
    root_certificates: str | None = None,
    name: str = CONNECTION,
) -> Path:
    """Writes ``$FLWR_HOME/config.toml`` with one SuperLink connection named ``name``."""
    conn: dict[str, Any] = {"address": address}
    if root_certificates:
        conn["root-certificates"] = str(root_certificates)
    else:
        conn["insecure"] = True
    path = flwr_home / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tomli_w.dumps({"superlink": {"default": name, name: conn}}).encode())
    return path


@dataclass
class SuperLinkProcess:
    """A SuperLink started by :func:`superlink`."""

    process: subprocess.Popen
    address: str
    log_file: Path


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stops ``proc``, its process group and every process it started, however deep (the
    simulation engine's Ray workers run in sessions of their own): SIGTERM, then SIGKILL."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
    for p in tree:
        with suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for p in alive:
        with suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


@contextmanager
def superlink(
    flwr_home: Path,
    *,
    simulation: bool,
    extra_args: list[str] | None = None,
    startup_timeout: float = 60.0,
) -> Iterator[SuperLinkProcess]:
    """Starts a SuperLink on free loopback ports and stops it (and its children) on exit.

    Args:
        flwr_home: This run's Flower home (database and log go there).
        simulation: Start the simulation runtime instead of waiting for SuperNodes.
        extra_args: More ``flower-superlink`` arguments (TLS, node authentication).
        startup_timeout: Seconds to wait for the Control API.

    Raises:
        RuntimeError: If the SuperLink exits or does not open its Control API in time.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    # Flower >= 1.41 serves the Control, Fleet and Runtime APIs on one HTTP port.
    port = free_port()
    address = f"127.0.0.1:{port}"
    log_file = flwr_home / "superlink.log"
    cmd = [
        _bin("flower-superlink"),
        *(extra_args or ["--insecure"]),
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(flwr_home / "state.db"),
        "--disable-runtime-dependency-installation",
        "--log-file",
        str(log_file),
    ]
    if simulation:
        cmd.append("--simulation")
    with (flwr_home / "superlink.stdout").open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            env=flower_env(flwr_home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    guard = start_watchdog(flwr_home)
    try:
        deadline = time.monotonic() + startup_timeout
        while not _port_open(address):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with code {proc.returncode}; see {log_file}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"flower-superlink did not start in {startup_timeout}s; see {log_file}"
                )
            time.sleep(0.2)
        yield SuperLinkProcess(proc, address, log_file)
    finally:
        stop_process(proc)
        stop_process(guard, timeout=5.0)


def start_watchdog(flwr_home: Path) -> subprocess.Popen:
    """Starts :mod:`fedgan.federated.watchdog` for this process and the Flower processes it
    starts with ``flwr_home`` (the SuperLink, ``flwr run`` and their children): if this process
    is killed without cleaning up, the watchdog stops them. It runs in a session of its own,
    so a terminal's Ctrl-C reaches this process's cleanup, not the watchdog."""
    from fedgan.federated import watchdog

    env = {k: v for k, v in os.environ.items() if k != "FLWR_HOME"}
    return subprocess.Popen(
        [sys.executable, watchdog.__file__, str(os.getpid()), str(flwr_home)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def write_run_config(path: Path, run_config: Mapping[str, Any]) -> Path:
    """Writes a flat run-config as a TOML file ``flwr run --run-config`` accepts."""
    path.write_bytes(tomli_w.dumps(dict(run_config)).encode())
    return path


def submit_run(
    flwr_home: Path,
    run_config_file: Path,
    *,
    federation_config: Mapping[str, Any] | None = None,
    timeout: float | None = None,
    app: Path | None = None,
) -> int:
    """``flwr run <app> fedgan --run-config FILE [--federation-config ...] --stream``, tried
    again while a just-started SuperLink does not answer (:data:`UNAVAILABLE_TRIES`).

    Args:
        app: The Flower app's folder (default: fedgan's own, :func:`app_dir`); another app can
            reuse fedgan's ServerApp or ClientApp with its own mods.

    Returns:
        The run id.
    """
    app = app or app_dir()
    cmd = [_bin("flwr"), "run", str(app), CONNECTION, "--run-config", str(run_config_file)]
    for key, value in (federation_config or {}).items():
        cmd += ["--federation-config", f"{key}={json.dumps(value)}"]
    env = flower_env(flwr_home)
    # Stream the run's logs to our stdout while it runs; the run id is read from the first lines.
    # A SuperLink that has just started can refuse the first connection on a loaded machine
    # ("Connection to the SuperLink is unavailable"); no run exists then, so try again.
    for attempt in range(1, UNAVAILABLE_TRIES + 1):
        proc = subprocess.Popen(
            [*cmd, "--stream"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        run_id = None
        unavailable = False
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                if run_id is None and "Successfully started run" in line:
                    run_id = int(line.rsplit("run", 1)[1].split()[0])
                unavailable = unavailable or "SuperLink is unavailable" in line
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
        if run_id is not None:
            return run_id
        if not unavailable:
            break
        if attempt == UNAVAILABLE_TRIES:
            raise RunFailed(
                f"`flwr run` could not reach the SuperLink in {UNAVAILABLE_TRIES} tries; check "
                "that it is running and answering (its log), then run again"
            )
        time.sleep(2.0 * attempt)
    raise RunFailed(f"`flwr run` did not start a run (exit code {proc.returncode})")


#: How often ``flwr run`` is tried against a SuperLink that does not answer yet.
UNAVAILABLE_TRIES = 3


def _listed(flwr_home: Path, run_id: int) -> tuple[dict[str, Any] | None, str]:
    """The run's row of ``flwr ls --format json``, or None and what came back instead."""
    res = subprocess.run(
        [_bin("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
        env=flower_env(flwr_home),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    try:
        row = json.loads(res.stdout)["runs"][0]
        return (row, "") if isinstance(row, dict) else (None, res.stdout.strip())
    except (ValueError, KeyError, IndexError, TypeError):
        return None, res.stdout.strip() or res.stderr.strip()


def run_status(flwr_home: Path, run_id: int) -> str:
    """The run's status as ``flwr ls`` reports it (e.g. ``finished:completed``)."""
    row, other = _listed(flwr_home, run_id)
    if row is None or "status" not in row:
        return f"unknown ({other})"
    return str(row["status"])


def run_details(flwr_home: Path, run_id: int, limit: int = 300) -> str:
    """Why a run ended as it did, in one line: the last line of ``flwr ls``'s status details,
    where Flower puts the ServerApp's exception (at most ``limit`` characters; ``""`` when
    there are none or the SuperLink does not answer)."""
    row, _ = _listed(flwr_home, run_id)
    lines = [s.strip() for s in str((row or {}).get("status-details") or "").splitlines()]
    last = next((s for s in reversed(lines) if s), "")
    last = last.removeprefix("Simulation failed with exception: ")
    return last if len(last) <= limit else last[: limit - 3] + "..."


def wait_for_run(
    flwr_home: Path,
    run_id: int,
    *,
    timeout: float,
    poll: float = 1.0,
    link: SuperLinkProcess | None = None,
    unknown_limit: float = 60.0,
    min_free_bytes: int = 50 * 2**20,
) -> str:
    """Polls until the run is finished and returns its final status.

    Args:
        flwr_home: The run's Flower home.
        run_id: The Flower run.
        timeout: Seconds the run may take.
        poll: Seconds between polls.
        link: The SuperLink serving the run (its exit ends the wait at once).
        unknown_limit: Seconds of unanswered status polls after which the run is given up.
        min_free_bytes: Free disk space the run directory needs to go on.

    Raises:
        TimeoutError: If the run has not finished within ``timeout`` seconds.
        RunFailed: If the SuperLink exits, stops answering, or the disk is full.
    """
    deadline = time.monotonic() + timeout
    unanswered_since: float | None = None
    while True:
        status = run_status(flwr_home, run_id)
        if status.startswith(_FINISHED):
            return status
        now = time.monotonic()
        if link is not None and link.process.poll() is not None:
            raise RunFailed(
                f"the SuperLink exited (code {link.process.returncode}) while run {run_id} was "
                f"{status!r}; see {link.log_file}. Resume with --set run.resume=true"
            )
        free = shutil.disk_usage(flwr_home).free
        if free < min_free_bytes:
            raise RunFailed(
                f"only {free // 2**20} MiB free on the disk of {flwr_home}: the run cannot write "
                "its state. Free some space, then resume with --set run.resume=true"
            )
        if status.startswith("unknown"):
            unanswered_since = unanswered_since or now
            if now - unanswered_since > unknown_limit:
                raise RunFailed(
                    f"the SuperLink has not reported run {run_id}'s status for "
                    f"{unknown_limit:.0f}s (last answer: {status}); see "
                    f"{link.log_file if link else flwr_home}. Resume with --set run.resume=true"
                )
        else:
            unanswered_since = None
        if now > deadline:
            raise TimeoutError(f"run {run_id} still {status!r} after {timeout:.0f}s")
        time.sleep(poll)
