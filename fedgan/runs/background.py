"""Evaluation beside training: a separate process that evaluates each round's global networks
while the next round trains.

The process starts with the run and prepares what every evaluation shares (the real data, the
domain feature network, the real features) at once, so none of it lands on a round. On a CPU
it runs at a low scheduling priority: it takes what training leaves idle (between waves of
hospitals, while messages travel, while the server waits) and a small share besides. It
computes exactly what the synchronous evaluator computes (same code, same seeds, same number of
threads); the recorder writes the results into the rounds' records, in round order.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedgan.config import Config
from fedgan.rundir import RunDir

logger = logging.getLogger(__name__)

#: Run first in the evaluation process, before torch starts its threads (which inherit it).
#: Linux shares the CPU fairly between sessions before it looks at nice values within one
#: (autogroups), and the simulation's hospitals run in sessions of their own: so the process
#: starts its own session (``start_new_session``) and gives that session, and its own threads,
#: nice 10 (a tenth of a normal process's weight). At 19 (a seventieth) it was starved while
#: hospitals trained and every evaluation waited for the end of the run; at 10 the default
#: job's rounds are as fast as without evaluation and the evaluations keep up
#: (``benchmarks/eval_overlap.py``). Where either is not permitted it runs at normal priority.
_LOW_PRIORITY = """import os
try:
    with open("/proc/self/autogroup", "w") as f:
        f.write("10")
except OSError:
    pass
try:
    os.nice(10)
except OSError:
    pass
