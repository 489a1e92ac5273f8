"""Careless input, table-driven: every case ends in one line that names the problem and the
fix, exit code 2, no traceback, and no run folder left behind (nothing overwritten)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedgan.cli import main

REPO = Path(__file__).resolve().parent.parent


def _yaml(tmp: Path, text: str) -> list[str]:
    path = tmp / "bad.yaml"
    path.write_text(text)
    return ["simulate", "--config", str(path)]


def _npz(tmp: Path, images: np.ndarray, labels: np.ndarray) -> list[str]:
    path = tmp / "data.npz"
    np.savez(path, train_images=images, train_labels=labels, test_images=images,
             test_labels=labels)  # fmt: skip
    return ["simulate", "--set", "data.source=medmnist", "--set", f"data.path={path}",
            "--set", "federation.num_hospitals=2"]  # fmt: skip


def _nan_npz(tmp: Path) -> list[str]:
    images = np.random.default_rng(0).random((40, 28, 28)).astype(np.float32)
    images[3, 5, 5] = np.nan
    return _npz(tmp, images, np.zeros((40, 1), np.int64))


def _string_npz(tmp: Path) -> list[str]:
    return _npz(tmp, np.array([["a"] * 28] * 40), np.zeros((40, 1), np.int64))


def _truncated_png(tmp: Path) -> list[str]:
    from PIL import Image

    folder = tmp / "pngs"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(folder / f"{i}.png")
    data = (folder / "3.png").read_bytes()
    (folder / "3.png").write_bytes(data[: len(data) // 2])
    return ["simulate", "--set", "data.source=folder", "--set", f"data.path={folder}",
            "--set", "federation.num_hospitals=2"]  # fmt: skip


def _four_pngs(tmp: Path) -> list[str]:
    from PIL import Image

    folder = tmp / "few"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return ["simulate", "--set", "data.source=folder", "--set", f"data.path={folder}",
            "--set", "federation.num_hospitals=4"]  # fmt: skip


def _nifti_lines(tmp: Path) -> list[str]:
    import nibabel as nib

    folder = tmp / "nii"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.ones((16, 1, 8), np.float32), np.eye(4)), folder / "thin.nii.gz")
    return ["simulate", "--set", "data.source=nifti", "--set", f"data.path={folder}",
            "--set", "data.slice_axis=0", "--set", "federation.num_hospitals=1"]  # fmt: skip


def _finished_run(tmp: Path, rounds: int = 1) -> Path:
    from fedgan.config import load_config
    from fedgan.runs.centralized import train_centralized

    cfg = load_config(None, [
        f"run.output_dir={tmp / 'done'}", "run.name=r", "data.image_size=16", "data.num_images=32",
        "model.base_channels=4", "train.batch_size=8", "train.local_steps=1",
        f"federation.num_rounds={rounds}", "eval.metrics=", "eval.final_metrics=",
        "eval.grid_size=4",
    ])  # fmt: skip
    train_centralized(cfg, log=lambda _: None)
    return cfg.run_dir


def _sample_into_used(tmp: Path) -> list[str]:
    run = _finished_run(tmp)
    out = tmp / "synth"
    out.mkdir()
    (out / "keep.png").write_bytes(b"earlier work")
    return ["sample", "--run", str(run), "--n", "4", "--out", str(out)]


def _sample_untrained(tmp: Path) -> list[str]:
    run = _finished_run(tmp)
    for ckpt in (run / "checkpoints").glob("round_0001.pt"):
        ckpt.unlink()
    (run / "checkpoints" / "latest").write_text("round_0000.pt\n")
    return ["sample", "--run", str(run), "--n", "4", "--out", str(tmp / "synth")]


def _sample_under_a_file(tmp: Path) -> list[str]:
    run = _finished_run(tmp)
    (tmp / "notes.txt").write_text("a file, not a folder")
    return ["sample", "--run", str(run), "--n", "4", "--out", str(tmp / "notes.txt" / "synth")]


def _evaluate_missing_checkpoint(tmp: Path) -> list[str]:
    return ["evaluate", "--run", str(_finished_run(tmp)), "--checkpoint", str(tmp / "no.pt")]


def _evaluate_corrupt_checkpoint(tmp: Path) -> list[str]:
    bad = tmp / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    return ["evaluate", "--run", str(_finished_run(tmp)), "--checkpoint", str(bad)]


def _plan(tmp: Path, text: str) -> list[str]:
    path = tmp / "plan.yaml"
    path.write_text(text)
    return ["compare", "--study", str(path), "--out", str(tmp / "runs")]


def _binary_config(tmp: Path) -> list[str]:
    (tmp / "weights.yaml").write_bytes(bytes(range(256)) * 4)
    return ["simulate", "--config", str(tmp / "weights.yaml")]


# (case, how to make the command, what the one line must say)
CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("yaml syntax", lambda t: _yaml(t, "train: [1,\n"), "bad.yaml: line"),
    ("section as scalar", lambda t: _yaml(t, "train: 5\n"), "'train': expected a mapping"),
    ("unknown key", lambda t: ["simulate", "--set", "train.lr=1"], "'train.lr': unknown key"),
    ("bad value", lambda t: ["centralized", "--set", "train.batch_size=-1"], "must be > 0"),
    ("a critic ceiling under the threshold",
     lambda t: ["simulate", "--set", "train.critic_ceiling=0.5"],
     "0.5 is not above train.critic_threshold (0.6)"),
    ("a critic cap under the schedule's start",
     lambda t: ["simulate", "--set", "privacy.mode=dp-sgd", "--set", "privacy.target_epsilon=10",
                "--set", "train.critic_max=2"],
     "'train.critic_max': 2 is below 3, where the adaptive schedule starts"),
    ("one checkpoint kept", lambda t: ["simulate", "--set", "run.keep_checkpoints=1"],
     "'run.keep_checkpoints': must be 0 (keep every round's) or 2 or more"),
    ("unknown family", lambda t: ["simulate", "--set", "model.family=big"], "allowed: cgan"),
    ("a run config given as a study plan",
     lambda t: ["compare", "--study", str(REPO / "configs" / "default.yaml"), "--out",
                str(t / "runs")],
     "default.yaml is a run config, not a study plan"),
    # 64 phantom images over 4 hospitals: 15 each after the evaluation split, delta 0.1 >= 1/15
    ("a delta of 1/n or more", lambda t: ["simulate", "--set", "data.num_images=64",
     "--set", "privacy.mode=dp-sgd", "--set", "privacy.target_epsilon=3",
     "--set", "privacy.delta=0.1"], "privacy.delta 0.1 is not below 1 / 1"),
    ("a pooled delta of 1/n or more", lambda t: ["centralized", "--set", "data.num_images=12",
     "--set", "privacy.mode=dp-sgd", "--set", "privacy.target_epsilon=3",
     "--set", "privacy.delta=0.1"], "privacy.delta 0.1 is not below 1 / "),
    # central DP's records are hospitals: 10 of them, delta 0.1 >= 1/10
    ("a central-DP delta of 1/hospitals or more", lambda t: ["simulate",
     "--set", "federation.strategy=fedavg", "--set", "federation.num_hospitals=10",
     "--set", "privacy.mode=central-dp", "--set", "privacy.target_epsilon=3",
     "--set", "privacy.delta=0.1"],
     "privacy.delta 0.1 is not below 1 / 10 (the federation's hospitals)"),
    ("nan data", _nan_npz, "hold NaN or infinite values"),
    ("npz of strings", _string_npz, "images must be numbers"),
    ("truncated png", _truncated_png, "3.png"),
    ("nifti cut into lines", _nifti_lines, "thin.nii.gz"),
    ("more hospitals than images",
     lambda t: ["simulate", "--set", "data.num_images=8", "--set", "federation.num_hospitals=20"],
     "every hospital needs at least one image"),
    ("too few images to hold any out", _four_pngs, "the evaluation split is empty"),
    ("a device this machine lacks", lambda t: ["simulate", "--set", "train.device=cuda:99"],
     "train.device is 'cuda:99' but"),
    ("output dir is a file",
     lambda t: ((t / "f").write_text("x"), ["simulate", "--set", f"run.output_dir={t / 'f'}"])[1],
     "is a file, not a folder"),
    ("output dir unwritable",
     lambda t: ["centralized", "--set", "run.output_dir=/proc/fedgan-runs"], "cannot be written"),
    ("resume a run that does not exist",
     lambda t: ["simulate", "--set", "run.resume=true", "--set", "run.name=typo"],
     "holds no run to continue"),
    ("warm start from nothing",
     lambda t: ["simulate", "--set", f"model.init_from={t / 'pretrain'}"], "does not exist"),
    ("warm start from another model",
     lambda t: ["compare", "--set", f"model.init_from={_finished_run(t)}", "--set",
                "model.base_channels=16", "--set", f"run.output_dir={t / 'runs'}"],
     "holds other networks than this run's"),
    ("evaluate a round the run lacks",
     lambda t: ["evaluate", "--run", str(_finished_run(t)), "--checkpoint", "7"],
     "has rounds 0-1: pass --checkpoint"),
    ("a variant that changes nothing",
     lambda t: ["compare", "--variant", "iid", "--set", f"run.output_dir={t / 'runs'}"],
     "expected NAME:key=value"),
    ("sample into a used folder", _sample_into_used, "--force"),
    ("sample under a file", _sample_under_a_file, "notes.txt/synth: Not a directory (errno 20)"),
    ("sample an untrained run", _sample_untrained, "no trained round"),
    ("evaluate a missing checkpoint", _evaluate_missing_checkpoint, "does not exist"),
    ("evaluate a corrupt checkpoint", _evaluate_corrupt_checkpoint, "unreadable"),
    ("config that is a folder", lambda t: ["simulate", "--config", str(t)], "is a folder"),
    ("config that is not text", _binary_config, "not a text file"),
    ("study plan syntax", lambda t: _plan(t, "arms: {a: {set: {x: 1}\n"), "plan.yaml: line"),
    ("study plan not a mapping", lambda t: _plan(t, "- a\n- b\n"),
     "expected a mapping of the plan's keys"),
    ("study arms as a list", lambda t: _plan(t, "arms: [a, b]\n"), "arms must map each arm"),
    ("study arm as a word", lambda t: _plan(t, "arms:\n  a: federated\n"),
     "arm 'a' must map mode and set"),
    ("study arm with a misspelled key",
     lambda t: _plan(t, "arms:\n  a:\n    sett: {train.lr_g: 1.0e-4}\n"),
     "arm 'a' has unknown keys ['sett']"),
    ("study settings as a list", lambda t: _plan(t, "set: [train.lr_g]\narms:\n  a: {}\n"),
     "set must map config keys to values"),
    ("a study arm measured against no arm of the plan",
     lambda t: _plan(t, "arms:\n  a: {}\n  b: {against: c}\n"),
     "arm 'b' is measured against 'c', which is not another of the plan's arms; name one of: a"),
    ("seeds that do not read",
     lambda t: [*_plan(t, "arms:\n  a: {}\n"), "--seeds", "3-1"], "--seeds '3-1': expected"),
    ("a seed given twice", lambda t: [*_plan(t, "arms:\n  a: {}\n"), "--seeds", "0,1,0"],
     "each once"),
    ("--seeds beside --set run.seed",
     lambda t: [*_plan(t, "arms:\n  a: {}\n"), "--seeds", "0-2", "--set", "run.seed=4"],
     "--seeds sets run.seed for every arm: drop --set run.seed"),
    ("an arm that sets its own seed, over --seeds",
     lambda t: [*_plan(t, "arms:\n  a: {set: {run.seed: 3}}\n"), "--seeds", "0,1"],
     "arm 'a' of study 'plan' sets its own run.seed"),
    ("enhance a missing input",
     lambda t: ["enhance", "--run", str(t), "--input", str(t / "x"), "--out", str(t / "o")],
     "not found"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "make", "says"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    case: str, make: Callable[[Path], list[str]], says: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    args = make(tmp_path)
    if args[0] in ("simulate", "centralized") and not any("run.output_dir" in a for a in args):
        args += ["--set", f"run.output_dir={tmp_path / 'runs'}"]
    before = {p for p in tmp_path.rglob("*")}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fedgan: error:"), err
    assert "Traceback" not in err and says in err, err
    assert not (tmp_path / "runs").exists()  # no run folder that would then block the name
    assert {p for p in tmp_path.rglob("*")} == before  # nothing written, nothing overwritten
