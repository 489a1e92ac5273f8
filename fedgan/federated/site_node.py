"""A hospital site's SuperNode: Flower's own, with its idle waits made prompt.

Flower's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps a hard-coded 3 s each
time a pull from the SuperLink finds no message, and 0.5 s between looks for the ClientApp's
reply; neither has a setting. After a site replies, its next pull comes before the server has
aggregated, finds nothing and sleeps the full 3 s, so every deployed round waits up to 3 s
that it did not need (measured: 2-3 s of a 10 s fixed cost per round). This entry point runs
Flower's ``flower-supernode`` main, with the same arguments and nothing else changed, except
that those waits last at most ``--poll`` seconds:

    python -m fedgan.federated.site_node --poll 0.5 --superlink HOST:9092 ...

A pull is one small request to the SuperLink (its answer is empty while there is no work), so
a 0.5 s poll is 2 requests a second per site. ``--poll 3`` keeps Flower's timing. The cap is
applied only where the Flower release installed has the loop this was written against (its
module calls ``time.sleep``); otherwise the SuperNode runs as Flower ships it and its log says
so in one line. ``clients/start-supernode.sh`` starts it (``SUPERNODE_POLL_S``, default 0.5).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

#: Default longest idle wait of the SuperNode's loop, in seconds (Flower's own is 3).
POLL_S = 0.5
#: The longest wait ``--poll`` accepts: Flower's own.
MAX_POLL_S = 3.0


class CappedTime:
    """The :mod:`time` module, whose :func:`sleep` lasts at most ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_idle_waits(module: ModuleType, cap: float) -> bool:
    """Makes ``module``'s ``time.sleep`` calls last at most ``cap`` seconds.

    Returns False, changing nothing, when ``module`` does not use the :mod:`time` module by
    that name (a Flower release whose loop this was not written against).
    """
    current = getattr(module, "time", None)
    if isinstance(current, CappedTime):
        current.cap = cap
        return True
    if current is not time:
        return False
    module.time = CappedTime(cap)  # type: ignore[attr-defined]
    return True


def _split_poll(argv: Sequence[str]) -> tuple[float, list[str]]:
    """``--poll S`` (or ``--poll=S``) out of ``argv``; the rest is Flower's."""
    rest: list[str] = []
    poll = POLL_S
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--poll" or arg.startswith("--poll="):
            if "=" in arg:
                value, i = arg.split("=", 1)[1], i + 1
            else:
                value, i = (args[i + 1] if i + 1 < len(args) else ""), i + 2
            try:
                poll = float(value)
            except ValueError:
                poll = -1.0
            if not 0 < poll <= MAX_POLL_S:
                print(
                    f"site_node: --poll '{value}' must be a number of seconds in "
                    f"(0, {MAX_POLL_S:g}]; pass e.g. --poll 0.5",
                    file=sys.stderr,
                )
                raise SystemExit(2)
            continue
        rest.append(arg)
        i += 1
    return poll, rest


def main(argv: Sequence[str] | None = None) -> None:
    poll, rest = _split_poll(sys.argv[1:] if argv is None else argv)
    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if cap_idle_waits(loop, poll):
        print(f"site_node: SuperNode idle waits capped at {poll:g} s", file=sys.stderr, flush=True)
    else:
        print(
            "site_node: this Flower release's SuperNode loop is not the one expected; "
            "running it unchanged (idle waits of up to 3 s)",
            file=sys.stderr,
            flush=True,
        )
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
