"""A hospital site's ClientApp launcher that keeps one ClientApp process warm.

Flower runs every deployed round in a fresh ClientApp process (``flwr-clientapp``, one per
message), which pays the interpreter, Flower, torch and fedgan imports (about 3 s here) before
it trains. Run the SuperNode with ``--isolation process`` and this module beside it instead of
Flower's own ``flower-superexec``: it asks the SuperNode for pending ClientApp tasks, as
``flower-superexec`` does, but hands each task's token to a process started *between* rounds,
which has already imported the ClientApp's libraries. The round itself is Flower's own
``run_clientapp``: the same FAB installation, app loading, heartbeat and reply.

    python -m fedgan.federated.site_exec --runtime-api-address 127.0.0.1:9094 --insecure \
        --parent-pid SUPERNODE_PID

What stays as Flower does it:
- one process per task (a warm process serves one token and exits), so no state survives in
  memory from one round to the next, as with ``flwr-clientapp``;
- the app's own code comes from the FAB Flower installs: the warm process imports fedgan only
  to load its third-party dependencies, then forgets fedgan's modules, so ``load_app`` imports
  the FAB's copy as a fresh process would;
- a task that is not a ClientApp, or one that arrives when no warm process is alive, is
  launched the way ``flower-superexec`` launches it (``flwr-clientapp --token ...``).

``clients/start-supernode.sh`` starts it with the SuperNode (``WARM_CLIENTAPP=1``, the default)
in the SuperNode's process group, so ``stop-supernode.sh`` stops both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from types import ModuleType
from typing import IO

from flwr.common.constant import RUNTIME_DEPENDENCY_INSTALL
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # type: ignore[attr-defined]
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.plugin import AutoExecPlugin
from flwr.supercore.tls import validate_and_resolve_root_certificates

#: The variable naming the file descriptor a warm process closes once its reply is pushed.
REPLIED_FD_ENV = "FEDGAN_REPLIED_FD"

#: What a warm process imports ahead of its task: the ClientApp and a hospital's round.
WARM_IMPORTS = (
    "flwr.supernode.runtime.run_clientapp",
    "fedgan.federated.client_app",
    "fedgan.training.hospital",
    "fedgan.privacy",
    "opacus",  # imported by a private round when it starts, with scipy
)


class WarmClientApps:
    """A SuperExec executor (Flower's ``Executor`` protocol) with one ClientApp process kept
    started between tasks; everything else is left to Flower's subprocess executor."""

    def __init__(self, command: list[str] | None = None) -> None:
        #: How a warm process starts (it reads one task's JSON line on stdin).
        self.command = command or [sys.executable, "-m", "fedgan.federated.site_exec", "--worker"]
        self._cold = SubprocessExecutor()
        self._spare: subprocess.Popen[bytes] | None = None
        self._spare_fd: int | None = None  # closed by the spare (EOF here) once it has replied
        #: Running tasks, each with its "replied" descriptor (None: a cold one, which cannot say).
        self._busy: list[tuple[subprocess.Popen[bytes], int | None]] = []
        self.warm_launches = 0
        self.cold_launches = 0

    # Flower's Executor protocol ------------------------------------------------------------
    def get_eligible_capacity(
        self,
        supported_task_types: set[TaskType],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[TaskType], set[str]]:
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, *args: object, **kwargs: object) -> None:
        """Nothing to wait for: a task without a warm process starts cold."""

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return self._launch_cold(spec, f"a {spec.task_type} task")
        spare, self._spare = self._spare, None
        fd, self._spare_fd = self._spare_fd, None
        if spare is None or spare.poll() is not None:
            _close(fd)
            if spare is None:
                return self._launch_cold(spec, "the previous round's process was still running")
            return self._launch_cold(spec, "the warm process had exited")
        job = {
            "runtime_api_address": spec.runtime_api_address,
            "token": spec.token,
            "insecure": spec.insecure,
            "root_certificates_path": spec.root_certificates_path,
            "parent_pid": spec.parent_pid,
            "runtime_dependency_install": spec.runtime_dependency_install,
        }
        try:
            stdin: IO[bytes] = spare.stdin  # type: ignore[assignment]
            stdin.write((json.dumps(job) + "\n").encode())
            stdin.close()
        except OSError:  # it died between the check and the write
            _close(fd)
            return self._launch_cold(spec, "the warm process had exited")
        self._busy.append((spare, fd))
        self.warm_launches += 1
        _say(f"task {spec.task_id}: warm ClientApp process {spare.pid}")
        return LaunchResult.accepted()

    def _launch_cold(self, spec: ExecutionSpec, why: str) -> LaunchResult:
        self.cold_launches += 1
        _say(f"task {spec.task_id}: fresh ClientApp process ({why})")
        return self._cold.launch(spec)

    def reconcile(self) -> None:
        """Reap finished tasks; start the next warm process once no task is still training,
        so its imports use the time between rounds (the reply's transfer, the server's
        aggregation) rather than the cores a round trains on. Started beside the running
        round instead, it made a 30 s round 5 s slower on two cores
        (``benchmarks/deployment.py``). A warm task counts as done once it has pushed its
        reply (it closes its descriptor): its process may take another second to exit, and by
        then, with the SuperNode polling every 0.5 s, the next round's task can be here."""
        still: list[tuple[subprocess.Popen[bytes], int | None]] = []
        for proc, fd in self._busy:
            if proc.poll() is None:
                still.append((proc, fd))
            else:
                _close(fd)
        self._busy = still
        if self._spare is not None and self._spare.poll() is not None:
            self._spare = None  # died while waiting (its error is in the site's log)
            _close(self._spare_fd)
            self._spare_fd = None
        training = [proc for proc, fd in self._busy if not _replied(fd)]
        if self._spare is None and not training:
            read, write = os.pipe()
            os.set_blocking(read, False)
            try:
                self._spare = subprocess.Popen(
                    self.command,
                    stdin=subprocess.PIPE,
                    pass_fds=(write,),
                    env={**os.environ, REPLIED_FD_ENV: str(write)},
                )
            finally:
                os.close(write)
            self._spare_fd = read

    def close(self) -> None:
        if self._spare is not None:
            self._spare.terminate()
            self._spare.wait(timeout=10)
            self._spare = None
        _close(self._spare_fd)
        self._spare_fd = None
        for _, fd in self._busy:
            _close(fd)
        self._busy = []


