"""Weights in half precision on the wire: rounding within the stated bound, aggregation in
float32 on the server, half the bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedgan.config import load_config
from fedgan.experiment import resolve
from fedgan.federated.records import (
    PACKED_KEY,
    ROUNDING,
    from_arrays,
    nbytes,
    pack,
    to_arrays,
    unpack,
)
from fedgan.federated.strategies import build_strategy
from fedgan.models import build_networks, pack_state
from fedgan.runs.records import HospitalReport
from fedgan.training.hospital import config_shape

HALF = ("float16", "bfloat16")


@pytest.fixture(autouse=True)
def _message_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


def _state(seed: int) -> dict[str, torch.Tensor]:
    """A real G+D state (weights, biases, BatchNorm statistics and its int64 counters), with
    values spread over several orders of magnitude."""
    cfg = load_config(None, ["data.image_size=32", "model.base_channels=32"])  # the default job
    state = pack_state(build_networks(cfg.model, config_shape(cfg), seed=seed))
    g = torch.Generator().manual_seed(seed)
    return {
        k: v * 10 ** (torch.rand(v.shape, generator=g) * 5 - 3) if v.is_floating_point() else v
        for k, v in state.items()
    }


def _bound(x: torch.Tensor, dtype: str) -> torch.Tensor:
    u, s = ROUNDING[dtype]
    return u * x.abs() + s


@pytest.mark.parametrize("dtype", HALF)
def test_rounding_stays_within_the_stated_bound(dtype: str) -> None:
    state = _state(0)
    back = from_arrays(to_arrays(state, dtype), dtype)
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype  # float32 again; int64 counters untouched
        if not value.is_floating_point():
            assert torch.equal(back[key], value)
            continue
        error = (back[key].double() - value.double()).abs()
        assert (error <= _bound(value.double(), dtype)).all(), key
    assert nbytes(to_arrays(state, dtype)) < 0.51 * nbytes(to_arrays(state))


def test_a_float16_array_that_would_overflow_travels_in_full_precision() -> None:
    state = {"generator.big": torch.tensor([1e6, -3.0]), "generator.small": torch.tensor([0.5])}
    arrays = to_arrays(state, "float16")
    assert arrays["generator.big"].numpy().dtype == np.float32
    assert arrays["generator.small"].numpy().dtype == np.float16
    assert torch.equal(from_arrays(arrays, "float16")["generator.big"], state["generator.big"])


def _reply(state: dict[str, torch.Tensor], n: int, hospital: int, dtype: str) -> Message:
    report = HospitalReport(hospital=hospital, num_examples=n, examples_seen=8, steps=1,
                            d_loss=0.0, g_loss=0.0, train_seconds=0.1)  # fmt: skip
    content = RecordDict({"arrays": to_arrays(state, dtype),
                          "metrics": MetricRecord(report.to_metrics())})  # fmt: skip
    return Message(content=content, dst_node_id=0, message_type="train")


def _aggregate(strategy_name: str, wire: str, states, global_state) -> tuple[dict, int, object]:
    cfg = resolve(load_config(None, [f"federation.strategy={strategy_name}",
                                     "federation.num_hospitals=3",
                                     f"federation.message_dtype={wire}"]))  # fmt: skip
    strategy = build_strategy(cfg.federation)
    strategy.global_arrays = to_arrays(global_state)
    if hasattr(strategy, "current_arrays"):
        strategy.current_arrays = {k: v.numpy() for k, v in global_state.items()}
    replies = [
        _reply(s, n, i, wire) for i, (s, n) in enumerate(zip(states, (10, 20, 30), strict=True))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return from_arrays(arrays), strategy.round_log.bytes_up, strategy


@pytest.mark.parametrize("strategy_name", ["fedavg", "fedmedian", "fedtrimmedavg"])
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_aggregate_is_within_the_bound(strategy_name: str, dtype: str) -> None:
    """Replies sent in half precision aggregate to within the rounding bound of the largest
    reply of what the same replies give in float32 (these strategies take, elementwise, a
    convex combination or a median of the replies, which keeps the bound)."""
    states = [_state(seed) for seed in (1, 2, 3)]
    exact, exact_bytes, _ = _aggregate(strategy_name, "float32", states, _state(0))
    half, half_bytes, _ = _aggregate(strategy_name, dtype, states, _state(0))
    for key, value in exact.items():
        assert half[key].dtype == value.dtype
        if not value.is_floating_point():
            continue
        largest = torch.stack([s[key].abs().double() for s in states]).max(0).values
        error = (half[key].double() - value.double()).abs()
        assert (error <= _bound(largest, dtype) * (1 + 1e-6) + 1e-12).all(), key
    assert half_bytes < 0.51 * exact_bytes


@pytest.mark.parametrize("strategy_name", ["fedavg", "fedadam", "fedavgm", "krum"])
def test_the_server_aggregates_in_float32(strategy_name: str) -> None:
    """What the server makes of float16 replies is exactly what it makes, in float32, of the
    values those replies carry: nothing is computed in half precision on the server, and a
    server optimizer's state stays float32."""
    states = [_state(seed) for seed in (1, 2, 3)]
    carried = [from_arrays(to_arrays(s, "float16"), "float16") for s in states]
    half, _, strategy = _aggregate(strategy_name, "float16", states, _state(0))
    exact, _, _ = _aggregate(strategy_name, "float32", carried, _state(0))
    for key, value in exact.items():
        assert half[key].dtype == value.dtype
        assert torch.equal(half[key], value), key
    for array in getattr(strategy, "current_arrays", {}).values():
        assert np.asarray(array.numpy() if hasattr(array, "numpy") else array).dtype != np.float16


