"""The run directory every run leaves behind, written so that a crash never loses or corrupts it.

Layout::

    runs/<name>/config.yaml          resolved config
    runs/<name>/metrics.jsonl        one JSON object per round (append-only)
    runs/<name>/checkpoints/round_<k>.pt, latest   global networks; ``latest`` names the newest
    runs/<name>/samples/round_<k>.png              fixed-noise sample grids
    runs/<name>/summary.json
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see the old file or the new one, never a
    partial one (temporary file in the same folder, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class RunDir:
    """Reads and writes one run's directory.

    Args:
        path: The run directory (created on first write).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.config_path, yaml_text)

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Appends one JSON line and syncs it to disk."""
        self.path.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=False, default=float) + "\n"
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl`` (a torn last line from a crash is ignored)."""
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_metrics_after(self, last_round: int) -> None:
        """Drops records of rounds after ``last_round`` (a resumed run redoes them)."""
        kept = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def save_checkpoint(
        self, round_: int, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
    ) -> Path:
        """Saves the global networks of ``round_`` atomically and points ``latest`` at them."""
        import io

        import torch  # here, so that reading a run directory never loads torch

        buf = io.BytesIO()
        torch.save({"round": round_, "state": dict(state), "meta": dict(meta)}, buf)
        path = self.checkpoints / f"round_{round_:04d}.pt"
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_text(self.checkpoints / "latest", path.name + "\n")
        return path

    def latest_checkpoint_path(self) -> Path | None:
        pointer = self.checkpoints / "latest"
        if not pointer.exists():
            return None
        path = self.checkpoints / pointer.read_text(encoding="utf-8").strip()
        return path if path.exists() else None

    def load_checkpoint(self, path: str | Path | None = None) -> dict[str, Any]:
        """Loads a checkpoint (the latest when ``path`` is None).

        Raises:
            FileNotFoundError: If there is none.
        """
        path = Path(path) if path is not None else self.latest_checkpoint_path()
        if path is None or not path.exists():
            raise FileNotFoundError(f"no checkpoint in {self.checkpoints}; has the run started?")
        import torch

        return torch.load(path, map_location="cpu", weights_only=True)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2, default=float) + "\n")
