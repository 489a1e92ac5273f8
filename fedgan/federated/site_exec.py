"""A hospital site's ClientApp launcher that keeps the ClientApp's libraries loaded.

Flower runs every deployed round in a fresh ClientApp process (``flwr-clientapp``, one per
message), which pays the interpreter, Flower, torch and fedgan imports (4 s on an idle 2-core
machine, 8-10 s while the other site trains) before it trains. Run the SuperNode with
``--isolation process`` and this module beside it instead of Flower's own
``flower-superexec``: it asks the SuperNode for pending ClientApp tasks, as
``flower-superexec`` does, and hands each task's token to a process that has already imported
the ClientApp's libraries. The round itself is Flower's own ``run_clientapp``: the same FAB
installation, app loading, heartbeat and reply.

    python -m fedgan.federated.site_exec --runtime-api-address 127.0.0.1:9094 --insecure \
        --parent-pid SUPERNODE_PID

Two ways, chosen when it starts:
- **fork server** (the default where ``os.fork`` exists): one process imports once, when the
  site starts, and forks a child per task, so no round waits for imports. Before it serves,
  it forks a probe that runs a convolution's forward and backward pass; if the probe hangs or
  fails (a library started threads or initialised CUDA during the imports), it says so and
  the launcher falls back to the second way.
- **one warm process per task**: a process started between rounds imports, then serves one
  token and exits; the next one starts once the task has pushed its reply.

What stays as Flower does it:
- one process per task (a forked child or a warm process serves one token and exits), so no
  state survives in memory from one round to the next, as with ``flwr-clientapp``;
- the app's own code comes from the FAB Flower installs: the warm process imports fedgan only
  to load its third-party dependencies, then forgets fedgan's modules, so ``load_app`` imports
  the FAB's copy as a fresh process would;
- a task that is not a ClientApp, one the fork server could not fork, or one that arrives when
  no warm process is alive, is launched the way ``flower-superexec`` launches it
  (``flwr-clientapp --token ...``).

``clients/start-supernode.sh`` starts it with the SuperNode (``WARM_CLIENTAPP=1``, the default)
in the SuperNode's process group, so ``stop-supernode.sh`` stops both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import IO, NoReturn

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
#: The variable naming the descriptor the fork server writes its report lines to.
ZYGOTE_FD_ENV = "FEDGAN_FORK_SERVER_FD"
#: Seconds the fork server's probe child may take before forking counts as unsafe here.
PROBE_TIMEOUT_S = 60.0

#: What a warm process imports ahead of its task: the ClientApp and a hospital's round.
WARM_IMPORTS = (
    "flwr.supernode.runtime.run_clientapp",
    "fedgan.federated.client_app",
    "fedgan.training.hospital",
    "fedgan.privacy",
    "opacus",  # imported by a private round when it starts, with scipy
)


class WarmClientApps:
    """A SuperExec executor (Flower's ``Executor`` protocol) that starts ClientApp tasks from
    processes whose libraries are already loaded; everything else is left to Flower's
    subprocess executor.

    Args:
        command: How a one-task warm process starts (it reads one task's JSON line on stdin).
        fork: Serve tasks from a fork server (``None``: wherever ``os.fork`` exists).
        fork_server_command: How the fork server starts (it reads task lines on stdin and
            reports on the descriptor named by ``FEDGAN_FORK_SERVER_FD``).
    """

    #: After this many fork-server deaths the launcher stops restarting it.
    MAX_FORK_SERVER_STARTS = 3

    def __init__(
        self,
        command: list[str] | None = None,
        fork: bool | None = None,
        fork_server_command: list[str] | None = None,
    ) -> None:
        me = [sys.executable, "-m", "fedgan.federated.site_exec"]
        self.command = command or [*me, "--worker"]
        self.fork_server_command = fork_server_command or [*me, "--fork-server"]
        self.fork = hasattr(os, "fork") if fork is None else fork
        self._cold = SubprocessExecutor()
        # One warm process per task.
        self._spare: subprocess.Popen[bytes] | None = None
        self._spare_fd: int | None = None  # closed by the spare (EOF here) once it has replied
        #: Running tasks, each with its "replied" descriptor (None: a cold one, which cannot say).
        self._busy: list[tuple[subprocess.Popen[bytes], int | None]] = []
        # The fork server.
        self._server: subprocess.Popen[bytes] | None = None
        self._server_fd: int | None = None
        self._server_buf = b""
        self._server_ready = False
        self._server_starts = 0
        #: Tasks handed to the fork server and not yet forked, by task id.
        self._pending: dict[int, ExecutionSpec] = {}
        #: Forked ClientApp processes still running, by pid: whether each has replied.
        self.forked: dict[int, bool] = {}
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
        if self.fork:
            return self._launch_forked(spec)
        spare, self._spare = self._spare, None
        fd, self._spare_fd = self._spare_fd, None
        if spare is None or spare.poll() is not None:
            _close(fd)
            if spare is None:
                return self._launch_cold(spec, "the previous round's process was still running")
            return self._launch_cold(spec, "the warm process had exited")
        try:
            stdin: IO[bytes] = spare.stdin  # type: ignore[assignment]
            stdin.write(_job_line(spec))
            stdin.close()
        except OSError:  # it died between the check and the write
            _close(fd)
            return self._launch_cold(spec, "the warm process had exited")
        self._busy.append((spare, fd))
        self.warm_launches += 1
        _say(f"task {spec.task_id}: warm ClientApp process {spare.pid}")
        return LaunchResult.accepted()

    def _launch_forked(self, spec: ExecutionSpec) -> LaunchResult:
        server = self._server
        if server is None or server.poll() is not None:
            return self._launch_cold(spec, "the fork server was not running")
        try:
            stdin: IO[bytes] = server.stdin  # type: ignore[assignment]
            stdin.write(_job_line(spec))
            stdin.flush()
        except OSError:
            return self._launch_cold(spec, "the fork server had exited")
        self._pending[spec.task_id] = spec
        self.warm_launches += 1
        state = "" if self._server_ready else " (still importing)"
        _say(f"task {spec.task_id}: handed to the fork server {server.pid}{state}")
        return LaunchResult.accepted()

    def _launch_cold(self, spec: ExecutionSpec, why: str) -> LaunchResult:
        self.cold_launches += 1
        _say(f"task {spec.task_id}: fresh ClientApp process ({why})")
        return self._cold.launch(spec)

    def reconcile(self) -> None:
        """Reap finished tasks and keep a warm process ready: the fork server (restarted if it
        died, its tasks not yet forked then launched cold), or the next one-task process."""
        if self.fork:
            self._reconcile_fork_server()
            if self.fork:
                return
        self._reconcile_spare()

    def _reconcile_fork_server(self) -> None:
        self._read_fork_server()
        server = self._server
        if server is not None and server.poll() is not None:
            self._read_fork_server()  # its last words
            _say(f"the fork server {server.pid} exited with {server.returncode}")
            self._drop_fork_server()
            if self._server_starts >= self.MAX_FORK_SERVER_STARTS:
                self._fall_back(f"it exited {self._server_starts} times")
        if self.fork and self._server is None:
            # Any CUDA check during the imports must not stop a child from using CUDA.
            self._server, self._server_fd = _start_with_pipe(
                self.fork_server_command, ZYGOTE_FD_ENV, PYTORCH_NVML_BASED_CUDA_CHECK="1"
            )
            self._server_starts += 1

    def _read_fork_server(self) -> None:
        if self._server_fd is None:
            return
        try:
            while chunk := os.read(self._server_fd, 65536):
                self._server_buf += chunk
        except BlockingIOError:
            pass
        *lines, self._server_buf = self._server_buf.split(b"\n")
        for raw in lines:
            self._on_report(raw.decode(errors="replace").split(" ", 2))

    def _on_report(self, words: list[str]) -> None:
        kind, args = words[0], words[1:]
        if kind == "ready":
            self._server_ready = True
            _say(f"fork server {self._server.pid if self._server else '?'} ready")
        elif kind == "forked":
            self._pending.pop(int(args[0]), None)
            self.forked[int(args[1])] = False
            _say(f"task {args[0]}: ClientApp process {args[1]} forked")
        elif kind == "replied":
            self.forked[int(args[0])] = True
        elif kind == "exited":
            self.forked.pop(int(args[0]), None)
            if args[1] != "0":
                _say(f"ClientApp process {args[0]} exited with {args[1]} (its error is above)")
        elif kind == "failed":
            spec = self._pending.pop(int(args[0]), None)
            if spec is not None:
                self._launch_cold(spec, f"the fork server could not fork: {' '.join(args[1:])}")
        elif kind == "nofork":
            self._fall_back(" ".join(args))

    def _fall_back(self, why: str) -> None:
        _say(f"not forking ClientApps on this site ({why}): one warm process per task instead")
        self.fork = False
        self._drop_fork_server()

    def _drop_fork_server(self) -> None:
        """Stop the fork server (if alive) and launch the tasks it had not forked cold."""
        if self._server is not None:
            _stop(self._server)
        self._server = None
        _close(self._server_fd)
        self._server_fd, self._server_buf, self._server_ready = None, b"", False
        pending, self._pending = self._pending, {}
        for spec in pending.values():
            self._launch_cold(spec, "the fork server exited before forking it")

    def _reconcile_spare(self) -> None:
        """Start the next one-task process once no task is still training, so its imports use
        the time between rounds (the reply's transfer, the server's aggregation) rather than
        the cores a round trains on. Started beside the running round instead, it made a 30 s
        round 5 s slower on two cores (``benchmarks/deployment.py``). A task counts as done
        once it has pushed its reply (it closes its descriptor): its process may take another
        second to exit, and by then the next round's task can be here."""
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
            self._spare, self._spare_fd = _start_with_pipe(self.command, REPLIED_FD_ENV)

    def close(self) -> None:
        """Stop the waiting processes; running tasks finish on their own."""
        if self._spare is not None:
            _stop(self._spare)
            self._spare = None
        _close(self._spare_fd)
        self._spare_fd = None
        for _, fd in self._busy:
            _close(fd)
        self._busy = []
        if self._server is not None:
            _stop(self._server)
        self._server = None
        _close(self._server_fd)
        self._server_fd = None


def _start_with_pipe(
    command: list[str], fd_env: str, **env: str
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``command`` with a pipe to its stdin and the write end of a second pipe, named in
    its environment as ``fd_env``; returns the process and the (non-blocking) read end."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    try:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            pass_fds=(write,),
            env={**os.environ, fd_env: str(write), **env},
        )
    except BaseException:
        os.close(read)
        raise
    finally:
        os.close(write)
    return proc, read


def _job_line(spec: ExecutionSpec) -> bytes:
    job = {
        "task_id": spec.task_id,
        "handed_at": time.time(),
        "runtime_api_address": spec.runtime_api_address,
        "token": spec.token,
        "insecure": spec.insecure,
        "root_certificates_path": spec.root_certificates_path,
        "parent_pid": spec.parent_pid,
        "runtime_dependency_install": spec.runtime_dependency_install,
    }
    return (json.dumps(job) + "\n").encode()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


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


def _start_clock(job: dict[str, object], received_env: str) -> None:
    """The task's start-up is counted from the launcher's hand-off (see ``client_app``)."""
    os.environ[received_env] = repr(job.get("handed_at") or time.time())


def _run_task(job: dict[str, object], tell: Callable[[], None]) -> None:
    """Run one task with Flower's ``run_clientapp``, ``tell`` called once the reply is pushed."""
    from flwr.supernode.runtime import run_clientapp as runtime

    _on_reply(runtime, tell)
    insecure = bool(job["insecure"])
    runtime.run_clientapp(
        runtime_api_address=str(job["runtime_api_address"]),
        token=str(job["token"]),
        insecure=insecure,
        certificates=validate_and_resolve_root_certificates(
            job["root_certificates_path"],  # type: ignore[arg-type]
            insecure,
        ),
        parent_pid=job["parent_pid"],  # type: ignore[arg-type]
        runtime_dependency_install=bool(job["runtime_dependency_install"]),
    )


def _worker() -> None:
    """A one-task warm process: import, wait for one task's line on stdin, run it, exit."""
    received_env = warm_up()
    line = sys.stdin.readline()
    if not line.strip():
        return  # the launcher closed: no task for this process
    job = json.loads(line)
    _start_clock(job, received_env)
    _run_task(job, _replied_closer())


def _replied_closer() -> Callable[[], None]:
    """What a one-task process calls once it has replied: close the launcher's "replied"
    descriptor (named in the environment, then removed from it so the task's own children do
    not get it), once. Without one, the launcher learns it at the process's exit."""
    fd = os.environ.pop(REPLIED_FD_ENV, None)
    replied = [int(fd)] if fd is not None and fd.isdigit() else []
    for each in replied:
        os.set_inheritable(each, False)

    def close_once() -> None:
        while replied:  # once: a second close could hit a descriptor reused since
            _close(replied.pop())

    return close_once


def _on_reply(runtime: ModuleType, tell: Callable[[], None]) -> None:
    """Call ``tell`` once Flower's ``run_clientapp`` has pushed the reply (it calls its module's
    ``push_message`` once), so the launcher knows the round's work is done while the process
    exits. Where the module has no ``push_message``, the launcher learns it at the exit."""
    push = getattr(runtime, "push_message", None)
    if push is None:
        return

    def push_then_tell(*args: object, **kwargs: object) -> object:
        try:
            return push(*args, **kwargs)
        finally:
            tell()

    runtime.push_message = push_then_tell  # type: ignore[attr-defined]


def _report(fd: int, line: str) -> None:
    """One report line to the launcher (one write, under the pipe's atomic size)."""
    with contextlib.suppress(OSError):
        os.write(fd, (line + "\n").encode())


def fork_probe(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Fork once and run a convolution's forward and backward pass in the child. Returns why
    a forked ClientApp could not train here (CUDA initialised before the fork, or a library's
    threads or locks that hang or break a forked child), or None when it can."""
    import torch

    if torch.cuda.is_initialized():
        return "CUDA was initialised while importing"
    pid = os.fork()
    if pid == 0:  # the probe child
        code = 3
        try:
            bad_fork = getattr(torch.cuda, "_is_in_bad_fork", lambda: False)
            if bad_fork():
                code = 4
            else:
                conv = torch.nn.Conv2d(1, 8, 3)
                conv(torch.randn(16, 1, 32, 32)).square().mean().backward()
                code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            if code == 0:
                return None
            if code == 4:
                return "a forked process could not use CUDA"
            return f"a forked process failed to run torch (exit {code})"
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return f"a forked process hung in torch for {timeout:.0f} s"


def _fork_server() -> None:
    """The fork server: import once, check that a forked child can train, then fork one
    child per task line on stdin, reporting "ready", "forked TASK PID", "replied PID",
    "exited PID CODE", "failed TASK WHY" or "nofork WHY" on its report descriptor. It never
    runs torch itself: a process that has run torch's thread pool cannot fork safely."""
    out = int(os.environ.pop(ZYGOTE_FD_ENV))
    received_env = warm_up()
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)  # the tasks check CUDA as usual
    why = fork_probe()
    if why is not None:
        _report(out, f"nofork {why}")
        return
    _report(out, "ready")
    buf = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.2)
        _reap(out)
        if not readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            return  # the launcher is gone or closing; running tasks finish on their own
        *lines, buf = (buf + chunk).split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            job = json.loads(line)
            try:
                pid = os.fork()
            except OSError as exc:
                _report(out, f"failed {job['task_id']} {exc}")
                continue
            if pid == 0:
                _forked_task(job, received_env, out)
            _report(out, f"forked {job['task_id']} {pid}")


def _reap(out: int) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _report(out, f"exited {pid} {os.waitstatus_to_exitcode(status)}")


def _forked_task(job: dict[str, object], received_env: str, out: int) -> NoReturn:
    """A forked child: run the task, then leave with its exit code without returning into
    the fork server's loop (nor running the fork server's exit handlers)."""
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the launcher's task pipe is the fork server's, not the task's
        os.close(devnull)
        if "numpy" in sys.modules:  # a fresh process seeds numpy's global generator anew
            sys.modules["numpy"].random.seed()
        me = os.getpid()
        told = [False]

        def tell() -> None:
            if not told[0]:
                told[0] = True
                _report(out, f"replied {me}")

        _start_clock(job, received_env)
        _run_task(job, tell)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # reported; the exit code says it failed
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094")
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--poll-seconds", type=float, default=0.2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fork-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker()
        return
    if args.fork_server:
        _fork_server()
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