def test_central_dp_refuses_half_precision_messages() -> None:
    cfg = load_config(
        None,
        ["privacy.mode=central-dp", "privacy.target_epsilon=3", "federation.message_dtype=float16"],
    )
    with pytest.raises(ValueError, match="federation.message_dtype=float32"):
        resolve(cfg)


def test_an_unknown_message_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="federation.message_dtype"):
        load_config(None, ["federation.message_dtype=int8"])


# --- packed messages: every array of a message as one ------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", *HALF])
def test_packing_is_exact_and_one_array(dtype: str) -> None:
    """Every key, dtype (float32/16, bfloat16's int16 bits, int64 counters), shape (0-d
    included) and byte comes back; the packed record is one array and costs only its header."""
    arrays = to_arrays(_state(1), dtype)
    packed = pack(arrays)
    assert list(packed) == [PACKED_KEY]
    back = unpack(packed)
    assert list(back) == list(arrays)
    for key, array in arrays.items():
        a, b = array.numpy(), back[key].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), key
    assert nbytes(packed) <= nbytes(arrays)  # one header instead of one per array
    assert torch.equal(
        from_arrays(back, dtype)["generator.net.0.weight"],
        from_arrays(arrays, dtype)["generator.net.0.weight"],
    )
    assert unpack(arrays) is arrays  # a record that is not packed passes as it is


def test_a_malformed_packed_buffer_is_refused() -> None:
    good = pack(ArrayRecord({"a": Array(np.arange(6, dtype=np.float32).reshape(2, 3))}))
    raw = good[PACKED_KEY].numpy()
    for bad in (raw[:-4], np.concatenate([raw, np.zeros(3, np.uint8)]), raw[:5]):
        with pytest.raises(ValueError, match="malformed packed message"):
            unpack(ArrayRecord({PACKED_KEY: Array(np.array(bad, dtype=np.uint8))}))


class _Grid:
    def get_node_ids(self):
        return [11, 12, 13]

    def create_message(self, content, message_type, dst_node_id, group_id):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)


def test_central_dp_messages_travel_per_array() -> None:
    """Flower's clipping wrappers read a message's arrays one by one: central DP never packs."""
    cfg = resolve(load_config(None, ["federation.num_hospitals=3", "privacy.mode=central-dp",
                                     "privacy.target_epsilon=10",
                                     "federation.strategy=fedavg"]))  # fmt: skip
    strategy = build_strategy(cfg.federation, privacy=cfg.privacy)
    start = _state(0)
    messages = list(strategy.configure_train(1, to_arrays(start), ConfigRecord({}), _Grid()))
    assert messages and all(set(m.content["arrays"]) == set(start) for m in messages)


def test_the_server_sends_packed_and_reads_both_layouts_and_names_a_malformed_reply() -> None:
    cfg = resolve(load_config(None, ["federation.num_hospitals=3"]))
    assert cfg.federation.pack_messages
    strategy = build_strategy(cfg.federation)
    start = _state(0)

    messages = list(strategy.configure_train(1, to_arrays(start), ConfigRecord({}), _Grid()))
    assert messages and all(set(m.content["arrays"]) == {PACKED_KEY} for m in messages)
    assert set(unpack(messages[0].content["arrays"])) == set(start)
    states = [_state(seed) for seed in (1, 2, 3)]
    replies = [_reply(s, 10, i, "float32") for i, s in enumerate(states)]
    replies[0].content["arrays"] = pack(replies[0].content["arrays"])  # packed
    raw = pack(replies[2].content["arrays"])[PACKED_KEY].numpy()
    replies[2].content["arrays"] = ArrayRecord({PACKED_KEY: Array(np.array(raw[:-8]))})
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    merged = from_arrays(arrays)
    key = "generator.net.0.weight"
    torch.testing.assert_close(merged[key], (states[0][key] + states[1][key]) / 2)
    # (the three nodes it sent to are also recorded as silent: these replies come from node 0)
    reasons = [reason for _, reason in strategy.round_log.failures if "packed" in reason]
    assert len(reasons) == 1 and reasons[0].startswith("rejected: malformed packed message")
