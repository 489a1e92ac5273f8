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
