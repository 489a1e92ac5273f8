"""Faults lose nothing: a round is committed as one unit, resume falls back past unreadable
checkpoints, every file a run writes is whole and strict JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedgan.config import Config, with_changes
from fedgan.rundir import RunDir, UnreadableCheckpoint
from fedgan.runs.centralized import train_centralized


def _run(cfg: Config, **changes) -> dict:
    return train_centralized(with_changes(cfg, **changes) if changes else cfg, log=lambda _: None)


class Crash(Exception):
    pass


def test_a_crash_while_a_checkpoint_is_written_repeats_no_round(
    toy_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = with_changes(toy_config, federation={"num_rounds": 3})
    real_save = RunDir.save_checkpoint

    def crash_at_round_2(self, round_, state, meta):  # type: ignore[no-untyped-def]
        if round_ == 2:
            raise Crash("power cut")
        return real_save(self, round_, state, meta)

    monkeypatch.setattr(RunDir, "save_checkpoint", crash_at_round_2)
    with pytest.raises(Crash):
        _run(cfg)
    rd = RunDir(cfg.run_dir)
    # The checkpoint comes first, the line after it: round 2 left neither.
    assert [r["round"] for r in rd.read_metrics()] == [1]
    assert rd.load_checkpoint()["round"] == 1
    monkeypatch.setattr(RunDir, "save_checkpoint", real_save)
    summary = _run(cfg, run={"resume": True})
    records = rd.read_metrics()
    assert [r["round"] for r in records] == [1, 2, 3]  # round 2 trained again, recorded once
    per_round = records[0]["aggregate"]["examples_seen"]
    assert summary["examples_seen"] == 3 * per_round
    assert all((rd.samples / f"round_{k:04d}.png").stat().st_size > 0 for k in (1, 2, 3))


def test_resume_falls_back_past_a_truncated_or_missing_checkpoint(toy_config: Config) -> None:
    cfg = with_changes(toy_config, federation={"num_rounds": 2})
    _run(cfg)
    rd = RunDir(cfg.run_dir)
    latest = rd.latest_checkpoint_path()
    assert latest is not None and latest.name == "round_0002.pt"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated by a crash or a full disk
    with pytest.raises(UnreadableCheckpoint, match="round_0002.pt.*unreadable"):
        rd.load_checkpoint()
    lines: list[str] = []
    more = with_changes(cfg, run={"resume": True}, federation={"num_rounds": 3})
    train_centralized(more, log=lines.append)
    assert any("round_0002.pt" in line and "falling back" in line for line in lines)
    assert any("from round 1" in line for line in lines)
    assert [r["round"] for r in rd.read_metrics()] == [1, 2, 3]
    # the pointer's file deleted: the highest round left is used
    (rd.checkpoints / "round_0003.pt").unlink()
    assert rd.load_resumable()[0]["round"] == 2


def test_resuming_a_run_that_does_not_exist_is_an_error(toy_config: Config) -> None:
    with pytest.raises(FileNotFoundError, match="holds no run to continue.*run.name"):
        _run(toy_config, run={"resume": True, "name": "typo"})
    assert not (Path(toy_config.run.output_dir) / "typo").exists()


def test_a_resume_with_other_settings_is_refused_and_more_rounds_are_recorded(
    toy_config: Config,
) -> None:
    """A resume may train a run further and find its data elsewhere; another seed, budget or
    model would make its config.yaml lie about its figures, so it is refused before anything
    is written."""
    from fedgan.config import load_config

    cfg = with_changes(toy_config, federation={"num_rounds": 1})
    _run(cfg)
    rd = RunDir(cfg.run_dir)
    files = {p: p.stat().st_mtime_ns for p in rd.path.rglob("*") if p.is_file()}
    for changes, says in (
        ({"run": {"resume": True, "seed": 7}}, "run.seed 0 -> 7"),
        ({"run": {"resume": True}, "train": {"lr_d": 0.05}}, "train.lr_d"),
    ):
        with pytest.raises(ValueError, match=f"run.resume: .*other settings \\({says}"):
            _run(cfg, **changes)
    assert {p: p.stat().st_mtime_ns for p in rd.path.rglob("*") if p.is_file()} == files
    _run(cfg, run={"resume": True, "output_dir": str(Path(cfg.run.output_dir).resolve())},
         federation={"num_rounds": 2})  # fmt: skip
    assert [r["round"] for r in rd.read_metrics()] == [1, 2]
    assert load_config(rd.config_path).federation.num_rounds == 2  # says what made round 2


def test_a_run_records_what_its_default_rules_gave_and_a_changed_rule_is_refused_on_resume(
    toy_config: Config,
) -> None:
    """A setting left to a default rule (``train.n_critic: 0``, ``critic_schedule: auto``) is
    recorded as the value the rule gave. A later fedgan whose rule gives another value would
    otherwise continue the run on other settings than its config.yaml names, silently: here
    an earlier rule's value stands in for that, and the resume is refused naming it."""
    import yaml

    from fedgan.config import load_config

    cfg = with_changes(toy_config, federation={"num_rounds": 1})
    assert cfg.train.n_critic == 0 and cfg.train.critic_schedule == "auto"
    _run(cfg)
    rd = RunDir(cfg.run_dir)
    recorded = load_config(rd.config_path).train
    assert (recorded.n_critic, recorded.critic_schedule) == (1, "fixed")  # dcgan's, no DP
    _run(cfg, run={"resume": True}, federation={"num_rounds": 2})  # same rules: goes on
    assert [r["round"] for r in rd.read_metrics()] == [1, 2]
    text = yaml.safe_load(rd.config_path.read_text())
    text["train"]["n_critic"] = 2  # what an earlier rule gave
    rd.config_path.write_text(yaml.safe_dump(text, sort_keys=False))
    with pytest.raises(ValueError, match=r"other settings \(train.n_critic 2 -> 1\)"):
        _run(cfg, run={"resume": True}, federation={"num_rounds": 3})
    assert [r["round"] for r in rd.read_metrics()] == [1, 2]


