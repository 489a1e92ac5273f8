"""The site's warm ClientApp launcher (fedgan.federated.site_exec), piece by piece; the whole
path (SuperNode in process isolation, the launcher, Flower's run_clientapp) runs in
tests/test_deployment.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

from fedgan.federated.site_exec import WarmClientApps

REPO = Path(__file__).resolve().parent.parent


def _spec(task_type: TaskType, token: str = "ab" * 16) -> ExecutionSpec:
    return ExecutionSpec(
        task_type=task_type, runtime_api_address="127.0.0.1:1", token=token, insecure=True,
        root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
        suppress_output=False, task_id=7,
    )  # fmt: skip


class _Cold:
    def __init__(self) -> None:
        self.specs: list[ExecutionSpec] = []

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        self.specs.append(spec)
        return LaunchResult.accepted()


def test_a_clientapp_task_goes_to_the_warm_process_and_the_next_one_starts_after_it(
    tmp_path: Path,
) -> None:
    got = tmp_path / "job.json"
    # A stand-in warm process that writes what it was handed.
    command = [sys.executable, "-c", f"import sys; open({str(got)!r}, 'w').write(sys.stdin.read())"]
    ex = WarmClientApps(command, fork=False)
    ex._cold = _Cold()  # type: ignore[assignment]
    ex.reconcile()
    first = ex._spare
    assert first is not None
    assert ex.launch(_spec(TaskType.CLIENT_APP, token="cd" * 16)).status.value == "accepted"
    assert first.wait(timeout=30) == 0
    job = json.loads(got.read_text())
    assert job["token"] == "cd" * 16 and job["runtime_api_address"] == "127.0.0.1:1"
    assert (ex.warm_launches, ex.cold_launches) == (1, 0)
    # No spare while the task runs; once it has finished, reconcile starts the next one.
    assert ex._spare is None
    ex.reconcile()
    second = ex._spare
    assert second is not None and second is not first and second.poll() is None
    # A task that is not a ClientApp starts cold and leaves the spare waiting.
    assert ex.launch(_spec(TaskType.SERVER_APP)).status.value == "accepted"
    assert ex._spare is second and second.poll() is None
    # A ClientApp task that finds its spare dead starts cold too.
    second.kill()
    second.wait(timeout=30)
    assert ex.launch(_spec(TaskType.CLIENT_APP)).status.value == "accepted"
    assert (ex.warm_launches, ex.cold_launches) == (1, 2)
    assert [s.task_type for s in ex._cold.specs] == [TaskType.SERVER_APP, TaskType.CLIENT_APP]  # type: ignore[attr-defined]
    # close() stops a waiting spare.
    ex.reconcile()
    third = ex._spare
    assert third is not None
    ex.close()
    assert third.poll() is not None


def test_the_next_warm_process_starts_once_the_task_has_replied_not_exited(tmp_path: Path) -> None:
    """A warm task that has pushed its reply closes its descriptor: the next warm process then
    starts while the old one is still exiting, so the next round's task finds it."""
    gate = tmp_path / "exit-now"
    # A stand-in: reads its task, "replies" (closes the descriptor), then lingers until told.
    code = (
        "import os, sys, time; from pathlib import Path; sys.stdin.read(); "
        "os.close(int(os.environ['FEDGAN_REPLIED_FD'])); "
        f"[time.sleep(0.05) for _ in iter(lambda: Path({str(gate)!r}).exists(), True)]"
    )
    ex = WarmClientApps([sys.executable, "-c", code], fork=False)
    ex._cold = _Cold()  # type: ignore[assignment]
    ex.reconcile()
    first = ex._spare
    assert first is not None
    assert ex.launch(_spec(TaskType.CLIENT_APP)).status.value == "accepted"
    deadline = time.monotonic() + 30
    while ex._spare is None and time.monotonic() < deadline:
        ex.reconcile()
        time.sleep(0.05)
    second = ex._spare
    assert second is not None and second is not first
    assert first.poll() is None  # the replied task is still running: only its reply was in
    # The next task goes to the new warm process, not to a fresh one.
    assert ex.launch(_spec(TaskType.CLIENT_APP)).status.value == "accepted"
    assert (ex.warm_launches, ex.cold_launches) == (2, 0)
    gate.touch()
    assert first.wait(timeout=30) == 0 and second.wait(timeout=30) == 0
    ex.reconcile()
    ex.close()


def test_a_task_still_training_holds_the_next_warm_process_back(tmp_path: Path) -> None:
    gate = tmp_path / "reply-now"
    code = (
        "import os, sys, time; from pathlib import Path; sys.stdin.read(); "
        f"[time.sleep(0.05) for _ in iter(lambda: Path({str(gate)!r}).exists(), True)]; "
        "os.close(int(os.environ['FEDGAN_REPLIED_FD'])); time.sleep(30)"
    )
    ex = WarmClientApps([sys.executable, "-c", code], fork=False)
    ex._cold = _Cold()  # type: ignore[assignment]
    ex.reconcile()
    first = ex._spare
    assert first is not None and ex.launch(_spec(TaskType.CLIENT_APP)).status.value == "accepted"
    for _ in range(10):
        ex.reconcile()
        time.sleep(0.05)
    assert ex._spare is None  # no imports beside a round that trains
    gate.touch()
    deadline = time.monotonic() + 30
    while ex._spare is None and time.monotonic() < deadline:
        ex.reconcile()
        time.sleep(0.05)
    assert ex._spare is not None and first.poll() is None
    first.kill()
    first.wait(timeout=30)
    ex.close()


