"""The run directory every run leaves behind, written so that a crash never loses or corrupts it.

Layout::

    runs/<name>/config.yaml          resolved config
    runs/<name>/metrics.jsonl        one JSON object per round (append-only)
    runs/<name>/checkpoints/round_<k>.pt, latest   global networks; ``latest`` names the newest
    runs/<name>/checkpoints/best     the round ``eval.select`` chose (where it is set)
    runs/<name>/samples/round_<k>.png              fixed-noise sample grids
    runs/<name>/summary.json
"""

from __future__ import annotations

import json
import math
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


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, so that the JSON
    written is strict (``json.loads`` elsewhere, ``jq``, browsers all read it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return strict_json(value.item())
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``value`` (see :func:`strict_json`)."""
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)


def atomic_save_image(images: Any, path: Path, **kwargs: Any) -> Path:
    """``torchvision.utils.save_image`` written atomically (a crash leaves the old picture or
    the new one, never half a PNG)."""
    import io

    from torchvision.utils import save_image

    buf = io.BytesIO()
    save_image(images, buf, format="png", **kwargs)
    atomic_write_bytes(path, buf.getvalue())
    return path


def best_entry(round_: int, key: str, value: float) -> dict[str, Any]:
    """What ``checkpoints/best`` holds for a round chosen by ``key`` at ``value``."""
    return {"checkpoint": f"round_{round_:04d}.pt", "round": round_, "key": key, "value": value}


def _spans(numbers: list[int]) -> str:
    """Sorted integers as runs: [0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    parts: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that exists but cannot be loaded (truncated, corrupt, not fedgan's)."""


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
        """Appends one strict-JSON line and syncs it to disk. A line torn by an earlier crash
        is closed first, so it never swallows this one (readers skip it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        line = dumps(record, sort_keys=False, default=float) + "\n"
        with self.metrics_path.open("a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = "\n" + line
            fh.write(line.encode("utf-8"))
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
        atomic_write_text(self.metrics_path, "".join(dumps(r) + "\n" for r in kept))

    def save_checkpoint(
        self,
        round_: int,
        state: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        train_state: Mapping[str, torch.Tensor] | None = None,
    ) -> Path:
        """Saves the global networks of ``round_`` atomically and points ``latest`` at them.

        ``state`` is what the round releases; ``train_state``, where it differs (an average
        of rounds, ``eval.average_rounds``), the round's own weights that training resumes
        from."""
        import io

        import torch  # here, so that reading a run directory never loads torch

        buf = io.BytesIO()
        ckpt = {"round": round_, "state": dict(state), "meta": dict(meta)}
        if train_state is not None:
            ckpt["train_state"] = dict(train_state)
        torch.save(ckpt, buf)
        path = self.checkpoints / f"round_{round_:04d}.pt"
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_text(self.checkpoints / "latest", path.name + "\n")
        return path

    def checkpoint_rounds(self) -> list[int]:
        """The rounds that have a ``round_<k>.pt`` file, in order."""
        return sorted(int(p.stem.split("_")[1]) for p in self.checkpoints.glob("round_*.pt")
                      if p.stem.split("_")[1].isdigit())  # fmt: skip

    def prune_checkpoints(self, keep: int, protect: set[int]) -> list[int]:
        """Deletes ``round_<k>.pt`` files but the ``keep`` newest rounds' and those in
        ``protect`` (the file ``latest`` names is always among the newest). Returns the
        rounds deleted."""
        rounds = self.checkpoint_rounds()
        newest = set(rounds[-keep:]) if keep > 0 else set(rounds)
        pointer = self.checkpoints / "latest"
        named = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
        gone = []
        for round_ in rounds:
            path = self.checkpoints / f"round_{round_:04d}.pt"
            if round_ in newest or round_ in protect or path.name == named:
                continue
            path.unlink(missing_ok=True)
            gone.append(round_)
        return gone

    @property
    def best_pointer(self) -> Path:
        """``checkpoints/best``: the round ``eval.select`` chose, as JSON (``checkpoint``,
        ``round``, ``key``, ``value``)."""
        return self.checkpoints / "best"

    def best_round(self, key: str, higher: bool) -> dict[str, Any] | None:
        """The run's own evaluation (not ``fedgan evaluate``'s) with the best ``key``: the
        earliest on a tie; None where no evaluation holds ``key``."""
        best: dict[str, Any] | None = None
        for record in self.read_metrics():
            value = (record.get("eval") or {}).get(key)
            if record.get("mode") == "evaluate" or not isinstance(value, (int, float)):
                continue
            if best is None or (value > best["value"] if higher else value < best["value"]):
                best = best_entry(int(record["round"]), key, float(value))
        return best

    def write_best(self, best: Mapping[str, Any] | None) -> None:
        """Points ``checkpoints/best`` at ``best`` (from :meth:`best_round`); None removes it."""
        if best is None:
            self.best_pointer.unlink(missing_ok=True)
        else:
            atomic_write_text(self.best_pointer, dumps(dict(best)) + "\n")

    def read_best(self) -> dict[str, Any] | None:
        """What ``checkpoints/best`` says, where it exists and names a checkpoint that does."""
        try:
            best = json.loads(self.best_pointer.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(best, dict):
            return None
        if not (self.checkpoints / str(best.get("checkpoint"))).is_file():
            return None
        return best

    def latest_checkpoint_path(self) -> Path | None:
        """The newest checkpoint file: the one ``latest`` names, else the highest round."""
        candidates = self.checkpoint_candidates()
        return candidates[0] if candidates else None

    def checkpoint_candidates(self) -> list[Path]:
        """Checkpoint files, newest first: the one ``latest`` names (if it exists), then every
        ``round_<k>.pt`` from the highest round down."""
        rounds = sorted(self.checkpoints.glob("round_*.pt"), reverse=True)
        pointer = self.checkpoints / "latest"
        if pointer.exists():
            named = self.checkpoints / pointer.read_text(encoding="utf-8").strip()
            if named.exists():
                rounds = [named, *(p for p in rounds if p != named)]
        return rounds

    def has_run(self) -> bool:
        """Whether this directory holds a run (a checkpoint or metrics)."""
        return bool(self.checkpoint_candidates()) or self.metrics_path.exists()

    def checkpoint_path(self, name: str | Path | None = None) -> Path:
        """The checkpoint file a user names: None or ``latest`` (the newest), ``best`` (the
        round ``eval.select`` chose), a round number (``12``), a file of the run's
        ``checkpoints/`` (``round_0012.pt``) or any path to a checkpoint file.

        Raises:
            FileNotFoundError: If there is no such checkpoint; the message lists the rounds
                the run has.
        """
        if name is None or str(name) == "latest":
            latest = self.latest_checkpoint_path()
            if latest is None:
                raise FileNotFoundError(
                    f"no checkpoint in {self.checkpoints}; has the run started?"
                )
            return latest
        text = str(name)
        if text == "best":
            best = self.read_best()
            if best is not None:
                return self.checkpoints / str(best["checkpoint"])
        elif Path(text).is_file():
            return Path(text)
        elif text.isdigit():
            candidate = self.checkpoints / f"round_{int(text):04d}.pt"
            if candidate.is_file():
                return candidate
        elif (self.checkpoints / text).is_file() and Path(text).name == text:
            return self.checkpoints / text
        rounds = self.checkpoint_rounds()
        if text == "best":
            why = "the run has no round chosen by eval.select"
        else:
            why = f"checkpoint {text!r} does not exist"
        has = f"rounds {_spans(rounds)}" if rounds else "no checkpoint yet"
        raise FileNotFoundError(
            f"{why}; {str(self.path)!r} has {has}: pass --checkpoint with a round number, latest, "
            "or a checkpoint file"
        )

    def load_checkpoint(self, path: str | Path | None = None) -> dict[str, Any]:
        """Loads a checkpoint (the latest when ``path`` is None; any name
        :meth:`checkpoint_path` takes).

        Raises:
            FileNotFoundError: If there is none (or ``path`` does not exist).
            UnreadableCheckpoint: If the file cannot be loaded; the message names it.
        """
        path = self.checkpoint_path(path)
        import torch

        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several kinds for truncated or foreign files
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UnreadableCheckpoint(
                f"checkpoint {str(path)!r} is unreadable ({reason[:120]}): truncated or not a "
                "fedgan checkpoint"
            ) from None
        if not isinstance(ckpt, dict) or not {"round", "state"} <= set(ckpt):
            raise UnreadableCheckpoint(f"{str(path)!r} is not a fedgan checkpoint")
        return ckpt

    def load_resumable(self) -> tuple[dict[str, Any], list[str]]:
        """The newest checkpoint that loads, and why each newer one was passed over.

        Raises:
            FileNotFoundError: If there is no checkpoint at all.
            UnreadableCheckpoint: If none of them loads.
        """
        passed: list[str] = []
        for path in self.checkpoint_candidates():
            try:
                return self.load_checkpoint(path), passed
            except UnreadableCheckpoint as err:
                passed.append(str(err))
        if not passed:
            raise FileNotFoundError(f"no checkpoint in {self.checkpoints}; has the run started?")
        raise UnreadableCheckpoint(
            f"no readable checkpoint in {self.checkpoints}: {'; '.join(passed)}"
        )

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_text(self.summary_path, dumps(summary, indent=2, default=float) + "\n")