"""


@dataclass
class Result:
    """One evaluation's outcome, as the process sends it back.

    Attributes:
        round: The evaluated round.
        eval: Its metrics (None if it failed).
        seconds: Wall time the evaluation took in the process.
        skipped: Every metric the evaluator skipped so far, with why.
        error: The failure's traceback's last line (None when it worked).
    """

    round: int
    eval: dict[str, float] | None
    seconds: float
    skipped: dict[str, str]
    error: str | None = None


def _serve(cfg: Config, samples_dir: str, threads: int, jobs: Any, send: Any) -> None:
    """The evaluation process: prepare, then evaluate each job until ``None`` arrives."""
    torch.set_num_threads(threads)
    from fedgan.runs.evaluators import make_evaluator

    evaluator = make_evaluator(cfg, Path(samples_dir))
    try:
        evaluator.prepare()
    except Exception:  # a metric that cannot prepare fails (and is recorded) when it runs
        logger.warning("evaluation: preparing failed; each round will try again:\n%s",
                       traceback.format_exc(limit=3))  # fmt: skip
    while True:
        job = jobs()
        if job is None:
            return
        round_, source, final = job
        t0 = time.perf_counter()
        try:
            state = source
            if isinstance(source, str):  # a checkpoint file, checked like any other load
                state = RunDir(Path(source).parent.parent).load_checkpoint(source)["state"]
            out = evaluator.evaluate(round_, state, final=final)
            send(Result(round_, out, time.perf_counter() - t0, dict(evaluator.skipped)))
        except Exception as err:
            last = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            send(Result(round_, None, time.perf_counter() - t0, dict(evaluator.skipped), last))


def exit_with_parent(parent: int, interval: float = 0.5) -> threading.Thread:
    """Ends this process (exit code 0) as soon as ``parent`` is no longer its parent.

    A server that is killed (``kill -9``, the OOM killer) closes the job pipe, but the
    process reads it only between evaluations, and a final evaluation can take minutes: it
    would go on using the CPU, and writing into the run's folder, for a run that is over.
    The kernel re-parents an orphan, so a changed ``os.getppid()`` is the signal (portable,
    unlike Linux's parent-death signal).
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(0)

    thread = threading.Thread(target=watch, daemon=True, name="fedgan-eval-parent")
    thread.start()
    return thread


def main() -> None:
    """The evaluation process (``BackgroundEvaluator`` starts it). Jobs arrive pickled on
    stdin (first the settings), results leave pickled on the original stdout; anything a
    library prints goes to stderr, so it cannot corrupt them. It ends with its parent."""
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    jobs = sys.stdin.buffer
    cfg, samples_dir, threads, parent = pickle.load(jobs)
    exit_with_parent(parent)

    def receive() -> Any:
        try:
            return pickle.load(jobs)
        except EOFError:  # the server went away
            return None

    def send(result: Result) -> None:
        pickle.dump(result, results, protocol=pickle.HIGHEST_PROTOCOL)
        results.flush()

    logging.basicConfig(level=logging.WARNING, format="evaluation: %(message)s")
    _serve(cfg, samples_dir, threads, receive, send)


class EvaluatorDied(RuntimeError):
    """The evaluation process ended without answering."""


class BackgroundEvaluator:
    """Submits evaluations to the evaluation process and collects their results.

    The process is ``python -m fedgan.runs.background``, not a fork or a multiprocessing
    spawn: it never re-runs the caller's script, and it shares no threads or locks with it.

    Args:
        cfg: The resolved config (the process builds its evaluator from it).
        samples_dir: Where the sample grids go.
        threads: Torch threads of the process (the caller's, so results match its own).
    """

    def __init__(self, cfg: Config, samples_dir: Path, threads: int | None = None) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _LOW_PRIORITY + "from fedgan.runs.background import main\nmain()",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # its own scheduling group: see _LOW_PRIORITY
        )
        self.done: dict[int, Result] = {}
        self.broken = ""
        self.outbox: queue.Queue[Any] = queue.Queue()
        self.inbox: queue.Queue[Result] = queue.Queue()
        self.outbox.put((cfg, str(samples_dir), threads or torch.get_num_threads(), os.getpid()))
        # Writing a state blocks until the process reads it: a thread writes, so rounds don't.
        self._writer = threading.Thread(target=self._write, daemon=True, name="fedgan-eval-out")
        self._reader = threading.Thread(target=self._read, daemon=True, name="fedgan-eval-in")
        self._writer.start()
        self._reader.start()

    def _write(self) -> None:
        assert self.process.stdin is not None
        try:
            while (item := self.outbox.get()) is not None:
                pickle.dump(item, self.process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self.process.stdin.flush()
            self.process.stdin.close()
        except (BrokenPipeError, OSError, ValueError):  # the process ended: result() says so
            pass

    def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            while True:
                self.inbox.put(pickle.load(self.process.stdout))
        except EOFError:  # the process ended
            pass
        except Exception as err:  # a garbled answer: the process can't be trusted any more
            self.broken = f"its answer could not be read ({type(err).__name__}: {err})"
            self.process.kill()

    def submit(self, round_: int, source: Path | dict[str, torch.Tensor], *, final: bool) -> None:
        """Queues the evaluation of the weights in ``source``: a checkpoint file, or a state
        dict (a snapshot: the caller must not change it)."""
        self.outbox.put((round_, str(source) if isinstance(source, Path) else source, final))

    def result(self, round_: int, *, block: bool) -> Result | None:
        """``round_``'s result; None if it is not ready and ``block`` is false.

        Raises:
            EvaluatorDied: If the process ended with the result still owed.
        """
        while round_ not in self.done:
            try:
                got = self.inbox.get(timeout=1.0) if block else self.inbox.get_nowait()
            except queue.Empty:
                if not self._reader.is_alive() and self.inbox.empty():
                    self.process.poll()
                    raise EvaluatorDied(
                        f"the evaluation process ended (exit code {self.process.returncode}"
                        + (f"; {self.broken}" if self.broken else "")
                        + ")"
                    ) from None
                if not block:
                    return None
                continue
            self.done[got.round] = got
        return self.done.pop(round_)

    def close(self, timeout: float = 30.0) -> None:
        """Stops the process (after the jobs already queued, for up to ``timeout`` s)."""
        self.outbox.put(None)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5.0)
        self._reader.join(5.0)