def test_a_warm_process_loads_the_app_from_the_fab_not_the_site_install(tmp_path: Path) -> None:
    """After warming up, torch is loaded and fedgan is not: Flower's load_app then imports the
    FAB's copy of fedgan, as in a fresh ClientApp process."""
    fab = tmp_path / "fab"
    shutil.copytree(REPO / "fedgan", fab / "fedgan", ignore=shutil.ignore_patterns("__pycache__"))
    code = f"""
import sys, time
from fedgan.federated.site_exec import warm_up
env = warm_up()
assert "torch" in sys.modules and "opacus" in sys.modules, "not warmed"
assert not [m for m in sys.modules if m.startswith("fedgan")], "fedgan kept"
from flwr.supercore.object_ref import load_app
t = time.perf_counter()
app = load_app("fedgan.federated.client_app:app", ValueError, {str(fab)!r})
print(env, time.perf_counter() - t, sys.modules["fedgan.federated.client_app"].__file__,
      sys.modules["fedgan.training.hospital"].__file__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    env, seconds, app_file, hospital_file = out.stdout.split()
    assert env == "FEDGAN_TASK_RECEIVED_AT"
    assert Path(app_file).is_relative_to(fab) and Path(hospital_file).is_relative_to(fab)
    assert float(seconds) < 2.0  # the app's own modules only: its libraries were loaded


def test_a_warm_process_without_a_task_exits_cleanly() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedgan.federated.site_exec", "--worker"],
        stdin=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.close()
    t0 = time.monotonic()
    assert proc.wait(timeout=120) == 0
    assert time.monotonic() - t0 < 120


def test_a_warm_process_closes_its_descriptor_once_flower_has_pushed_the_reply(
    monkeypatch,
) -> None:
    import os
    import types

    from fedgan.federated.site_exec import REPLIED_FD_ENV, _on_reply, _replied_closer

    read, write = os.pipe()
    os.set_blocking(read, False)
    monkeypatch.setenv(REPLIED_FD_ENV, str(write))
    pushed: list[str] = []
    runtime = types.ModuleType("runtime")
    runtime.push_message = lambda client, msg, ctx: pushed.append(msg)  # type: ignore[attr-defined]
    _on_reply(runtime, _replied_closer())
    assert REPLIED_FD_ENV not in os.environ  # not handed on to what the task starts
    try:
        os.read(read, 1)
        raise AssertionError("the descriptor closed before the reply")
    except BlockingIOError:
        pass
    runtime.push_message(None, "reply", None)  # type: ignore[attr-defined]
    assert pushed == ["reply"]
    assert os.read(read, 1) == b""  # EOF: the launcher sees the reply is in
    runtime.push_message(None, "again", None)  # type: ignore[attr-defined]  # no second close
    os.close(read)


# The fork server ---------------------------------------------------------------------------

#: A fork server whose task is a stand-in for Flower's run_clientapp: it writes what it was
#: handed (and where it ran) to OUT/<token>.json, says it replied, and fails on token "bad".
_FAKE_TASK_SERVER = """
import json, os, sys
from pathlib import Path
from fedgan.federated import site_exec
from fedgan.federated.client_app import TASK_RECEIVED_ENV

def fake(job, tell):
    if job["token"] == "bad":
        raise RuntimeError("a failing round")
    tell()
    Path(sys.argv[1], job["token"] + ".json").write_text(json.dumps({
        "job": job, "pid": os.getpid(), "parent": os.getppid(),
        "clock": os.environ.get(TASK_RECEIVED_ENV), "stdin": sys.stdin.read(),
    }))
    sys.exit(0)

