"""A real deployment on 127.0.0.1 with the kits in server/ and clients/: a TLS SuperLink with
SuperNode authentication, two registered hospitals reading their own image folders, `flwr run`.

Every process is started through a kit script that writes a PID file (or directly, with its
PID kept) and is stopped by that PID when the test ends, also when it fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedgan.config import load_config, to_run_config
from fedgan.federated.launcher import free_port, write_run_config
from fedgan.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _kit(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON_BIN": str(BIN), **env}
    return subprocess.run(
        [str(REPO / script), *args], env=full_env, capture_output=True, text=True, timeout=120
    )


def _ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _kill_group(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


@pytest.fixture
def pids(tmp_path: Path) -> Iterator[list[int]]:
    """PIDs to stop at the end: everything listed, plus every PID file under ``tmp_path``."""
    started: list[int] = []
    yield started
    for pidfile in tmp_path.rglob("*.pid"):
        started.append(int(pidfile.read_text()))
    for pid in started:
        _kill_group(pid)
    assert not [p for p in started if _alive(p)], "a deployment process outlived the test"


def _site_data(folder: Path, site: int) -> None:
    from PIL import Image

    from fedgan.data.phantom import apply_scanner, render_phantoms, site_profile

    images, labels = render_phantoms(24, 16, seed=site)
    images = apply_scanner(images, site_profile(site), seed=site)
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        sub = folder / ("lesion" if int(label) else "normal")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(sub / f"{k}.png")


def _site_env(site: Path, superlink: str, ca: Path, **extra: str) -> Path:
    values = {
        "SUPERLINK": superlink,
        "CA_CERT": str(ca),
        "PRIVATE_KEY": str(site / "keys" / "site"),
        "DATA_PATH": str(site / "data"),
        "DATA_FORMAT": "folder",
        "DEVICE": "cpu",
        "CPU_THREADS": "1",
        "CLIENTAPP_PORT": str(free_port()),
        **extra,
    }
    path = site / "site.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.5)
    return False


def _nodes(coord: Path) -> list[dict]:
    res = subprocess.run(
        [str(BIN / "flwr"), "supernode", "list", "fedgan", "--format", "json"],
        env={**os.environ, "FLWR_HOME": str(coord / "flwr"), "PATH": f"{BIN}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(res.stdout)["nodes"]


def test_tls_superlink_two_registered_hospitals(
    tmp_path: Path, pids: list[int], toy_overrides: list[str]
) -> None:
    coord = tmp_path / "coordinator"
    certs = coord / "certs"
    _ok(_kit("server/make-certs.sh", str(certs)))
    # The CA is never replaced by accident.
    assert _kit("server/make-certs.sh", str(certs)).returncode == 2
    port = free_port()
    _ok(_kit("server/start-superlink.sh", str(coord), PORT=str(port), HOST="127.0.0.1"))
    superlink = f"127.0.0.1:{port}"

    sites = {name: tmp_path / name for name in ("a", "b", "stranger", "no-ca")}
    for i, site in enumerate(sites.values()):
        _ok(_kit("clients/make-site-key.sh", str(site / "keys")))
        assert (site / "keys" / "site.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
        _site_data(site / "data", i)
    for name in ("a", "b", "no-ca"):  # "stranger" is never registered
        assert "registered" in _ok(
            _kit("server/register-site.sh", str(coord), str(sites[name] / "keys" / "site.pub"))
        )
    assert _kit("server/register-site.sh", str(coord), str(tmp_path / "nope.pub")).returncode == 2

    for name in ("a", "b"):
        env = _site_env(sites[name], superlink, certs / "ca.crt")
        _ok(_kit("clients/start-supernode.sh", str(env)))

    # An unregistered SuperNode is refused: it exits and never joins.
    env = _site_env(sites["stranger"], superlink, certs / "ca.crt", MAX_RETRIES="1")
    _ok(_kit("clients/start-supernode.sh", str(env)))
    stranger = int((sites["stranger"] / "supernode.pid").read_text())
    assert _wait_exit(stranger, 90), "an unregistered SuperNode stayed connected"
    assert "Failed to activate SuperNode" in (sites["stranger"] / "supernode.log").read_text()

    # A registered SuperNode without the consortium's CA certificate cannot connect.
    no_ca = sites["no-ca"]
    with (no_ca / "log").open("w") as log:
        proc = subprocess.Popen(
            [str(BIN / "flower-supernode"), "--superlink", superlink,
             "--auth-supernode-private-key", str(no_ca / "keys" / "site"),
             "--node-config", f"data-path='{no_ca / 'data'}'",
             "--port", str(free_port()), "--max-retries", "1"],
            env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    pids.append(proc.pid)
    assert proc.wait(timeout=90) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in (no_ca / "log").read_text()

    # The study: 2 rounds over the two registered hospitals, under DP-SGD.
    cfg = load_config(
        None,
        [
            f"run.output_dir={coord / 'runs'}",
            "run.name=deployed",
            *toy_overrides,
            "federation.num_hospitals=2",
            "privacy.mode=dp-sgd",
            "privacy.target_epsilon=50",
        ],
    )
    run_toml = write_run_config(tmp_path / "run.toml", to_run_config(cfg))
    res = subprocess.run(
        [str(BIN / "flwr"), "run", str(REPO), "fedgan", "--run-config", str(run_toml), "--stream"],
        env={**os.environ, "FLWR_HOME": str(coord / "flwr"), "PATH": f"{BIN}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert res.returncode == 0 and "done: results in" in res.stdout, res.stdout[-4000:]
    online = [n for n in _nodes(coord) if n.get("status") == "online"]
    assert len(online) == 2

    rd = RunDir(coord / "runs" / "deployed")
    assert rd.load_checkpoint()["round"] == 2
    records = rd.read_metrics()
    assert [r["round"] for r in records] == [1, 2]
    first, second = (r["hospitals"] for r in records)
    assert len(first) == 2 and set(first) == set(second)
    for name, report in second.items():
        assert report["num_examples"] == first[name]["num_examples"] > 0
        # Each site's accountant persisted across rounds (a new ClientApp process per round).
        assert report["epsilon"] > first[name]["epsilon"] > 0
    # The kit's launcher ran every round in a ClientApp process forked from its fork server,
    # which had imported the libraries once: none started cold.
    for name in ("a", "b"):
        log = (sites[name] / "supernode.log").read_text()
        assert "ready" in log and log.count("ClientApp process") >= 2, log[-3000:]
        assert "forked" in log and "fresh ClientApp process" not in log, log[-3000:]
        assert "SuperNode idle waits capped at 0.5 s" in log, log[:3000]

    _ok(_kit("clients/stop-supernode.sh", str(sites["a"] / "site.env")))
    _ok(_kit("server/stop-superlink.sh", str(coord)))
    assert not (coord / "superlink.pid").exists()


def test_a_site_killed_mid_study_costs_one_reply_not_the_study(
    tmp_path: Path, pids: list[int], toy_overrides: list[str]
) -> None:
    """Three TLS sites; one SuperNode is killed during round 2. That round closes at its
    deadline (or when Flower marks the node lost) with the others, the next rounds go on with
    the quorum, and the dead site is named in the record: the study finishes."""
    coord = tmp_path / "coordinator"
    certs = coord / "certs"
    _ok(_kit("server/make-certs.sh", str(certs)))
    port = free_port()
    _ok(_kit("server/start-superlink.sh", str(coord), PORT=str(port), HOST="127.0.0.1"))
    superlink = f"127.0.0.1:{port}"
    sites = {name: tmp_path / name for name in ("a", "b", "c")}
    for i, site in enumerate(sites.values()):
        _ok(_kit("clients/make-site-key.sh", str(site / "keys")))
        _site_data(site / "data", i)
        _ok(_kit("server/register-site.sh", str(coord), str(site / "keys" / "site.pub")))
        env = _site_env(site, superlink, certs / "ca.crt", HOSPITAL_ID=str(i))
        _ok(_kit("clients/start-supernode.sh", str(env)))
    deadline_s = 120  # a fresh ClientApp process per round, three sites on two cores
    cfg = load_config(None, [
        f"run.output_dir={coord / 'runs'}", "run.name=lossy", *toy_overrides,
        "federation.num_hospitals=3", "federation.num_rounds=4", "train.local_steps=6",
        f"federation.round_timeout={deadline_s}",
    ])  # fmt: skip
    run_toml = write_run_config(tmp_path / "run.toml", to_run_config(cfg))
    started = time.monotonic()
    with (tmp_path / "flwr-run.log").open("w") as log:
        run = subprocess.Popen(
            [str(BIN / "flwr"), "run", str(REPO), "fedgan", "--run-config", str(run_toml),
             "--stream"],
            env={**os.environ, "FLWR_HOME": str(coord / "flwr"),
                 "PATH": f"{BIN}:{os.environ['PATH']}"},
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
    pids.append(run.pid)
    rd = RunDir(coord / "runs" / "lossy")
    # A round's checkpoint is written the moment it ends (its line waits for its evaluation).
    while not (rd.checkpoints / "round_0001.pt").exists():
        assert run.poll() is None, (tmp_path / "flwr-run.log").read_text()[-4000:]
        assert time.monotonic() - started < 300, "round 1 never completed"
        time.sleep(0.5)
    # Round 2 is under way at site c once its launcher has forked the round's ClientApp (the
    # second fork): killed then, it has not replied (loading the app alone takes longer than
    # this loop's 0.05 s).
    c_log = sites["c"] / "supernode.log"
    while c_log.read_text().count("forked") < 2:
        assert run.poll() is None, (tmp_path / "flwr-run.log").read_text()[-4000:]
        assert time.monotonic() - started < 400, "round 2 never reached site c"
        time.sleep(0.05)
    victim = int((sites["c"] / "supernode.pid").read_text())
    _kill_group(victim)  # the SuperNode and its ClientApp, mid-round
    assert run.wait(timeout=4 * deadline_s + 240) == 0, (tmp_path / "flwr-run.log").read_text()[
        -4000:
    ]
    records = rd.read_metrics()
    assert [r["round"] for r in records] == [1, 2, 3, 4]  # the study finished
    assert set(records[0]["hospitals"]) == {"hospital_0", "hospital_1", "hospital_2"}
    later = records[1:]
    assert all(set(r["hospitals"]) <= {"hospital_0", "hospital_1", "hospital_2"} for r in later)
    assert set(records[-1]["hospitals"]) == {"hospital_0", "hospital_1"}  # went on without c
    # It was training round 2 when it died: that round names it as missing and goes on.
    assert "hospital_2" not in records[1]["hospitals"]
    assert [f["hospital"] for f in records[1]["failures"]] == ["hospital_2"]
    assert all(r["round_seconds"] < deadline_s + 60 for r in later)  # no wait past the deadline
