"""Stops a run's Flower processes when the process that started them dies without cleaning up.

``fedgan simulate`` stops its SuperLink, the SuperLink's children and ``flwr run`` on every
exit it sees (:func:`fedgan.federated.launcher.stop_process`), but a SIGKILL (the out-of-memory
killer, a batch scheduler, a test's timeout) gives it no chance: the SuperLink ignores the loss
of its parent and keeps serving, ``flwr run`` keeps retrying, and both hold the run's database
and ports. This watchdog is started beside them, in a session of its own, and outlives the
launcher: once a second it notes the launcher's descendants that carry this run's
``FLWR_HOME``; when the launcher is gone it stops those (SIGTERM, then SIGKILL after a grace
period) and every process they started, and exits. While the launcher lives it does nothing.

Run as a script (``python watchdog.py PARENT_PID FLWR_HOME``): it imports nothing of fedgan, so
it starts in a fraction of a second and keeps no model code in memory.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import suppress

import psutil

POLL_S = 1.0
GRACE_S = 10.0


def run_processes(parent: psutil.Process, flwr_home: str) -> list[psutil.Process]:
    """``parent``'s descendants whose environment carries ``FLWR_HOME=flwr_home``."""
    out = []
    for p in parent.children(recursive=True):
        if p.pid == os.getpid():
            continue
        with suppress(psutil.Error):
            if p.environ().get("FLWR_HOME") == flwr_home:
                out.append(p)
    return out


def stop(processes: list[psutil.Process], grace: float = GRACE_S) -> None:
    """SIGTERM to ``processes`` and all their descendants, SIGKILL to those still alive after
    ``grace`` seconds. psutil refuses to signal a pid that has since been reused."""
    tree: dict[int, psutil.Process] = {}
    for p in processes:
        with suppress(psutil.Error):
            for q in [p, *p.children(recursive=True)]:
                tree[q.pid] = q
    for p in tree.values():
        with suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(list(tree.values()), timeout=grace)
    for p in alive:
        with suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch(parent_pid: int, flwr_home: str, poll: float = POLL_S) -> None:
    """Watches ``parent_pid`` until it dies, then stops the run's processes it left."""
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, psutil.Process] = {}
    while _alive(parent):
        with suppress(psutil.Error):
            for p in run_processes(parent, flwr_home):
                seen.setdefault(p.pid, p)
        seen = {pid: p for pid, p in seen.items() if p.is_running()}
        time.sleep(poll)
    stop(list(seen.values()))


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
