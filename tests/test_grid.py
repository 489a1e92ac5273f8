"""The server's Grid polls for replies promptly, and never past the round's deadline."""

from __future__ import annotations

import time
from types import SimpleNamespace

from fedgan.federated.grid import PromptGrid


class SlowSites:
    """A stand-in Grid: message ``k`` is answered ``delays[k]`` seconds after it was pushed
    (None: never)."""

    def __init__(self, delays: list[float | None]) -> None:
        self.delays = delays
        self.pulls = 0

    def push_messages(self, messages):
        self.sent = time.monotonic()
        return [f"m{k}" for k, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.sent
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{k}"))
            for k, d in enumerate(self.delays)
            if f"m{k}" in ids and d is not None and d <= now
        ]


def test_replies_are_collected_within_one_interval_of_the_last() -> None:
    sites = SlowSites([0.1, 0.6])
    grid = PromptGrid(sites, interval=0.05)  # type: ignore[arg-type]
    t0 = time.monotonic()
    replies = list(grid.send_and_receive([object(), object()], timeout=30))
    took = time.monotonic() - t0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert 0.6 <= took < 0.6 + 0.5  # Flower's own Grid would have waited until 3 s
    assert sites.pulls >= 3


def test_a_site_that_never_replies_costs_only_the_deadline() -> None:
    sites = SlowSites([0.0, None])
    grid = PromptGrid(sites, interval=0.05)  # type: ignore[arg-type]
    t0 = time.monotonic()
    replies = list(grid.send_and_receive([object(), object()], timeout=0.4))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 0.4 <= time.monotonic() - t0 < 0.4 + 0.5
