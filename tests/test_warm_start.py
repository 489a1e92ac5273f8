"""Warm starts from public data: ``fedgan pretrain`` and ``model.init_from``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedgan.cli import main
from fedgan.config import load_config
from fedgan.report.compare import ArmRun, collect, write_report
from fedgan.rundir import RunDir
from fedgan.runs.evaluators import make_evaluator


def _args(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture
def pretrained(tmp_path: Path, toy_overrides: list[str], capsys) -> Path:
    """A toy pretraining run on the phantom (public data) and its networks."""
    overrides = [*toy_overrides, f"run.output_dir={tmp_path}", "data.num_images=96",
                 "eval.metrics=", "eval.final_metrics="]  # fmt: skip
    assert main(["pretrain", *_args(overrides)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "pretrain"
    assert f"model.init_from={run.resolve()}" in out
    return run


def test_a_run_starts_from_the_pretrained_networks_and_says_which_data(
    pretrained: Path, tmp_path: Path, toy_overrides: list[str]
) -> None:
    source = RunDir(pretrained).load_checkpoint()
    overrides = [*toy_overrides, f"run.output_dir={tmp_path}", "run.name=warm",
                 "data.num_images=96", "eval.metrics=", "eval.final_metrics=",
                 f"model.init_from={pretrained}"]  # fmt: skip
    assert main(["centralized", *_args(overrides)]) == 0
    warm = RunDir(tmp_path / "warm")
    start = warm.load_checkpoint(warm.checkpoints / "round_0000.pt")["state"]
    assert start.keys() == source["state"].keys()
    assert all(torch.equal(start[k], source["state"][k]) for k in start)
    summary = json.loads(warm.summary_path.read_text())
    assert summary["warm_start"]["data"].startswith("phantom")
    assert summary["warm_start"]["round"] == source["round"]


def test_the_warm_networks_are_scored_before_any_round_and_the_score_survives_a_resume(
    pretrained: Path, tmp_path: Path, toy_overrides: list[str]
) -> None:
    overrides = [*toy_overrides, f"run.output_dir={tmp_path}", "run.name=scored",
                 "data.num_images=96", "eval.metrics=domain_fd_1k", "eval.final_metrics=",
                 f"model.init_from={pretrained}"]  # fmt: skip
    assert main(["centralized", *_args(overrides)]) == 0
    rd = RunDir(tmp_path / "scored")
    alone = json.loads(rd.summary_path.read_text())["warm_start"]["eval"]
    # the same protocol applied from outside the run to the pre-trained run's own networks
    check = make_evaluator(load_config(rd.path / "config.yaml"), tmp_path / "check")
    source = RunDir(pretrained).load_checkpoint()["state"]
    expected = check.metrics(0, source, ["domain_fd_1k"])["domain_fd_1k"]
    assert alone["domain_fd_1k"] == pytest.approx(expected, rel=1e-5)
    last = rd.read_metrics()[-1]["eval"]["domain_fd_1k"]
    assert last != pytest.approx(alone["domain_fd_1k"], rel=1e-3)  # the rounds trained on

    assert main(["centralized", *_args([*overrides, "federation.num_rounds=3",
                                        "run.resume=true"])]) == 0  # fmt: skip
    assert json.loads(rd.summary_path.read_text())["warm_start"]["eval"] == alone

    arm = ArmRun("warm", "centralized", (), rd.path)
    write_report(collect([arm], tmp_path, study="warm"), tmp_path)
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    row = next(line for line in report.splitlines() if "warm start alone" in line)
    assert row.startswith("| domain_fd_1k, warm start alone")
    assert f"| {alone['domain_fd_1k']:.4g} |" in row


def test_a_warm_start_of_another_model_is_refused_before_anything_is_written(
    pretrained: Path, tmp_path: Path, toy_overrides: list[str], capsys
) -> None:
    overrides = [*toy_overrides, f"run.output_dir={tmp_path}", "run.name=wider",
                 "model.base_channels=16", f"model.init_from={pretrained}"]  # fmt: skip
    assert main(["centralized", *_args(overrides)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.init_from" in err[0] and "base_channels" in err[0]
    assert not RunDir(tmp_path / "wider").has_run()
    missing = [*toy_overrides, f"run.output_dir={tmp_path}", "run.name=nowhere",
               f"model.init_from={tmp_path / 'absent'}"]  # fmt: skip
    assert main(["centralized", *_args(missing)]) == 2
    assert "model.init_from" in capsys.readouterr().err
    assert not RunDir(tmp_path / "nowhere").has_run()


@pytest.mark.slow
def test_a_warm_started_private_federation_accounts_its_own_data_only(
    pretrained: Path, tmp_path: Path, toy_overrides: list[str]
) -> None:
    overrides = [*toy_overrides, f"run.output_dir={tmp_path}", "run.name=private",
                 "data.num_images=96", "federation.num_hospitals=2", "federation.num_rounds=1",
                 "privacy.mode=dp-sgd", "privacy.target_epsilon=8", "eval.metrics=",
                 "eval.final_metrics=", f"model.init_from={pretrained}"]  # fmt: skip
    assert main(["simulate", *_args(overrides)]) == 0
    rd = RunDir(tmp_path / "private")
    (record,) = rd.read_metrics()
    # each hospital's accountant starts at zero: one round of the private default (2 local
    # steps x 3 discriminator steps), nothing for the public pretraining
    assert [h["dp_steps"] for h in record["hospitals"].values()] == [6, 6]
    assert all(0 < h["epsilon"] <= 8 for h in record["hospitals"].values())
    assert json.loads(rd.summary_path.read_text())["warm_start"]["data"].startswith("phantom")
