"""Run directory: atomic checkpoints, the latest pointer, torn metrics lines."""

from __future__ import annotations

import os

import pytest
import torch

from fedgan.rundir import RunDir, atomic_write_bytes


def test_checkpoints_and_latest(tmp_path) -> None:
    rd = RunDir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="has the run started"):
        rd.load_checkpoint()
    rd.save_checkpoint(1, {"generator.w": torch.ones(2)}, {"mode": "x"})
    rd.save_checkpoint(2, {"generator.w": torch.zeros(2)}, {"mode": "x"})
    ck = rd.load_checkpoint()
    assert ck["round"] == 2 and torch.equal(ck["state"]["generator.w"], torch.zeros(2))
    assert not [p for p in rd.checkpoints.iterdir() if p.name.endswith(".tmp")]


def test_a_checkpoint_is_named_as_a_user_would(tmp_path, monkeypatch) -> None:
    """--checkpoint takes a round number, a file of the run's checkpoints/, latest, best or a
    path; a missing one names the rounds the run has."""
    rd = RunDir(tmp_path / "run")
    for r in (1, 2, 3, 5):
        rd.save_checkpoint(r, {"generator.w": torch.full((1,), float(r))}, {})
    assert rd.load_checkpoint("2")["round"] == 2
    assert rd.load_checkpoint("round_0003.pt")["round"] == 3
    assert rd.load_checkpoint("latest")["round"] == 5
    assert rd.load_checkpoint(rd.checkpoints / "round_0001.pt")["round"] == 1
    monkeypatch.chdir(rd.checkpoints)  # a path that exists as given is that file
    assert rd.checkpoint_path("round_0002.pt").resolve() == rd.checkpoints / "round_0002.pt"
    with pytest.raises(FileNotFoundError, match=r"'4' does not exist; .* has rounds 1-3, 5: "):
        rd.load_checkpoint("4")
    with pytest.raises(FileNotFoundError, match="no round chosen by eval.select"):
        rd.load_checkpoint("best")
    rd.write_best({"checkpoint": "round_0002.pt", "round": 2, "key": "k", "value": 1.0})
    assert rd.load_checkpoint("best")["round"] == 2
    with pytest.raises(FileNotFoundError, match="'round_0004.pt' does not exist"):
        rd.load_checkpoint("round_0004.pt")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_torn_metrics_line_is_ignored_and_truncation(tmp_path) -> None:
    rd = RunDir(tmp_path)
    for r in (1, 2, 3):
        rd.append_metrics({"round": r})
    with rd.metrics_path.open("a") as fh:
        fh.write('{"round": 4, "trunc')
    assert [r["round"] for r in rd.read_metrics()] == [1, 2, 3]
    rd.truncate_metrics_after(2)
    assert [r["round"] for r in rd.read_metrics()] == [1, 2]