def test_settling_a_private_config_gives_the_embedding_rule_and_changes_nothing_twice(
    toy_config: Config,
) -> None:
    from fedgan.config import dump_yaml, load_config
    from fedgan.experiment import resolve
    from fedgan.training import settle
    from fedgan.training.embedding import embedding_noise

    private = with_changes(toy_config, privacy={"mode": "dp-sgd", "target_epsilon": 10.0})
    settled = settle(private)
    t = settled.train
    assert (t.embedding_weight, t.critic_schedule, t.n_critic) == (5.0, "adaptive", 3)
    assert t.critic_ceiling == pytest.approx(0.65)  # the threshold 0.6 + 0.05
    assert settle(toy_config).train.critic_ceiling == 0.0  # fixed n_D: no schedule to step
    assert (t.critic_max, settle(toy_config).train.critic_max) == (10, 0)  # the cap: likewise
    assert t.embedding_bandwidth == pytest.approx(0.15 * 16)  # 0.15 x sqrt(1 x 16 x 16)
    assert settled.privacy.embedding_noise == embedding_noise(private) == pytest.approx(2.0)
    assert settle(settled) == settled
    path = Path(toy_config.run.output_dir) / "settled.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(settled))
    assert settle(resolve(load_config(path))) == settled  # a recorded config reads back


def test_no_readable_checkpoint_is_an_error_naming_them(toy_config: Config) -> None:
    _run(with_changes(toy_config, federation={"num_rounds": 1}))
    rd = RunDir(toy_config.run_dir)
    for path in rd.checkpoint_candidates():
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(UnreadableCheckpoint, match="no readable checkpoint.*round_0001.pt"):
        rd.load_resumable()


def test_a_torn_metrics_line_never_swallows_the_next(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "r")
    rd.append_metrics({"round": 1, "x": 1.0})
    with rd.metrics_path.open("a") as fh:
        fh.write('{"round": 2, "x": ')  # a crash mid-write
    rd.append_metrics({"round": 2, "x": 2.0})
    assert [r["round"] for r in rd.read_metrics()] == [1, 2]


def test_run_files_are_strict_json(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "r")
    rd.append_metrics({"round": 1, "aggregate": {"d_loss": float("nan"), "g": float("inf")}})
    rd.write_summary({"final": {"eval": {"fid": float("nan")}}, "rounds": 1})
    strict = {"NaN": None, "Infinity": None, "-Infinity": None}

    def load(text: str):  # refuses the non-standard constants Python would accept
        return json.loads(text, parse_constant=lambda c: strict[c] or pytest.fail(c))

    assert load(rd.metrics_path.read_text().strip())["aggregate"]["d_loss"] is None
    assert load(rd.summary_path.read_text())["final"]["eval"]["fid"] is None


