"""Config: one typed object from YAML, --set overrides and Flower's run-config."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from fedgan.config import (
    Config,
    dump_yaml,
    from_run_config,
    load_config,
    to_run_config,
)
from fedgan.experiment import resolve

REPO = Path(__file__).resolve().parent.parent


def test_yaml_object_run_config_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(
        "run: {name: study, seed: 3}\n"
        "data: {partition: dirichlet, dirichlet_alpha: 0.3, image_size: 64}\n"
        "train: {lr_g: 1.0e-4, local_steps: 7}\n"
        "federation: {num_hospitals: 5, strategy: fedadam}\n"
    )
    cfg = load_config(path)
    assert cfg.data.dirichlet_alpha == 0.3 and cfg.federation.strategy == "fedadam"
    run_config = to_run_config(cfg)
    assert all(isinstance(v, (bool, int, float, str)) for v in run_config.values())
    assert from_run_config(run_config) == cfg
    # and back through YAML text
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(cfg))
    assert load_config(again) == cfg


def test_pyproject_app_config_matches_defaults() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert app_config == to_run_config(Config())
    assert "federations" not in pyproject["tool"]["flwr"]


def test_overrides_are_typed() -> None:
    cfg = load_config(None, ["train.lr_d=1e-3", "run.resume=true", "federation.num_rounds=3"])
    assert cfg.train.lr_d == pytest.approx(1e-3)
    assert cfg.run.resume is True
    assert cfg.federation.num_rounds == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learning_rate=0.1", "'train.learning_rate': unknown key"),
        ("trainer.lr_g=0.1", "unknown config section"),
        ("model.family=stylegan9", "allowed: cgan, dcgan, sngan, wgan-gp"),
        ("model.d_norm=batch", "allowed: group, none"),
        ("data.partition=random", "allowed: dirichlet, iid"),
        ("federation.strategy=fedbest", "allowed:"),
        ("train.batch_size=0", "'train.batch_size': must be > 0"),
        ("train.batch_size=3.5", "expected an integer"),
        ("run.resume=maybe", "expected true or false"),
        ("data.image_size=48", "power of two"),
        ("train.device=tpu", "allowed: auto, cpu, cuda"),
        ("train.mode_seeking=-1", "'train.mode_seeking': must be >= 0"),
        ("train.lr_schedule=step", "'train.lr_schedule'"),
        ("train.lr_final=1.5", "'train.lr_final'"),
        ("federation.min_hospitals=9", "exceeds federation.num_hospitals"),
        ("lr=0.1", "section.key=value"),
    ],
)
def test_bad_input_names_the_key_and_the_fix(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(load_config(None, [override]))


def test_missing_config_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load() -> None:
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert paths, "configs/ holds no experiment"
    for path in paths:
        assert isinstance(resolve(load_config(path)), Config)


def test_run_config_rejects_flat_keys() -> None:
    with pytest.raises(ValueError, match="section.key"):
        from_run_config({"num-server-rounds": 3})
