"""Round bookkeeping shared by the federated server and the centralized baseline: resume,
checkpoints, sample grids, ``metrics.jsonl`` and ``summary.json``. The evaluator is passed in:
bookkeeping sits above training and evaluation, and neither knows it."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedgan.config import Config, dump_yaml
from fedgan.evaluation.metrics import LOWER, direction
from fedgan.experiment import check_resume
from fedgan.models import mean_state, pack_state
from fedgan.report import plot_metrics
from fedgan.rundir import RunDir, UnreadableCheckpoint, best_entry
from fedgan.runs.background import BackgroundEvaluator, EvaluatorDied
from fedgan.runs.evaluators import Evaluator, make_evaluator
from fedgan.runs.records import RoundRecord
from fedgan.runs.warm import describe as describe_warm_start
from fedgan.runs.warm import warm_start
from fedgan.training import make_objective, networks_for, settle

#: Evaluations that may be owed before a round waits for the oldest (they cost no memory:
#: the evaluation process reads each round's weights from its checkpoint).
MAX_PENDING = 16


@dataclass
class _Pending:
    """A trained round whose line of ``metrics.jsonl`` is not written yet."""

    line: dict[str, Any]  # the round's record, without its evaluation
    checkpoint: Path
    awaiting: bool  # its evaluation is still in the evaluation process


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
        self.warm_start: dict[str, Any] = {}
        self._tb: Any = None
        self.skipped: dict[str, str] = {}  # what the evaluation process skipped
        self.pending: deque[_Pending] = deque()
        self.background: BackgroundEvaluator | None = None
        self.best: dict[str, Any] | None = None  # the round eval.select chose so far
        # the own weights of the last rounds, whose mean a round releases (eval.average_rounds)
        self.window: deque[tuple[int, dict[str, torch.Tensor]]] = deque()
        self._background_wanted = (
            evaluator is None
            and cfg.eval.background
            and bool(cfg.eval.metric_list or cfg.eval.final_metric_list)
        )

    def start(self) -> dict[str, torch.Tensor]:
        """Prepares the directory and returns the networks to start from.

        A fresh run writes ``config.yaml`` and round-0 weights; with ``run.resume`` the latest
        checkpoint is loaded and ``start_round`` set to its round.

        Raises:
            FileExistsError: If the directory already holds a run and ``run.resume`` is false.
            ValueError: If ``run.resume`` continues a run with other settings than it was
                trained with (:func:`fedgan.experiment.check_resume`).
        """
        state = self._start()
        if self.cfg.eval.select:  # a resumed run's choice, from the lines it kept
            self.best = self.run_dir.best_round(self.cfg.eval.select, self._select_higher())
            self.run_dir.write_best(self.best)
        if self._background_wanted:
            self.background = BackgroundEvaluator(self.cfg, self.run_dir.samples)
        self._check_disk()
        self.last_tick = time.perf_counter()
        return state

    def _check_disk(self) -> None:
        """One line of warning when the checkpoints still to come will not fit on the disk
        that holds them (the run goes on: a full disk stops it resumably, losing no round)."""
        import shutil

        latest = self.run_dir.latest_checkpoint_path()
        if latest is None:
            return
        rounds = max(self.cfg.federation.num_rounds - self.start_round, 0)
        keep = self.cfg.run.keep_checkpoints
        kept = rounds if keep == 0 else min(rounds, max(keep, self.cfg.eval.average_rounds) + 2)
        each = latest.stat().st_size * (2 if self.cfg.eval.average_rounds > 1 else 1)
        need, free = kept * each, shutil.disk_usage(latest.parent).free
        if need > free:
            advice = ("set run.keep_checkpoints=2 (or more) to keep only the newest rounds', "
                      "or free space" if keep == 0 else "free space")  # fmt: skip
            self.log(
                f"warning: the {rounds} round(s) to come write about {need / 1e6:,.0f} MB of "
                f"checkpoints ({each / 1e6:.1f} MB each) and the disk holding "
                f"{self.run_dir.checkpoints} has {free / 1e6:,.0f} MB free: {advice}; if it "
                "fills, the run stops and continues with --set run.resume=true"
            )

    def _start(self) -> dict[str, torch.Tensor]:
        rd = self.run_dir
        if self.cfg.run.resume:
            if not rd.has_run():
                raise FileNotFoundError(
                    f"run.resume=true but {str(rd.path)!r} holds no run to continue; check "
                    "run.name and run.output_dir, or drop run.resume to start a new run"
                )
            check_resume(self.cfg, settle)  # before anything is written
            ckpt, passed = rd.load_resumable()
            for why in passed:
                self.log(f"{why}; falling back to an older checkpoint")
            self.start_round = int(ckpt["round"])
            self.resumed_meta = dict(ckpt.get("meta", {}))
            rd.truncate_metrics_after(self.start_round)  # rounds after it are trained again
            self._complete_lines(self.start_round)
            self.log(f"resuming {rd.path} from round {self.start_round}")
            # the same settings (check_resume), with this machine's paths and the rounds asked
            rd.write_config(dump_yaml(settle(self.cfg, self.objective)))
            own = ckpt.get("train_state", ckpt["state"])
            self._refill_window(own)
            if self.cfg.model.init_from:  # the run goes on even if the source is gone
                try:
                    self.warm_start = describe_warm_start(self.cfg)
                except FileNotFoundError:
                    self.warm_start = {"checkpoint": self.cfg.model.init_from,
                                       "data": "unknown (no longer on disk)"}  # fmt: skip
                self.warm_start.update(self._warm_start_eval_kept())
            return own  # type: ignore[no-any-return]
        if rd.has_run():
            raise FileExistsError(
                f"run directory {str(rd.path)!r} already holds a run; set run.resume=true to "
                "continue it, or choose another run.name"
            )
        nets = networks_for(self.cfg, self.objective)
        state = pack_state(nets)
        if self.cfg.model.init_from:  # checked before anything is written
            state, self.warm_start = warm_start(self.cfg, state)
            self.log(f"warm start from {self.warm_start['checkpoint']} "
                     f"({self.warm_start['data']})")  # fmt: skip
        rd.write_config(dump_yaml(settle(self.cfg, self.objective)))
        self.evaluator.sample_grid(0, state)
        if self.warm_start:
            self.warm_start["eval"] = self._evaluate_warm_start(state)
        warm = {"warm_start": self.warm_start} if self.warm_start else {}
        rd.save_checkpoint(0, state, {"mode": self.mode, **warm})
        return state

    def _refill_window(self, own: dict[str, torch.Tensor]) -> None:
        """A resumed run's averaging window: the own weights of the rounds before the one it
        resumes from that the next release averages, read from their checkpoints (a missing
        or unreadable one is left out and said), then that round's."""
        size = self.cfg.eval.average_rounds
        if size == 1 or self.start_round == 0:
            return
        lost = []
        for round_ in range(max(1, self.start_round - size + 2), self.start_round):
            path = self.run_dir.checkpoints / f"round_{round_:04d}.pt"
            try:
                ckpt = self.run_dir.load_checkpoint(path)
            except (FileNotFoundError, UnreadableCheckpoint):
                lost.append(round_)
                continue
            self.window.append((round_, ckpt.get("train_state", ckpt["state"])))
        self.window.append((self.start_round, own))
        if lost:
            self.log(f"eval.average_rounds: rounds {lost} have no readable checkpoint; the "
                     "next releases average the rounds that do")  # fmt: skip

    def _release(self, round_: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What round ``round_`` releases: its own weights, or with ``eval.average_rounds``
        the mean of the last rounds' (see :class:`fedgan.config.EvalSection`)."""
        if self.cfg.eval.average_rounds == 1:
            return state
        self.window.append((round_, {k: v.detach().cpu().clone() for k, v in state.items()}))
        while self.window[0][0] <= round_ - self.cfg.eval.average_rounds:
            self.window.popleft()  # by round number: a round lost to a crash is not replaced
        return mean_state([own for _, own in self.window])

    def _evaluate_warm_start(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """``eval.metrics`` of the warm-start networks before any round trains: what the
        public data alone give, beside which the run's own rounds are judged. A metric that
        fails is left out (and said), as in a round's evaluation; the run goes on."""
        names = list(self.cfg.eval.metric_list)
        if not names:
            return {}
        try:
            out = self.evaluator.metrics(0, state, names)
        except Exception as err:  # an evaluation never ends a run
            self.log(f"warm start: not evaluated ({type(err).__name__}: "
                     f"{str(err).splitlines()[0][:160] if str(err) else ''})")  # fmt: skip
            return {}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in out.items() if not k.startswith("seconds_"))
        self.log(f"warm start alone (round 0, before any training): {shown or 'nothing computed'}")
        return out

    def _warm_start_eval_kept(self) -> dict[str, Any]:
        """A resumed run's warm-start evaluation, from its round-0 checkpoint (none where that
        is gone or unreadable)."""
        first = self.run_dir.checkpoints / "round_0000.pt"
        try:
            meta = self.run_dir.load_checkpoint(first).get("meta", {})
        except (FileNotFoundError, UnreadableCheckpoint):
            return {}
        kept = meta.get("warm_start", {}).get("eval")
        return {"eval": kept} if isinstance(kept, dict) else {}

    def due(self, round_: int) -> bool:
        last = round_ == self.cfg.federation.num_rounds
        return last or round_ % self.cfg.eval.every == 0

    def end_round(
        self,
        record: RoundRecord,
        state: dict[str, torch.Tensor],
        meta: dict[str, Any] | None = None,
    ) -> RoundRecord:
        """Commits one trained round: first its checkpoint (with ``meta``, e.g. privacy
        accountants, and the round's record), then its evaluation when due, then its line of
        ``metrics.jsonl``.

        With ``eval.background`` the evaluation runs in the evaluation process while the next
        rounds train, and the line is written once it is back; lines are written in round
        order, and at most ``MAX_PENDING`` evaluations are owed before this call waits for the
        oldest. A crash loses no trained round: a resume continues from the newest checkpoint
        and first writes the lines still missing from the checkpoints' records (evaluating
        them again), so every round is recorded exactly once."""
        now = time.perf_counter()
        round_ = record.round
        record.round_seconds = now - self.last_tick
        self.last_tick = now
        line = record.to_json()
        released = self._release(round_, state)
        averaged = {}
        if released is not state:
            averaged = {"average_of_rounds": [r for r, _ in self.window]}
        own = {"train_state": state} if averaged else {}
        path = self.run_dir.save_checkpoint(
            round_, released, {"mode": self.mode, **(meta or {}), **averaged, "record": line}, **own
        )
        due = self.due(round_)
        if due and self.background is not None:
            self.background.submit(round_, path, final=self.final(round_))
        elif due:
            line.update(self._evaluate(round_, released))
        self.pending.append(_Pending(line, path, due and "eval" not in line))
        agg = record.aggregate
        self.log(
            f"[{self.mode}] round {round_}/{self.cfg.federation.num_rounds}  "
            f"d_loss={agg.get('d_loss', float('nan')):.3f}  "
            f"g_loss={agg.get('g_loss', float('nan')):.3f}  "
            + (
                f"n_D={agg['critic_steps']} D-acc(fake)={agg['critic_accuracy']:.2f}  "
                if "critic_steps" in agg
                else ""
            )
            + f"{record.round_seconds:.1f}s  -> {self.run_dir.path}"
        )
        self._commit(block=False)
        while sum(p.awaiting for p in self.pending) > MAX_PENDING:
            self._commit(block=True, upto=1)
        record.eval = line.get("eval")
        return record

    def final(self, round_: int) -> bool:
        return round_ == self.cfg.federation.num_rounds

    def _evaluate(self, round_: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The evaluation keys of a round's line, computed here."""
        t0 = time.perf_counter()
        out = self.evaluator.evaluate(round_, state, final=self.final(round_))
        return {"eval": out, "eval_seconds": time.perf_counter() - t0}

    def _complete_lines(self, upto: int) -> None:
        """Writes the lines of rounds up to ``upto`` that have a checkpoint but no line (a run
        that stopped while their evaluation was owed), from the checkpoints' records."""
        rd = self.run_dir
        written = max((int(r.get("round", 0)) for r in rd.read_metrics()), default=0)
        for round_ in range(written + 1, upto + 1):
            path = rd.checkpoints / f"round_{round_:04d}.pt"
            try:
                ckpt = rd.load_checkpoint(path)
            except (FileNotFoundError, UnreadableCheckpoint) as err:
                self.log(f"round {round_}: no line can be written ({err})")
                continue
            line = ckpt.get("meta", {}).get("record")
            if not isinstance(line, dict):
                continue
            if self.due(round_):
                line.update(self._evaluate(round_, ckpt["state"]))
            self._write(line)
            self.log(f"round {round_}: its line of metrics.jsonl written from its checkpoint")

    def _commit(self, *, block: bool, upto: int | None = None) -> None:
        """Writes pending lines in order: all whose evaluation is back (waiting for them if
        ``block``), at most ``upto`` of them."""
        committed = 0
        while self.pending and (upto is None or committed < upto):
            head = self.pending[0]
            if head.awaiting and not self._collect(head, block=block):
                return
            self.pending.popleft()
            self._write(head.line)
            committed += 1

    def _collect(self, pending: _Pending, *, block: bool) -> bool:
        """Fills ``pending``'s evaluation from the evaluation process; False if not ready.

        A process that died is replaced by evaluation here, on the server, from then on."""
        round_ = int(pending.line["round"])
        assert self.background is not None
        try:
            got = self.background.result(round_, block=block)
        except EvaluatorDied as died:
            self.log(f"{died}; evaluating on the server from round {round_} on "
                     "(set eval.background=false to always do so)")  # fmt: skip
            self.background.close(timeout=0)
            self.background = None
            for later in self.pending:
                if later.awaiting:
                    state = self.run_dir.load_checkpoint(later.checkpoint)["state"]
                    later.line.update(self._evaluate(int(later.line["round"]), state))
                    later.awaiting = False
            return True
        if got is None:
            return False
        if got.error is not None:
            raise RuntimeError(f"round {round_}: evaluation failed: {got.error}")
        pending.line.update({"eval": got.eval, "eval_seconds": got.seconds})
        self.skipped.update(got.skipped)
        pending.awaiting = False
        return True

    def _select_higher(self) -> bool:
        return direction(self.cfg.eval.select) != LOWER

    def _choose(self, line: dict[str, Any]) -> None:
        """Points ``checkpoints/best`` at this round if its ``eval.select`` figure is the
        best so far (written after the round's line, so the pointer never names a round
        that ``metrics.jsonl`` lacks)."""
        key = self.cfg.eval.select
        value = (line.get("eval") or {}).get(key)
        if not key or not isinstance(value, (int, float)):
            return
        old = None if self.best is None else self.best["value"]
        if old is None or (value > old if self._select_higher() else value < old):
            self.best = best_entry(int(line["round"]), key, float(value))
            self.run_dir.write_best(self.best)

    def _write(self, line: dict[str, Any]) -> None:
        """One round's line, then the plots."""
        self.run_dir.append_metrics(line)
        self._choose(line)
        self._prune(int(line["round"]))
        if line.get("eval") is not None:
            plot_metrics(
                self.run_dir.read_metrics(),
                self.run_dir.path / "metrics.png",
                title=f"{self.cfg.run.name} ({self.mode})",
            )
            self._tensorboard(int(line["round"]), line)

    def _prune(self, written: int) -> None:
        """Deletes the checkpoints ``run.keep_checkpoints`` lets go (see
        :class:`fedgan.config.RunSection`): never round 0, the chosen round, a round whose
        line is still owed (the evaluation process reads it; a crash writes the line from it),
        the round a resumed run started from until the run has written as many of its own
        (newer files may be the torn ones it passed over), or one of the newest kept.
        ``written``: the round whose line was just written."""
        keep = self.cfg.run.keep_checkpoints
        if keep == 0:
            return
        keep = max(keep, self.cfg.eval.average_rounds)
        owed = {int(p.line["round"]) for p in self.pending}
        chosen = {int(b["round"]) for b in (self.best, self.run_dir.read_best()) if b}
        start = {self.start_round} if written - self.start_round < keep else set()
        self.run_dir.prune_checkpoints(keep, protect={0, *start, *owed, *chosen})

    def flush(self) -> None:
        """Commits every pending round (waiting for its evaluation) and stops the evaluation
        process. Also called when a run ends early, so every whole round is kept."""
        owed = sum(p.awaiting for p in self.pending)
        if owed:
            self.log(f"[{self.mode}] waiting for the evaluation of {owed} round(s) still "
                     "running in the evaluation process")  # fmt: skip
        try:
            self._commit(block=True)
        finally:
            if self.background is not None:
                self.background.close()
                self.background = None

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

    def _selected(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """The chosen round (``checkpoints/best``) with its whole evaluation."""
        assert self.best is not None
        round_ = self.best["round"]
        line = next(r for r in records if r.get("round") == round_ and r.get("mode") == self.mode)
        return {**self.best, "eval": line.get("eval", {})}

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Writes ``summary.json`` from the metrics so far."""
        self.flush()
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
            "metrics_skipped": {**self.skipped, **self.evaluator.skipped},
            **({"warm_start": self.warm_start} if self.warm_start else {}),
            **({"selected": self._selected(records)} if self.best else {}),
            **(extra or {}),
        }
        self.run_dir.write_summary(summary)
        self.log(f"[{self.mode}] done: results in {self.run_dir.path}")
        return summary
