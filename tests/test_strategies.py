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
        strategy.current_arrays = to_arrays({"generator.w": torch.zeros(3)})
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
        strategy.current_arrays = to_arrays(states[0])
    arrays, _ = strategy.aggregate_train(1, [_reply(s, 10 + i, i) for i, s in enumerate(states)])
    merged = from_arrays(arrays)
    nets = build_networks(cfg.model, ImageShape(1, 16), seed=9)
    load_state(nets, merged)  # every key and shape of the family survives aggregation
    assert all(torch.isfinite(v.float()).all() for v in merged.values())


def _state(value: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(int(value * 1000) % 997)
    return {"generator.w": value + 0.01 * torch.randn(6, generator=g)}


@pytest.mark.parametrize(
    ("name", "extra"), [("krum", []), ("multikrum", ["federation.krum_select=2"])]
)
def test_krum_picks_honest_updates_among_one_outlier(name: str, extra: list[str]) -> None:
    cfg = resolve(load_config(None, [f"federation.strategy={name}", "federation.num_hospitals=5",
                                     "federation.malicious_hospitals=1", *extra]))  # fmt: skip
    honest = [_state(1.0 + 0.01 * i) for i in range(4)]
    outlier = {"generator.w": torch.full((6,), 1e6)}
    strategy = build_strategy(cfg.federation)
    replies = [_reply(s, 10, i) for i, s in enumerate([*honest, outlier])]
    out = from_arrays(strategy.aggregate_train(1, replies)[0])["generator.w"]
    assert out.abs().max() < 2.0  # the outlier is not in the aggregate
    if name == "krum":  # Krum returns one hospital's update as it is
        assert any(torch.allclose(out, s["generator.w"]) for s in honest)
    fedavg = build_strategy(load_config(None, ["federation.num_hospitals=5"]).federation)
    assert from_arrays(fedavg.aggregate_train(1, replies)[0])["generator.w"].min() > 1e5


def test_byzantine_strategies_need_enough_hospitals() -> None:
    with pytest.raises(ValueError, match="at least 5 hospitals"):
        resolve(load_config(None, ["federation.strategy=krum", "federation.num_hospitals=4",
                                   "federation.malicious_hospitals=1"]))  # fmt: skip
    with pytest.raises(ValueError, match="at least 7 hospitals"):
        resolve(load_config(None, ["federation.strategy=bulyan", "federation.num_hospitals=6",
                                   "federation.malicious_hospitals=1"]))  # fmt: skip


def test_strategy_parameters_come_from_the_config() -> None:
    def built(*settings: str):
        return build_strategy(resolve(load_config(None, list(settings))).federation)

    avgm = built("federation.strategy=fedavgm", "federation.avgm_lr=0.7",
                 "federation.avgm_momentum=0.9")  # fmt: skip
    opt = avgm.server_optimizer
    assert (opt.kind, opt.lr, opt.momentum) == ("momentum", 0.7, 0.9)
    assert built("federation.strategy=fedtrimmedavg", "federation.trim_beta=0.1").beta == 0.1
    adam = built("federation.strategy=fedadam", "federation.server_lr=0.05",
                 "federation.server_tau=0.01")  # fmt: skip
    opt = adam.server_optimizer
    assert (opt.kind, opt.lr, opt.tau) == ("adam", 0.05, 0.01)
    krum = built("federation.strategy=multikrum", "federation.num_hospitals=7",
                 "federation.malicious_hospitals=2", "federation.krum_select=3")  # fmt: skip
    assert (krum.num_malicious_nodes, krum.num_nodes_to_select) == (2, 3)


def test_hospital_report_round_trips_through_a_metric_record() -> None:
    from fedgan.runs.records import PrivacySpent

    report = HospitalReport(
        hospital=3, num_examples=120, examples_seen=64, steps=4, d_loss=0.5, g_loss=1.5,
        train_seconds=2.0,
        privacy=PrivacySpent(epsilon=1.2, delta=1e-5, noise_multiplier=1.1, sample_rate=0.1,
                             dp_steps=40, budget=3.0, max_grad_norm=1.0),
        node_id=77,
    )  # fmt: skip
    record = MetricRecord(report.to_metrics())
    assert HospitalReport.from_metrics(record, node_id=77) == report
    plain = HospitalReport(hospital=0, num_examples=1, examples_seen=1, steps=1, d_loss=0.0,
                           g_loss=0.0, train_seconds=0.0)  # fmt: skip
    assert HospitalReport.from_metrics(MetricRecord(plain.to_metrics())) == plain
    with pytest.raises(ValueError, match="lacks 'd-loss'"):
        HospitalReport.from_metrics({k: v for k, v in plain.to_metrics().items() if k != "d-loss"})


def _global() -> dict[str, torch.Tensor]:
    return {"generator.w": torch.zeros(4), "discriminator.b": torch.zeros(2, 2)}


def _honest(i: int) -> dict[str, torch.Tensor]:
    return {"generator.w": torch.full((4,), 0.1 * (i + 1)), "discriminator.b": torch.ones(2, 2)}


BAD_REPLIES = {
    "nan": ({"generator.w": torch.full((4,), float("nan")), "discriminator.b": torch.ones(2, 2)},
            "non-finite value"),
    "shape": ({"generator.w": torch.zeros(5), "discriminator.b": torch.ones(2, 2)},
              "generator.w has shape (5,)"),
    "missing key": ({"generator.w": torch.zeros(4)}, "missing ['discriminator.b']"),
    "x1e6": ({"generator.w": torch.full((4,), 1e6), "discriminator.b": torch.ones(2, 2) * 1e6},
             "exceeds 10x the round's median"),
}  # fmt: skip


@pytest.mark.parametrize("strategy_name", ["fedavg", "fedmedian", "fedadam", "krum"])
@pytest.mark.parametrize("fault", list(BAD_REPLIES))
def test_bad_replies_are_rejected_and_the_round_goes_on(strategy_name: str, fault: str) -> None:
    """Every strategy aggregates only the honest hospitals; the bad one is named with why."""
    cfg = resolve(load_config(None, [f"federation.strategy={strategy_name}",
                                     "federation.num_hospitals=3"]))  # fmt: skip
    bad, reason = BAD_REPLIES[fault]
    strategy = build_strategy(cfg.federation)
    strategy.global_arrays = to_arrays(_global())
    if hasattr(strategy, "current_arrays"):
        strategy.current_arrays = {k: v.numpy() for k, v in _global().items()}
    replies = [_reply(_honest(0), 10, 0), _reply(bad, 10, 1), _reply(_honest(2), 30, 2)]
    out = from_arrays(strategy.aggregate_train(1, replies)[0])
    honest = build_strategy(cfg.federation)
    if hasattr(honest, "current_arrays"):
        honest.current_arrays = {k: v.numpy() for k, v in _global().items()}
    expected = from_arrays(
        honest.aggregate_train(1, [_reply(_honest(0), 10, 0), _reply(_honest(2), 30, 2)])[0]
    )
    for key, value in expected.items():
        torch.testing.assert_close(out[key], value)
    assert [r.hospital for r in strategy.round_log.reports] == [0, 2]
    ((_, why),) = strategy.round_log.failures
    assert why.startswith("rejected:") and reason in why


def test_a_malformed_report_is_rejected() -> None:
    strategy = build_strategy(load_config(None, ["federation.num_hospitals=2"]).federation)
    bare = Message(
        content=RecordDict({"arrays": to_arrays(_honest(0)), "metrics": MetricRecord({"x": 1})}),
        dst_node_id=0,
        message_type="train",
    )
    out, _ = strategy.aggregate_train(1, [bare, _reply(_honest(1), 10, 1)])
    assert torch.allclose(from_arrays(out)["generator.w"], _honest(1)["generator.w"])
    assert "malformed report" in strategy.round_log.failures[0][1]


@pytest.mark.parametrize("kind", ["momentum", "adam", "yogi", "adagrad"])
def test_server_optimizer_state_survives_a_checkpoint(kind: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A server optimizer restored from a checkpoint takes the same next step as the one that
    kept running; a fresh one (what a resume without the state would get) does not."""
    from fedgan.federated.server_opt import ServerOptimizer

    rng = np.random.default_rng(0)
    current = {"w": rng.normal(size=(3, 4)).astype(np.float32), "n": np.array(5)}

    def opt() -> ServerOptimizer:
        return ServerOptimizer(kind, lr=0.5, momentum=0.9)

    running = opt()
    for _ in range(3):
        averaged = {k: (v + rng.normal(size=v.shape).astype(v.dtype) if v.dtype.kind == "f"
                        else v) for k, v in current.items()}  # fmt: skip
        current = running.step(current, averaged)
    torch.save({"server": running.state_dict()}, tmp_path / "ckpt.pt")
    restored = opt()
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["server"])
    assert restored.t == {"w": 3}
    last = {"w": current["w"] + 1.0, "n": current["n"]}
    expected = running.step(current, last)
    np.testing.assert_array_equal(restored.step(current, last)["w"], expected["w"])
    assert not np.allclose(opt().step(current, last)["w"], expected["w"])
    other = ServerOptimizer("adam" if kind != "adam" else "yogi", lr=0.5)
    with pytest.raises(ValueError, match="federation.strategy"):
        other.load_state_dict(running.state_dict())


def test_a_relayed_crash_is_one_line_naming_its_cause() -> None:
    """Ray relays a ClientApp's crash as its traceback, and an out-of-memory kill as a
    paragraph: the round's record, the server's log and a failed run's last line keep the
    exception that started it, or the first sentence and what to lower."""
    from fedgan.runs.records import one_line_reason

    crash = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor"
        '.run()\x1b[39m (pid=26415)\n   ^^^^\n  File "x.py", line 9, in train\n    raise '
        'RuntimeError("disk quota")\nRuntimeError: disk quota\n\nThe above exception was the '
        "direct cause of the following exception:\n\nflwr.clientapp.client_app."
        "ClientAppException: \nException ClientAppException occurred. Message: disk quota'>"
    )
    assert one_line_reason(crash) == "RuntimeError: disk quota"
    oom = (
        "<class 'ray.exceptions.OutOfMemoryError'>:<'1 worker(s) were killed due to the node "
        "running low on memory. Memory on the node (IP: 192.0.2.2) was 22.45GB / 23.54GB'>"
    )
    assert one_line_reason(oom) == (
        "OutOfMemoryError: 1 worker(s) were killed due to the node running low on memory "
        "(lower train.batch_size or federation.concurrent_hospitals)"
    )
    own = "privacy-budget-exhausted: epsilon spent 9.9"  # fedgan's own reasons stay as they are
    assert one_line_reason(own) == own
    assert len(one_line_reason("ValueError: " + "x" * 1000, limit=80)) == 80
