"""Faults in a real federation: a hospital whose ClientApp replies with NaN, a wrong shape, a
missing key or a x1e6 update is rejected by name, and the global model is exactly the
aggregate of the honest hospitals (a real SuperLink, Flower's simulation engine)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from fedgan.config import Config, load_config
from fedgan.experiment import resolve
from fedgan.federated.simulation import simulate
from fedgan.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

#: A Flower app whose ClientApp is fedgan's, with hospital 0's reply corrupted on the way out
#: (and every reply saved, so the test can aggregate the honest ones itself).
FAULTY_CLIENT = """
import os

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.clientapp import ClientApp

from fedgan.federated.central_dp import client_clipping_mod
from fedgan.federated.client_app import train as fedgan_train
from fedgan.federated.records import pack, unpack

app = ClientApp(mods=[client_clipping_mod])


@app.train()
def train(msg, context):
    reply = fedgan_train(msg, context)
    hospital = int(context.node_config["partition-id"])
    round_ = int(msg.content.config_records["config"]["server-round"])
    arrays = unpack(reply.content.array_records["arrays"])  # as the server reads it
    values = {k: np.array(a.numpy(), copy=True) for k, a in arrays.items()}
    torch.save({k: torch.from_numpy(v) for k, v in values.items()},
               os.path.join(os.environ["FAULT_DUMP"], f"r{round_}_h{hospital}.pt"))
    fault, first = os.environ["FAULT"], "generator.net.0.weight"
    if hospital not in ((0, 1) if fault == "nan-most" else (0,)):
        return reply
    if fault in ("nan", "nan-most"):
        values[first] = np.full_like(values[first], np.nan)
    elif fault == "shape":
        values[first] = np.zeros(values[first].size + 1, values[first].dtype)
    elif fault == "missing":
        del values[first]
    elif fault == "x1e6":
        values = {k: v * 1e6 if v.dtype.kind == "f" else v for k, v in values.items()}
    reply.content["arrays"] = pack(ArrayRecord({k: Array(v) for k, v in values.items()}))
    return reply
"""

FAULTS = {
    "nan": "non-finite value",
    "shape": "generator.net.0.weight has shape",
    "missing": "missing ['generator.net.0.weight']",
    "x1e6": "exceeds 10x the round's median",
}


@pytest.fixture
def faulty_app(tmp_path: Path) -> Path:
    app = tmp_path / "faulty_app"
    app.mkdir()
    text = (REPO / "pyproject.toml").read_text()
    text = text.replace('"fedgan.federated.client_app:app"', '"faulty:app"')
    text = re.sub(r'(?m)^name = "fedgan"$', 'name = "fedganfaulty"', text)
    (app / "pyproject.toml").write_text(text)
    (app / "faulty.py").write_text(FAULTY_CLIENT)
    shutil.copy(REPO / "README.md", app / "README.md")
    return app


def _faulty_run(fault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Config, Path]:
    """A 3-hospital, 2-round toy run of the faulty app with ``fault``, and where its replies go."""
    dump = tmp_path / "replies"
    dump.mkdir()
    monkeypatch.setenv("FAULT", fault)
    monkeypatch.setenv("FAULT_DUMP", str(dump))
    cfg = resolve(load_config(None, [
        f"run.output_dir={tmp_path / 'runs'}", "run.name=faulty", "data.image_size=16",
        "data.num_images=96", "model.base_channels=8", "model.latent_dim=16",
        "train.batch_size=8", "train.local_steps=2", "eval.grid_size=16",
        "federation.num_hospitals=3", "federation.num_rounds=2",
    ]))  # fmt: skip
    return cfg, dump


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_bad_reply_is_rejected_and_the_honest_aggregate_is_kept(
    fault: str, faulty_app: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, dump = _faulty_run(fault, tmp_path, monkeypatch)
    summary = simulate(cfg, timeout=600, app=faulty_app)
    assert summary["rounds"] == 2
    rd = RunDir(cfg.run_dir)
    records = rd.read_metrics()
    for record in records:
        assert set(record["hospitals"]) == {"hospital_1", "hospital_2"}
        (failure,) = record["failures"]
        assert failure["hospital"] == "hospital_0"
        assert failure["reason"].startswith("rejected:") and FAULTS[fault] in failure["reason"]
    # Round 1's global model is FedAvg of the two honest hospitals' replies, to the bit.
    weights = {h: records[0]["hospitals"][f"hospital_{h}"]["num_examples"] for h in (1, 2)}
    replies = {h: torch.load(dump / f"r1_h{h}.pt") for h in (1, 2)}
    state = torch.load(rd.checkpoints / "round_0001.pt")["state"]
    total = sum(weights.values())
    for key, value in state.items():
        if value.dtype.is_floating_point:
            expected = sum(replies[h][key].double() * weights[h] for h in (1, 2)) / total
            torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(value.float()).all()
    final = torch.load(rd.latest_checkpoint_path())["state"]
    assert all(torch.isfinite(v.float()).all() for v in final.values())


def test_a_round_with_fewer_updates_than_the_quorum_keeps_the_global_model(
    faulty_app: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two of three hospitals reply with NaN: the one honest update is fewer than the quorum
    (2), and averaging it alone would make the global model that one hospital's. The round
    keeps the global model instead, says so, and the study goes on."""
    cfg, dump = _faulty_run("nan-most", tmp_path, monkeypatch)
    assert cfg.federation.quorum == 2
    summary = simulate(cfg, timeout=600, app=faulty_app)
    assert summary["rounds"] == 2
    rd = RunDir(cfg.run_dir)
    records = rd.read_metrics()
    for record in records:
        assert set(record["hospitals"]) == {"hospital_2"}
        assert {f["hospital"] for f in record["failures"]} == {"hospital_0", "hospital_1"}
        assert record["aggregate"]["global_kept"] == 1
    start = torch.load(rd.checkpoints / "round_0000.pt")["state"]
    for name in ("round_0001.pt", "round_0002.pt"):
        state = torch.load(rd.checkpoints / name)["state"]
        for key, value in state.items():
            torch.testing.assert_close(value, start[key], rtol=0, atol=0)
    honest = torch.load(dump / "r1_h2.pt")
    assert any(not torch.equal(honest[k], start[k]) for k in honest if k in start)
