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
    ex = WarmClientApps(command)
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
    ex = WarmClientApps([sys.executable, "-c", code])
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
    ex = WarmClientApps([sys.executable, "-c", code])
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

    from fedgan.federated.site_exec import REPLIED_FD_ENV, _tell_when_replied

    read, write = os.pipe()
    os.set_blocking(read, False)
    monkeypatch.setenv(REPLIED_FD_ENV, str(write))
    pushed: list[str] = []
    runtime = types.ModuleType("runtime")
    runtime.push_message = lambda client, msg, ctx: pushed.append(msg)  # type: ignore[attr-defined]
    _tell_when_replied(runtime)
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