class _Scripted:
    """An evaluator that returns set validation figures (the recorder's choice is tested, not
    a detector)."""

    def __init__(self, values: dict[int, float]) -> None:
        self.values = values
        self.skipped: dict[str, str] = {}

    def sample_grid(self, round_: int, state: dict) -> None:
        return None

    def evaluate(self, round_: int, state: dict, *, final: bool = False) -> dict[str, float]:
        return {"anomaly_val_auc": self.values[round_], "anomaly_auc": -float(round_)}


def _train_scripted(recorder: object, rounds: range) -> None:
    """Rounds of nothing through a real recorder: what it keeps and chooses is tested."""
    from fedgan.runs import RoundRecord, RunRecorder

    assert isinstance(recorder, RunRecorder)
    state = recorder.start()
    for round_ in rounds:
        record = RoundRecord.centralized(round_, num_examples=1, examples_seen=1,
                                         d_loss=0.0, g_loss=0.0, train_seconds=0.0)  # fmt: skip
        recorder.end_round(record, state)
    recorder.finish()


def test_the_round_chosen_on_validation_survives_a_resume(toy_config: Config) -> None:
    from fedgan.experiment import resolve
    from fedgan.runs import RunRecorder

    cfg = resolve(with_changes(toy_config, task={"name": "anomaly"},
                               data={"train_label": 0}, federation={"num_rounds": 4},
                               eval={"select": "anomaly_val_auc"}))  # fmt: skip
    values = {1: 0.6, 2: 0.7, 3: 0.9, 4: 0.9}
    train = _train_scripted

    train(RunRecorder(cfg, "centralized", _Scripted(values), log=lambda _: None), range(1, 5))
    rd = RunDir(cfg.run_dir)
    assert rd.read_best() == {
        "checkpoint": "round_0003.pt",
        "round": 3,
        "key": "anomaly_val_auc",
        "value": 0.9,
    }  # earliest of the tie
    summary = json.loads(rd.summary_path.read_text())
    assert summary["selected"]["round"] == 3 and summary["selected"]["eval"]["anomaly_auc"] == -3
    # rounds 3 and 4 are lost (their checkpoints unreadable): the resume redoes them, and the
    # pointer never names a round the run no longer has
    for k in (3, 4):
        (rd.checkpoints / f"round_{k:04d}.pt").write_bytes(b"torn")
    values.update({3: 0.65, 4: 0.8})
    resumed = RunRecorder(with_changes(cfg, run={"resume": True}), "centralized",
                          _Scripted(values), log=lambda _: None)  # fmt: skip
    resumed.start()
    assert resumed.start_round == 2 and rd.read_best() is not None
    assert rd.read_best()["round"] == 2  # chosen again from the lines kept
    rd.best_pointer.unlink()
    train(RunRecorder(with_changes(cfg, run={"resume": True}), "centralized",
                      _Scripted(values), log=lambda _: None), range(3, 5))  # fmt: skip
    assert rd.read_best()["round"] == 4 and rd.read_best()["value"] == 0.8
    assert [r["round"] for r in rd.read_metrics()] == [1, 2, 3, 4]
    # a pointer that names no checkpoint is not believed
    (rd.checkpoints / "round_0004.pt").unlink()
    assert rd.read_best() is None


