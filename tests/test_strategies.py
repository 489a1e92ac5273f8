"""Aggregation: FedAvg of hand-made G+D states equals the hand-computed weighted mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedgan.config import load_config
from fedgan.experiment import resolve
from fedgan.federated.records import from_arrays, nbytes, to_arrays
from fedgan.federated.server_app import round_record
from fedgan.federated.strategies import STRATEGIES, build_strategy
from fedgan.runs.records import HospitalReport


@pytest.fixture(autouse=True)
def _message_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Messages are normally built inside a running app, which sets these.
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


def _reply(state: dict[str, torch.Tensor], n: int, hospital: int) -> Message:
    content = RecordDict(
        {
            "arrays": to_arrays(state),
            "metrics": MetricRecord(
                HospitalReport(
                    hospital=hospital,
                    num_examples=n,
                    examples_seen=8,
                    steps=1,
                    d_loss=float(hospital),
                    g_loss=1.0,
                    train_seconds=0.1,
                ).to_metrics()
            ),
        }
    )
    return Message(content=content, dst_node_id=0, message_type="train")


def test_fedavg_is_the_example_weighted_mean() -> None:
    a = {"generator.w": torch.tensor([1.0, 2.0]), "discriminator.b": torch.tensor([[0.0, 4.0]])}
    b = {"generator.w": torch.tensor([3.0, 6.0]), "discriminator.b": torch.tensor([[8.0, 0.0]])}
    strategy = build_strategy(load_config(None, ["federation.num_hospitals=2"]).federation)
    arrays, _ = strategy.aggregate_train(1, [_reply(a, 100, 0), _reply(b, 300, 1)])
    out = from_arrays(arrays)
    np.testing.assert_allclose(out["generator.w"], [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6])
    np.testing.assert_allclose(out["discriminator.b"], [[6.0, 1.0]])
    # the inputs were not aggregated in place
    assert torch.equal(a["generator.w"], torch.tensor([1.0, 2.0]))
    record = round_record(1, strategy.round_log)
    assert set(record.hospitals) == {"hospital_0", "hospital_1"}
    assert record.aggregate["num_examples"] == 400
    assert record.aggregate["d_loss"] == pytest.approx(0.75)  # 0*0.25 + 1*0.75
    assert record.bytes_up == 2 * nbytes(to_arrays(a))


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_builds_and_aggregates(name: str) -> None:
    cfg = load_config(None, [f"federation.strategy={name}", "federation.num_hospitals=3"])
    strategy = build_strategy(cfg.federation)
    states = [{"generator.w": torch.full((3,), float(i))} for i in range(3)]
    if hasattr(strategy, "current_arrays"):  # server-side optimizers need the global model
        strategy.current_arrays = {"generator.w": np.zeros(3, dtype=np.float32)}
    arrays, _ = strategy.aggregate_train(1, [_reply(s, 10, i) for i, s in enumerate(states)])
    assert arrays is not None and torch.isfinite(from_arrays(arrays)["generator.w"]).all()
    assert len(strategy.round_log.reports) == 3


def test_unknown_strategy_lists_known() -> None:
    with pytest.raises(ValueError, match="fedavg"):
        resolve(load_config(None, ["federation.strategy=fedx"]))


def test_records_round_trip() -> None:
    state = {"generator.a": torch.randn(2, 3), "discriminator.b": torch.arange(4)}
    back = from_arrays(to_arrays(state))
    assert all(torch.equal(state[k], back[k]) for k in state)
    assert ConfigRecord({"x": b"bytes"})["x"] == b"bytes"  # optimizer state travels as bytes


@pytest.mark.parametrize("strategy_name", STRATEGIES.names())
@pytest.mark.parametrize("family", ["dcgan", "wgan-gp", "sngan", "cgan"])
def test_every_family_aggregates_under_every_strategy(family: str, strategy_name: str) -> None:
    from fedgan.models import ImageShape, build_networks, load_state, pack_state

    cfg = load_config(
        None,
        [
            f"model.family={family}",
            "model.base_channels=8",
            "model.latent_dim=8",
            f"federation.strategy={strategy_name}",
            "federation.num_hospitals=3",
        ],
    )
    states = [pack_state(build_networks(cfg.model, ImageShape(1, 16), seed=s)) for s in range(3)]
    strategy = build_strategy(cfg.federation)
    if hasattr(strategy, "current_arrays"):
        strategy.current_arrays = {k: v.numpy() for k, v in states[0].items()}
    arrays, _ = strategy.aggregate_train(1, [_reply(s, 10 + i, i) for i, s in enumerate(states)])
    merged = from_arrays(arrays)
    nets = build_networks(cfg.model, ImageShape(1, 16), seed=9)
    load_state(nets, merged)  # every key and shape of the family survives aggregation
    assert all(torch.isfinite(v.float()).all() for v in merged.values())