site_exec._run_task = fake
site_exec._fork_server()
"""


def _until(ex: WarmClientApps, done, seconds: float = 180.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        ex.reconcile()
        time.sleep(0.05)
    assert done(), "timed out"


def test_the_fork_server_imports_once_and_forks_a_process_per_task(tmp_path: Path) -> None:
    """The real fork server (real imports, probe and fork), with Flower's run_clientapp
    replaced by a stand-in: every task runs in its own child of the one server, which
    survives a failing task and keeps serving."""
    script = [sys.executable, "-c", _FAKE_TASK_SERVER, str(tmp_path)]
    ex = WarmClientApps(fork=True, fork_server_command=script)
    ex._cold = _Cold()  # type: ignore[assignment]
    try:
        ex.reconcile()
        server = ex._server
        assert server is not None
        # A task handed while the server still imports waits for it: not launched cold.
        assert ex.launch(_spec(TaskType.CLIENT_APP, token="t1")).status.value == "accepted"
        _until(ex, lambda: (tmp_path / "t1.json").exists() and not ex.forked and not ex._pending)
        assert ex._server_ready
        for token in ("bad", "t2"):
            assert ex.launch(_spec(TaskType.CLIENT_APP, token=token)).status.value == "accepted"
            _until(ex, lambda: not ex.forked and not ex._pending)
        assert (tmp_path / "t2.json").exists() and not (tmp_path / "bad.json").exists()
        first, second = (json.loads((tmp_path / f"{t}.json").read_text()) for t in ("t1", "t2"))
        assert first["parent"] == second["parent"] == server.pid  # one server, still the same
        assert len({first["pid"], second["pid"], server.pid}) == 3
        assert (
            first["job"]["token"] == "t1" and first["job"]["runtime_api_address"] == "127.0.0.1:1"
        )
        assert float(first["clock"]) == first["job"]["handed_at"]  # start-up counted from hand-off
        assert first["stdin"] == ""  # the launcher's pipe is not the task's stdin
        assert (ex.warm_launches, ex.cold_launches) == (3, 0) and server.poll() is None
    finally:
        ex.close()
    assert server.poll() is not None


def _stand_in_server(tmp_path: Path, body: str) -> list[str]:
    """A fork server stand-in that reports what ``body`` writes with ``say(line)``."""
    code = (
        "import os, sys\n"
        "out = int(os.environ['FEDGAN_FORK_SERVER_FD'])\n"
        "say = lambda line: os.write(out, (line + '\\n').encode())\n" + body
    )
    return [sys.executable, "-c", code]


def test_a_site_where_forking_is_unsafe_falls_back_to_one_warm_process_per_task(
    tmp_path: Path,
) -> None:
    gone = tmp_path / "worker-ran"
    ex = WarmClientApps(
        [sys.executable, "-c", f"import sys; open({str(gone)!r}, 'w').write(sys.stdin.read())"],
        fork=True,
        fork_server_command=_stand_in_server(
            tmp_path, "sys.stdin.readline(); say('nofork probe hung')"
        ),
    )
    ex._cold = _Cold()  # type: ignore[assignment]
    ex.reconcile()
    # Handed to the server before it said no: launched cold when it does.
    assert ex.launch(_spec(TaskType.CLIENT_APP, token="aa")).status.value == "accepted"
    _until(ex, lambda: not ex.fork, 60)
    assert [s.token for s in ex._cold.specs] == ["aa"]  # type: ignore[attr-defined]
    ex.reconcile()
    assert ex._server is None and ex._spare is not None  # the one-task warm process instead
    assert ex.launch(_spec(TaskType.CLIENT_APP, token="bb")).status.value == "accepted"
    assert ex._busy and ex._busy[0][0].wait(timeout=30) == 0
    assert json.loads(gone.read_text())["token"] == "bb"
    ex.close()


def test_a_task_the_server_could_not_fork_or_lost_starts_cold_and_the_server_restarts(
    tmp_path: Path,
) -> None:
    # Says "failed" for the first task, then dies on reading the second.
    body = (
        "import json\nsay('ready')\n"
        "say('failed %d no memory' % json.loads(sys.stdin.readline())['task_id'])\n"
        "sys.stdin.readline(); sys.exit(1)\n"
    )
    ex = WarmClientApps(fork=True, fork_server_command=_stand_in_server(tmp_path, body))
    ex._cold = _Cold()  # type: ignore[assignment]
    ex.reconcile()
    _until(ex, lambda: ex._server_ready, 60)
    first = ex._server
    assert ex.launch(_spec(TaskType.CLIENT_APP, token="aa")).status.value == "accepted"
    _until(ex, lambda: len(ex._cold.specs) == 1, 60)  # type: ignore[attr-defined]
    assert ex.launch(_spec(TaskType.CLIENT_APP, token="bb")).status.value == "accepted"
    _until(ex, lambda: len(ex._cold.specs) == 2, 60)  # type: ignore[attr-defined]
    assert [s.token for s in ex._cold.specs] == ["aa", "bb"]  # type: ignore[attr-defined]
    _until(ex, lambda: ex._server is not None and ex._server is not first, 60)
    assert ex.fork  # restarted, not given up
    # A server that keeps dying is given up after MAX_FORK_SERVER_STARTS starts.
    ex.fork_server_command = _stand_in_server(tmp_path, "sys.exit(1)")
    ex._server.kill()  # type: ignore[union-attr]
    _until(ex, lambda: not ex.fork, 60)
    assert ex._server_starts == WarmClientApps.MAX_FORK_SERVER_STARTS
    ex.close()


def test_the_fork_probe_finds_a_process_that_cannot_fork_safely(tmp_path: Path) -> None:
    """Forked after torch has run its thread pool, a child hangs in torch: the probe says so
    (and the fork server then never serves). Fresh, the probe passes."""
    code = """
import torch
from fedgan.federated.site_exec import fork_probe
print(fork_probe(10) is None, flush=True)
if torch.get_num_threads() > 1:
    torch.nn.Conv2d(1, 8, 3)(torch.randn(16, 1, 32, 32)).square().mean().backward()
    print(fork_probe(10), flush=True)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "True"
    if len(lines) > 1:  # with one thread torch has no pool to break
        assert "hung in torch" in lines[1]
