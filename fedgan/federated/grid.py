"""The server's Grid, polling for replies promptly.

Flower's deployment Grid pulls the round's replies every 3 s (``GrpcGrid.send_and_receive``),
so on average a deployed round waits 1.5 s after its last hospital has replied, and a short
round is stretched to the next multiple of 3 s. This wrapper sends and pulls through the same
public Grid API (``push_messages``, ``pull_messages``) and polls every ``interval`` seconds;
everything else is the wrapped Grid's. A pull is one small request to the SuperLink (its reply
lists only the messages that arrived), so polling more often costs next to nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # type: ignore[attr-defined]
from flwr.serverapp import Grid
from flwr.supercore.run import Run

#: Seconds between two pulls of the round's replies.
POLL_INTERVAL = 0.2


class PromptGrid(Grid):
    """``grid``, with :meth:`send_and_receive` polling every ``interval`` seconds."""

    def __init__(self, grid: Grid, interval: float = POLL_INTERVAL) -> None:
        self.grid = grid
        self.interval = interval

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Pushes ``messages`` and pulls their replies until all are in or ``timeout`` s
        have passed (None: no limit), like Flower's, every ``interval`` seconds."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.interval)
        return replies
