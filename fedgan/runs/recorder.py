"""Round bookkeeping shared by the federated server and the centralized baseline: resume,
checkpoints, sample grids, ``metrics.jsonl`` and ``summary.json``. The evaluator is passed in:
bookkeeping sits above training and evaluation, and neither knows it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedgan.config import Config, dump_yaml
from fedgan.evaluation import CentralEvaluator, PairedEvaluator
from fedgan.models import ImageShape, pack_state
from fedgan.report import plot_metrics
from fedgan.rundir import RunDir
from fedgan.runs.records import RoundRecord
from fedgan.training import Objective, make_objective, networks_for

Evaluator = CentralEvaluator | PairedEvaluator


def make_evaluator(cfg: Config, samples_dir: Path, objective: Objective | None = None) -> Evaluator:
    """The central evaluator of ``cfg``'s task: generated-image metrics for an objective that
    generates from noise, paired metrics against its classical baselines for an image-to-image
    one."""
    objective = objective or make_objective(cfg)
    if objective.paired:
        return PairedEvaluator(cfg, samples_dir, objective)  # type: ignore[arg-type]
    return CentralEvaluator(cfg, ImageShape(cfg.data.channels, cfg.data.image_size), samples_dir)


class RunRecorder:
    """Owns one run directory for the length of a run.

    Args:
        cfg: The resolved config; its ``run_dir`` is used.
        mode: ``"federated"`` or ``"centralized"`` (written to every record).
        evaluator: The central evaluator (``make_evaluator``'s by default).
        log: Progress printer (one line per round).
    """

    def __init__(
        self,
        cfg: Config,
        mode: str,
        evaluator: Evaluator | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg = cfg
        self.mode = mode
        self.log = log
        self.run_dir = RunDir(cfg.run_dir)
        self.objective = make_objective(cfg)
        self.evaluator = evaluator or make_evaluator(cfg, self.run_dir.samples, self.objective)
        self.started = time.time()
        self.last_tick = time.perf_counter()
        self.start_round = 0
        self.resumed_meta: dict[str, Any] = {}
        self._tb: Any = None

    def start(self) -> dict[str, torch.Tensor]:
        """Prepares the directory and returns the networks to start from.

        A fresh run writes ``config.yaml`` and round-0 weights; with ``run.resume`` the latest
        checkpoint is loaded and ``start_round`` set to its round.

        Raises:
            FileExistsError: If the directory already holds a run and ``run.resume`` is false.
        """
        rd = self.run_dir
        if self.cfg.run.resume:
            if not rd.has_run():
                raise FileNotFoundError(
                    f"run.resume=true but {str(rd.path)!r} holds no run to continue; check "
                    "run.name and run.output_dir, or drop run.resume to start a new run"
                )
            ckpt, passed = rd.load_resumable()
            for why in passed:
                self.log(f"{why}; falling back to an older checkpoint")
            self.start_round = int(ckpt["round"])
            self.resumed_meta = dict(ckpt.get("meta", {}))
            rd.truncate_metrics_after(self.start_round)  # rounds after it are trained again
            self.log(f"resuming {rd.path} from round {self.start_round}")
            return ckpt["state"]
        if rd.has_run():
            raise FileExistsError(
                f"run directory {str(rd.path)!r} already holds a run; set run.resume=true to "
                "continue it, or choose another run.name"
            )
        rd.write_config(dump_yaml(self.cfg))
        nets = networks_for(self.cfg, self.objective)
        state = pack_state(nets)
        self.evaluator.sample_grid(0, state)
        rd.save_checkpoint(0, state, {"mode": self.mode})
        return state

    def due(self, round_: int) -> bool:
        last = round_ == self.cfg.federation.num_rounds
        return last or round_ % self.cfg.eval.every == 0

    def end_round(
        self,
        record: RoundRecord,
        state: dict[str, torch.Tensor],
        meta: dict[str, Any] | None = None,
    ) -> RoundRecord:
        """Commits one round: its evaluation (when due) and sample grid, its line of
        ``metrics.jsonl``, then its checkpoint (with ``meta``, e.g. privacy accountants) and
        ``latest``. The checkpoint comes last: a crash before it leaves the previous round as
        the one to resume from, whose resume drops this round's line and trains it again, so
        every round is recorded exactly once."""
        now = time.perf_counter()
        round_ = record.round
        record.round_seconds = now - self.last_tick
        if self.due(round_):
            t0 = time.perf_counter()
            final = round_ == self.cfg.federation.num_rounds
            record.eval = self.evaluator.evaluate(round_, state, final=final)
            record.eval_seconds = time.perf_counter() - t0
        line = record.to_json()
        self.run_dir.append_metrics(line)
        self.run_dir.save_checkpoint(round_, state, {"mode": self.mode, **(meta or {})})
        if record.eval is not None:
            plot_metrics(
                self.run_dir.read_metrics(),
                self.run_dir.path / "metrics.png",
                title=f"{self.cfg.run.name} ({self.mode})",
            )
            self._tensorboard(round_, line)
        agg = record.aggregate
        self.log(
            f"[{self.mode}] round {round_}/{self.cfg.federation.num_rounds}  "
            f"d_loss={agg.get('d_loss', float('nan')):.3f}  "
            f"g_loss={agg.get('g_loss', float('nan')):.3f}  "
            f"{record.round_seconds:.1f}s  -> {self.run_dir.path}"
        )
        self.last_tick = time.perf_counter()
        return record

    def _tensorboard(self, round_: int, record: dict[str, Any]) -> None:
        """Scalars to TensorBoard (``<run>/tensorboard``) where it is installed."""
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb = False
                return
            self._tb = SummaryWriter(str(self.run_dir.path / "tensorboard"))
        if self._tb is False:
            return
        for key, value in {**record.get("aggregate", {}), **record.get("eval", {})}.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, round_)
        self._tb.flush()

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Writes ``summary.json`` from the metrics so far."""
        records = self.run_dir.read_metrics()
        last = records[-1] if records else {}
        summary = {
            "name": self.cfg.run.name,
            "mode": self.mode,
            "rounds": last.get("round", 0),
            "final": {"aggregate": last.get("aggregate", {}), "eval": last.get("eval", {})},
            "wall_seconds": time.time() - self.started,
            "examples_seen": sum(r.get("aggregate", {}).get("examples_seen", 0) for r in records),
            "bytes_communicated": sum(
                r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in records
            ),
            "run_dir": str(self.run_dir.path),
            "metrics_skipped": dict(self.evaluator.skipped),
            **(extra or {}),
        }
        self.run_dir.write_summary(summary)
        self.log(f"[{self.mode}] done: results in {self.run_dir.path}")
        return summary
