"""A study's life under faults: SIGTERM stops every process and leaves the run resumable; a
SuperLink that dies, stops answering or runs out of disk ends the wait with a clear error."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedgan.federated import launcher
from fedgan.federated.launcher import RunFailed, SuperLinkProcess, wait_for_run
from fedgan.rundir import RunDir

TOY = [
    "data.image_size=16",
    "data.num_images=96",
    "model.base_channels=8",
    "model.latent_dim=16",
    "train.batch_size=8",
    "train.local_steps=2",
    "eval.grid_size=16",
    "federation.num_hospitals=2",
]


def _link(tmp_path: Path, *, alive: bool) -> SuperLinkProcess:
    cmd = [sys.executable, "-c", "import time; time.sleep(30)" if alive else "pass"]
    proc = subprocess.Popen(cmd)
    if not alive:
        proc.wait()
    return SuperLinkProcess(proc, "127.0.0.1:1", tmp_path / "superlink.log")


def test_flwr_run_tries_again_while_the_superlink_does_not_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SuperLink that has just started can refuse ``flwr run``'s first connection on a
    loaded machine; no run exists then, so fedgan tries again, and after
    :data:`~fedgan.federated.launcher.UNAVAILABLE_TRIES` says so in one line."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher.write_connection(tmp_path, f"127.0.0.1:{port}")
    run_config = launcher.write_run_config(tmp_path / "run_config.toml", {})
    with pytest.raises(RunFailed, match=r"could not reach the SuperLink in 3 tries"):
        launcher.submit_run(tmp_path, run_config)
    assert launcher.UNAVAILABLE_TRIES == 3
    assert capsys.readouterr().out.count("SuperLink is unavailable") == 3


def test_a_superlink_that_stops_answering_ends_the_wait(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(launcher, "run_status", lambda home, run: "unknown (database is locked)")
    link = _link(tmp_path, alive=True)
    try:
        start = time.monotonic()
        with pytest.raises(RunFailed, match=r"has not reported.*status for 1s.*run.resume=true"):
            wait_for_run(tmp_path, 1, timeout=60, poll=0.1, link=link, unknown_limit=1.0)
        assert time.monotonic() - start < 10
    finally:
        link.process.kill()


def test_a_dead_superlink_or_a_full_disk_ends_the_wait(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(launcher, "run_status", lambda home, run: "running")
    with pytest.raises(RunFailed, match="SuperLink exited"):
        wait_for_run(tmp_path, 1, timeout=60, poll=0.1, link=_link(tmp_path, alive=False))
    with pytest.raises(RunFailed, match="MiB free on the disk"):
        wait_for_run(tmp_path, 1, timeout=60, poll=0.1, min_free_bytes=2**62)


@pytest.mark.slow
def test_sigterm_stops_every_process_and_leaves_a_resumable_run(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "fedgan.cli", "simulate", "--set", f"run.output_dir={tmp_path}",
            "--set", "run.name=term", "--set", "federation.num_rounds=3"]  # fmt: skip
    for o in TOY:
        args += ["--set", o]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None
    tree: list[psutil.Process] = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # wait until the federation is mid-study
        if "round 1/3" in line:
            tree = psutil.Process(proc.pid).children(recursive=True)
            break
        assert time.monotonic() < deadline, "the simulation never reached round 1"
    assert len(tree) >= 3  # flwr run, the SuperLink, the simulation and its workers
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "run.resume=true" in err
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    rd = RunDir(tmp_path / "term")
    done = [r["round"] for r in rd.read_metrics()]
    assert done == list(range(1, len(done) + 1))  # whole rounds only
    resumed = subprocess.run([*args, "--set", "run.resume=true"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [r["round"] for r in rd.read_metrics()] == [1, 2, 3]


@pytest.mark.slow
def test_a_killed_simulate_leaves_no_flower_process_behind(tmp_path: Path) -> None:
    """SIGKILL gives ``fedgan simulate`` no cleanup; its watchdog stops the SuperLink, ``flwr
    run`` and the simulation, which would otherwise keep the run's database and ports."""
    args = [sys.executable, "-m", "fedgan.cli", "simulate", "--set", f"run.output_dir={tmp_path}",
            "--set", "run.name=killed", "--set", "federation.num_rounds=3"]  # fmt: skip
    for o in TOY:
        args += ["--set", o]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    assert proc.stdout is not None
    tree: list[psutil.Process] = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if "round 1/3" in line:
            tree = psutil.Process(proc.pid).children(recursive=True)
            break
        assert time.monotonic() < deadline, "the simulation never reached round 1"
    names = " ".join(" ".join(p.cmdline()) for p in tree)
    assert "flower-superlink" in names and "watchdog" in names, names
    proc.kill()
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=60)
    left = [" ".join(p.cmdline())[:120] for p in alive if p.is_running()]
    for p in alive:  # never leak a SuperLink into the rest of the suite
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, f"left running: {left}"
