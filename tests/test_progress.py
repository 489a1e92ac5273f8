"""Progress bars: drawn with rich on a terminal, silent in logs, never losing an item."""

from __future__ import annotations

import pytest

from fedgan import progress


def test_track_is_silent_and_complete_outside_a_terminal(capsys: pytest.CaptureFixture) -> None:
    assert list(progress.track(range(5), "counting")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""


def test_track_draws_a_bar_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(progress, "interactive", lambda: True)
    assert list(progress.track(iter(range(3)), "Inception features", total=3)) == [0, 1, 2]
    assert "Inception features" in capsys.readouterr().err