def _set(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _saved_run(tmp_path: Path, toy_overrides: list[str], server: dict) -> tuple[list[str], Path]:
    """A run directory holding round 2's checkpoint with ``server`` as its server state."""
    base = [f"run.output_dir={tmp_path}", "run.name=r", *toy_overrides]
    rd = RunDir(tmp_path / "r")
    rd.save_checkpoint(2, {"w": torch.zeros(1)}, {"server": server})
    return base, rd.path


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_resuming_with_another_server_optimizer_is_refused_in_one_line(
    tmp_path: Path, toy_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from fedgan.cli import main
    from fedgan.federated.server_opt import ServerOptimizer

    momentum = ServerOptimizer("momentum", lr=1.0, momentum=0.9)
    momentum.t = {"w": 2}
    momentum.m = {"w": np.ones(1)}
    base, run = _saved_run(tmp_path, toy_overrides, {"server_optimizer": momentum.state_dict()})
    before = _files(run)
    rc = main(["simulate", *_set(*base, "federation.strategy=fedadam", "run.resume=true",
                                 "federation.num_rounds=4")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "federation.strategy" in err[0] and "'momentum'" in err[0]
    assert _files(run) == before  # nothing started, nothing written


def test_resuming_a_spent_central_budget_is_refused_in_one_line(
    tmp_path: Path, toy_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from fedgan.cli import main
    from fedgan.config import load_config
    from fedgan.federated.central_dp import (
        GaussianPrivacyEvent,
        central_accountant,
        releases_state,
    )

    central = ["privacy.mode=central-dp", "privacy.target_epsilon=2", "privacy.max_grad_norm=1",
               "federation.num_hospitals=3"]  # fmt: skip
    cfg = load_config(None, [*toy_overrides, *central])
    acc = central_accountant(cfg.privacy, 3)
    acc.compose(GaussianPrivacyEvent(0.3, 3, 3), count=4)  # far past epsilon 2
    base, run = _saved_run(tmp_path, toy_overrides, {"central_releases": releases_state(acc)})
    before = _files(run)
    rc = main(["simulate", *_set(*base, *central, "run.resume=true", "federation.num_rounds=6")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "already spent" in err[0] and "4 earlier rounds" in err[0]
    assert _files(run) == before


class _Seen(_Scripted):
    """Keeps the weights each evaluation was given."""

    def __init__(self) -> None:
        super().__init__({})
        self.states: dict[int, dict] = {}

    def evaluate(self, round_: int, state: dict, *, final: bool = False) -> dict[str, float]:
        self.states[round_] = state
        return {}


def test_a_round_releases_the_mean_of_the_last_rounds_and_resumes_from_its_own(
    toy_config: Config,
) -> None:
    """``eval.average_rounds=3``: round r's checkpoint ``state`` (what is evaluated and
    released) is the mean of rounds max(1, r-2)..r's own weights, its ``train_state`` the
    round's own; a resume trains on from the own weights and refills the window from the
    checkpoints, leaving out (and saying) one it cannot read."""
    from fedgan.experiment import resolve
    from fedgan.runs import RoundRecord, RunRecorder

    with pytest.raises(ValueError, match="eval.average_rounds"):
        with_changes(toy_config, eval={"average_rounds": 0})
    cfg = resolve(with_changes(toy_config, federation={"num_rounds": 5},
                               eval={"average_rounds": 3}))  # fmt: skip

    def own(start: dict, r: float) -> dict:
        return {k: torch.full_like(v, r) if v.is_floating_point() else v for k, v in start.items()}

    def rounds(recorder: RunRecorder, which: range, seen: _Seen) -> dict:
        start = recorder.start()
        for r in which:
            record = RoundRecord.centralized(r, num_examples=1, examples_seen=1, d_loss=0.0,
                                             g_loss=0.0, train_seconds=0.0)  # fmt: skip
            recorder.end_round(record, own(start, r))
        recorder.finish()
        return start

    def level(state: dict) -> set[float]:
        return {round(float(v.flatten()[0]), 6) for v in state.values() if v.is_floating_point()}

    seen = _Seen()
    rounds(RunRecorder(cfg, "centralized", seen, log=lambda _: None), range(1, 4), seen)
    rd = RunDir(cfg.run_dir)
    for r, mean, window in ((1, 1.0, [1]), (2, 1.5, [1, 2]), (3, 2.0, [1, 2, 3])):
        ckpt = rd.load_checkpoint(rd.checkpoints / f"round_{r:04d}.pt")
        assert level(seen.states[r]) == level(ckpt["state"]) == {mean}
        assert level(ckpt["train_state"]) == {float(r)}
        assert ckpt["meta"]["average_of_rounds"] == window

    (rd.checkpoints / "round_0002.pt").write_bytes(b"torn")
    lines: list[str] = []
    seen = _Seen()
    resumed = RunRecorder(with_changes(cfg, run={"resume": True}), "centralized", seen,
                          log=lines.append)  # fmt: skip
    start = rounds(resumed, range(4, 6), seen)
    assert level(start) == {3.0}  # the round's own weights, not its release (2.0)
    assert any("rounds [2]" in line and "eval.average_rounds" in line for line in lines)
    assert level(seen.states[4]) == {3.5}  # rounds 3 and 4: round 2 is unreadable
    assert level(seen.states[5]) == {4.0}  # rounds 3, 4 and 5
    assert level(rd.load_checkpoint()["train_state"]) == {5.0}


def test_pruning_keeps_the_newest_rounds_the_protected_and_the_latest(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "r")
    for k in range(7):
        rd.save_checkpoint(k, {"w": torch.zeros(1)}, {})
    (rd.checkpoints / "latest").write_text("round_0003.pt\n")  # a pointer behind the files
    assert rd.prune_checkpoints(2, protect={0, 1}) == [2, 4]
    assert [p.name for p in sorted(rd.checkpoints.glob("round_*.pt"))] == [
        "round_0000.pt", "round_0001.pt", "round_0003.pt", "round_0005.pt", "round_0006.pt"
    ]  # fmt: skip
    assert rd.prune_checkpoints(2, protect=set()) == [0, 1]
    assert rd.load_checkpoint()["round"] == 3


def test_a_run_keeps_its_newest_checkpoints_the_start_and_the_chosen_round(
    toy_config: Config,
) -> None:
    from fedgan.experiment import resolve
    from fedgan.runs import RunRecorder

    cfg = resolve(with_changes(toy_config, task={"name": "anomaly"}, data={"train_label": 0},
                               federation={"num_rounds": 6}, run={"keep_checkpoints": 2},
                               eval={"select": "anomaly_val_auc"}))  # fmt: skip
    values = {1: 0.6, 2: 0.9, 3: 0.7, 4: 0.5, 5: 0.6, 6: 0.65, 7: 0.95, 8: 0.5}

    def train(config: Config, rounds: range) -> None:
        recorder = RunRecorder(config, "centralized", _Scripted(values), log=lambda _: None)
        _train_scripted(recorder, rounds)

    rd = RunDir(cfg.run_dir)

    def kept() -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in rd.checkpoints.glob("round_*.pt"))

    train(cfg, range(1, 7))
    assert kept() == [0, 2, 5, 6]  # the start, the chosen round, the two newest
    assert rd.read_best()["round"] == 2 and rd.load_checkpoint("best")["round"] == 2
    assert [r["round"] for r in rd.read_metrics()] == [1, 2, 3, 4, 5, 6]  # every line stays
    # a resume with more rounds goes on from round 6; round 2 is let go once 7 is chosen
    more = with_changes(cfg, run={"resume": True}, federation={"num_rounds": 8})
    train(more, range(7, 9))
    assert kept() == [0, 7, 8] and rd.read_best()["round"] == 7
    # a resume that passed over torn newer files keeps the round it started from until its
    # own rounds replace them: a second crash still has a whole checkpoint to go back to
    for k in (7, 8):
        (rd.checkpoints / f"round_{k:04d}.pt").write_bytes(b"torn")
    rd.save_checkpoint(6, rd.load_checkpoint(rd.checkpoints / "round_0000.pt")["state"], {})
    (rd.checkpoints / "latest").write_text("round_0008.pt\n")  # the pointer names a torn one
    torn = with_changes(cfg, run={"resume": True}, federation={"num_rounds": 9})
    recorder = RunRecorder(torn, "centralized", _Scripted(values), log=lambda _: None)
    recorder.start()
    assert recorder.start_round == 6 and kept() == [0, 6, 7, 8]
    recorder._prune(6)  # what writing a line would do before the run's own rounds exist
    assert kept() == [0, 6, 7, 8]
    # averaging the last three rounds needs them on a resume: never fewer are kept
    averaged = with_changes(cfg, run={"name": "avg"}, eval={"average_rounds": 3, "select": ""})
    train(averaged, range(1, 7))
    assert sorted(int(p.stem[6:]) for p in RunDir(averaged.run_dir).checkpoints.glob("*.pt")) \
        == [0, 4, 5, 6]  # fmt: skip


def test_a_run_whose_checkpoints_will_not_fit_says_so_in_one_line(
    toy_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    lines: list[str] = []
    train_centralized(with_changes(toy_config, federation={"num_rounds": 2}), log=lines.append)
    warned = [line for line in lines if line.startswith("warning: the 2 round(s) to come")]
    assert len(warned) == 1 and "set run.keep_checkpoints=2" in warned[0], lines
    assert "has 0 MB free" in warned[0] and "--set run.resume=true" in warned[0]
    lines.clear()
    kept = with_changes(toy_config, run={"name": "kept", "keep_checkpoints": 2},
                        federation={"num_rounds": 2})  # fmt: skip
    train_centralized(kept, log=lines.append)
    warned = [line for line in lines if line.startswith("warning:")]
    assert len(warned) == 1 and "free space" in warned[0] and "keep_checkpoints" not in warned[0]
    monkeypatch.undo()
    lines.clear()
    train_centralized(with_changes(toy_config, run={"name": "roomy"}), log=lines.append)
    assert not [line for line in lines if line.startswith("warning:")]