def _replied(fd: int | None) -> bool:
    """Whether the warm task behind ``fd`` has closed it (pushed its reply, or exited)."""
    if fd is None:
        return False
    try:
        return os.read(fd, 1) == b""
    except BlockingIOError:
        return False


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _say(line: str) -> None:
    print(f"site-exec: {line}", file=sys.stderr, flush=True)


def serve(
    runtime_api_address: str,
    insecure: bool,
    root_certificates_path: str | None = None,
    parent_pid: int | None = None,
    poll_seconds: float = 0.2,
    runtime_dependency_install: bool = RUNTIME_DEPENDENCY_INSTALL,
) -> WarmClientApps:
    """Pull the SuperNode's pending ClientApp tasks and launch each (the loop of Flower's
    ``flower-superexec``, polling every ``poll_seconds``, against its 1 s default)."""
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)  # SIGINT (KeyboardInterrupt) when it exits
    executor = WarmClientApps()
    plugin = AutoExecPlugin(
        runtime_api_address=runtime_api_address,
        insecure=insecure,
        root_certificates_path=root_certificates_path,
        runtime_dependency_install=runtime_dependency_install,
        executor=executor,
    )
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    try:
        while True:
            executor.reconcile()
            reply = client.AcquireTask(
                AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
            )
            if reply.HasField("task") and reply.token:
                result = plugin.launch_task(token=reply.token, task=reply.task)
                if result.status.value != "accepted":
                    _say(f"task {reply.task.task_id} not launched: {result.message}")
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
        executor.close()
    return executor


def warm_up() -> str:
    """Import what a ClientApp's round needs, then forget fedgan's own modules (their
    libraries stay loaded), so that the task loads the app from the FAB Flower installs, as a
    fresh flwr-clientapp process would. Returns the name of the start-up clock's variable."""
    import importlib

    for name in WARM_IMPORTS:
        importlib.import_module(name)
    received_env: str = sys.modules["fedgan.federated.client_app"].TASK_RECEIVED_ENV
    for name in [m for m in sys.modules if m == "fedgan" or m.startswith("fedgan.")]:
        del sys.modules[name]
    return received_env


def _worker() -> None:
    """A warm process: import, wait for one task's token on stdin, run it with Flower's
    ``run_clientapp``, exit."""
    received_env = warm_up()
    line = sys.stdin.readline()
    if not line.strip():
        return  # the launcher closed: no task for this process
    job = json.loads(line)
    os.environ[received_env] = repr(time.time())
    from flwr.supernode.runtime import run_clientapp as runtime

    _tell_when_replied(runtime)
    runtime.run_clientapp(
        runtime_api_address=job["runtime_api_address"],
        token=job["token"],
        insecure=job["insecure"],
        certificates=validate_and_resolve_root_certificates(
            job["root_certificates_path"], job["insecure"]
        ),
        parent_pid=job["parent_pid"],
        runtime_dependency_install=job["runtime_dependency_install"],
    )


def _tell_when_replied(runtime: ModuleType) -> None:
    """Close the launcher's "replied" descriptor once Flower's ``run_clientapp`` has pushed
    the reply (it calls its module's ``push_message`` once), so the next warm process can
    start while this one exits. Where the descriptor is absent, or the module has no
    ``push_message``, the launcher learns it when the process exits, as before."""
    fd = os.environ.pop(REPLIED_FD_ENV, None)
    if fd is None or not fd.isdigit():
        return
    os.set_inheritable(int(fd), False)
    push = getattr(runtime, "push_message", None)
    if push is None:
        return

    open_fd = [int(fd)]

    def push_then_tell(*args: object, **kwargs: object) -> object:
        try:
            return push(*args, **kwargs)
        finally:
            while open_fd:  # once: a second close could hit a descriptor reused since
                _close(open_fd.pop())

    runtime.push_message = push_then_tell  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094")
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--poll-seconds", type=float, default=0.2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker()
        return
    if args.insecure == (args.root_certificates is not None):
        parser.error("give exactly one of --insecure and --root-certificates")
    serve(
        args.runtime_api_address,
        args.insecure,
        args.root_certificates,
        args.parent_pid,
        args.poll_seconds,
    )


if __name__ == "__main__":
    main()
