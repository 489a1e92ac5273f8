"""Evaluation beside training: the evaluation process records exactly what evaluating in line
records, keeps rounds in order, and a lost process costs no metric."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedgan.config import Config, with_changes
from fedgan.experiment import resolve
from fedgan.models import pack_state
from fedgan.rundir import RunDir
from fedgan.runs import RoundRecord, RunRecorder, make_evaluator
from fedgan.runs.background import BackgroundEvaluator
from fedgan.runs.centralized import train_centralized
from fedgan.training import networks_for


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _values(evaluation: dict) -> dict:
    """An evaluation without its timings (the only keys that may differ)."""
    return {k: v for k, v in evaluation.items() if not k.startswith("seconds_")}


def _states(cfg: Config, n: int) -> list[dict[str, torch.Tensor]]:
    states = []
    for seed in range(n):
        nets = networks_for(with_changes(cfg, run={"seed": seed}))
        states.append(pack_state(nets))
    return states


def test_background_evaluation_equals_evaluation_in_line(toy_config: Config, tmp_path: Path):
    cfg = resolve(with_changes(toy_config, eval={"cache_dir": str(tmp_path / "cache")}))
    states = _states(cfg, 2)
    in_line = make_evaluator(cfg, tmp_path / "a")
    expected = [in_line.evaluate(i + 1, s, final=i == 1) for i, s in enumerate(states)]
    background = BackgroundEvaluator(cfg, tmp_path / "b")
    try:
        for i, state in enumerate(states):
            background.submit(i + 1, state, final=i == 1)
        got = [background.result(i + 1, block=True) for i in range(2)]
    finally:
        background.close()
    assert all(g is not None and g.error is None for g in got)
    assert expected[0] != expected[1]  # two generators, two evaluations: a real comparison
    for want, result in zip(expected, got, strict=True):
        assert result is not None and result.eval is not None
        assert _values(result.eval) == _values(want)  # bit for bit: same code, seeds, threads
    assert got[1].skipped == in_line.skipped  # e.g. tstr_auc, which needs a cgan
    assert (tmp_path / "b" / "round_0002.png").exists()


def test_a_run_records_the_same_metrics_with_and_without_background(
    toy_config: Config, tmp_path: Path
):
    base = with_changes(toy_config, eval={"cache_dir": str(tmp_path / "cache")},
                        federation={"num_rounds": 3})  # fmt: skip
    runs = {}
    for background in (True, False):
        cfg = resolve(with_changes(base, run={"name": f"bg_{background}"},
                                   eval={"background": background}))  # fmt: skip
        summary = train_centralized(cfg, log=lambda line: None)
        runs[background] = _metrics(cfg.run_dir)
        assert summary["rounds"] == 3
    assert [r["round"] for r in runs[True]] == [1, 2, 3]
    for a, b in zip(runs[True], runs[False], strict=True):
        assert _values(a["eval"]) == _values(b["eval"])
        timed = {"train_seconds": a["aggregate"]["train_seconds"]}
        assert a["aggregate"] == {**b["aggregate"], **timed}


def test_a_lost_evaluation_process_costs_no_metric(toy_config: Config, tmp_path: Path):
    cfg = resolve(with_changes(toy_config, eval={"cache_dir": str(tmp_path / "cache")},
                               federation={"num_rounds": 3}))  # fmt: skip
    lines: list[str] = []
    recorder = RunRecorder(cfg, "centralized", log=lines.append)
    state = recorder.start()
    assert recorder.background is not None
    recorder.background.process.kill()
    recorder.background.process.wait()
    for round_ in (1, 2, 3):
        record = RoundRecord.centralized(round_, num_examples=1, examples_seen=1, d_loss=0.0,
                                         g_loss=0.0, train_seconds=0.0)  # fmt: skip
        recorder.end_round(record, state)
    recorder.finish()
    records = _metrics(cfg.run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all("domain_fd_1k" in r["eval"] for r in records)
    assert any("evaluation process ended" in line and "evaluating on the server" in line
               for line in lines)  # fmt: skip
    assert RunDir(cfg.run_dir).latest_checkpoint_path().name == "round_0003.pt"


def test_a_failed_run_keeps_the_rounds_it_trained(toy_config: Config, tmp_path: Path):
    cfg = resolve(with_changes(toy_config, eval={"cache_dir": str(tmp_path / "cache")},
                               federation={"num_rounds": 5}))  # fmt: skip
    recorder = RunRecorder(cfg, "centralized", log=lambda line: None)
    state = recorder.start()
    for round_ in (1, 2):
        record = RoundRecord.centralized(round_, num_examples=1, examples_seen=1, d_loss=0.0,
                                         g_loss=0.0, train_seconds=0.0)  # fmt: skip
        recorder.end_round(record, state)
    recorder.flush()  # what the ServerApp and the centralized loop do on the way out
    assert [r["round"] for r in _metrics(cfg.run_dir)] == [1, 2]
    assert all("eval" in r for r in _metrics(cfg.run_dir))
    assert recorder.background is None and not recorder.pending


def test_a_resume_writes_the_lines_a_crash_left_owed(toy_config: Config, tmp_path: Path):
    """A run that stops with evaluations owed keeps its checkpoints; the resume writes the
    missing lines from them, with the evaluation in-line evaluation gives."""
    cfg = resolve(with_changes(toy_config, eval={"cache_dir": str(tmp_path / "cache")},
                               federation={"num_rounds": 4}))  # fmt: skip
    recorder = RunRecorder(cfg, "centralized", log=lambda line: None)
    state = recorder.start()
    states = _states(cfg, 3)
    for round_, s in zip((1, 2, 3), states, strict=True):
        record = RoundRecord.centralized(round_, num_examples=1, examples_seen=round_,
                                         d_loss=0.0, g_loss=0.0, train_seconds=0.0)  # fmt: skip
        recorder.end_round(record, s)
    assert recorder.background is not None
    recorder.background.process.kill()  # the server dies with the evaluations owed
    recorder.background.process.wait()
    written = (
        [r["round"] for r in _metrics(cfg.run_dir)]
        if (cfg.run_dir / "metrics.jsonl").exists()
        else []
    )
    assert written != [1, 2, 3]  # something was owed (else the test checks nothing)
    lines: list[str] = []
    resumed = RunRecorder(with_changes(cfg, run={"resume": True}), "centralized", log=lines.append)
    resumed.start()
    resumed.flush()
    assert resumed.start_round == 3
    records = _metrics(cfg.run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert [r["aggregate"]["examples_seen"] for r in records] == [1, 2, 3]
    in_line = make_evaluator(cfg, tmp_path / "x")
    for r, s in zip(records, states, strict=True):
        assert _values(r["eval"]) == _values(in_line.evaluate(r["round"], s, final=False))
    del state


def _gone(pid: int) -> bool:
    """True once ``pid`` has ended (a zombie nobody reaped counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_evaluation_process_ends_when_its_server_is_killed(tmp_path: Path):
    """A server killed mid-evaluation (kill -9) must not leave its evaluation process running
    on: the process watches its parent, not only the job pipe it reads between jobs."""
    import signal
    import subprocess
    import sys
    import time

    busy = (  # the server's pid comes as an argument, as it comes with the job settings
        "import sys, time\n"
        "from fedgan.runs.background import exit_with_parent\n"
        "exit_with_parent(int(sys.argv[1]), interval=0.1)\n"
        "print('watching', flush=True)\n"
        "time.sleep(120)\n"  # an evaluation that would outlive the server
    )
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "import os\n"
            f"c = subprocess.Popen([sys.executable, '-c', {busy!r}, str(os.getpid())],"
            " stdout=subprocess.PIPE, text=True)\n"
            "print(c.pid, flush=True)\n"
            "print(c.stdout.readline().strip(), flush=True)\n"
            "time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    child = int(server.stdout.readline())
    assert server.stdout.readline().strip() == "watching"
    time.sleep(0.5)
    assert not _gone(child)  # it runs while its server does
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    deadline = time.monotonic() + 15
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child), "the evaluation process outlived its killed server"
