"""GAN-aware federation: server optimizers against their formulas, what travels under a local
discriminator and FedBN, and a hospital's kept weights and optimizer state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedgan.config import Config, load_config, with_changes
from fedgan.data import hospital_dataset
from fedgan.experiment import resolve
from fedgan.federated.records import PACKED_KEY, from_arrays, to_arrays, unpack
from fedgan.federated.server_opt import ServerOptimizer
from fedgan.federated.sharing import SharingPlan, sharing_plan
from fedgan.federated.strategies import build_strategy
from fedgan.models import ModelKeys, pack_state
from fedgan.runs.records import HospitalReport
from fedgan.training import networks_for
from fedgan.training.hospital import local_round, optimizer_steps, restore_optimizers


@pytest.fixture(autouse=True)
def _message_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


# --- server optimizers: each update equals its formula, written out here independently ------


def _rounds() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    x0 = {"g.w": rng.normal(size=(3, 2)), "g.b": rng.normal(size=2)}
    # round 2 averages only g.w (a key shared on another schedule keeps its own step count)
    deltas = [
        {"g.w": rng.normal(size=(3, 2)) * 0.1, "g.b": rng.normal(size=2) * 0.1},
        {"g.w": rng.normal(size=(3, 2)) * 0.1},
        {"g.w": rng.normal(size=(3, 2)) * 0.1, "g.b": rng.normal(size=2) * 0.1},
    ]
    return x0, deltas


def _run(opt: ServerOptimizer) -> dict[str, np.ndarray]:
    x, deltas = _rounds()
    x = dict(x)
    for d in deltas:
        x.update(opt.step(x, {k: x[k] + d[k] for k in d}))
    return x


def _expected(kind: str, lr: float, momentum=0.0, b1=0.9, b2=0.99, tau=1e-3):
    x, deltas = _rounds()
    x = dict(x)
    m: dict = {}
    v: dict = {}
    t: dict = {}
    for d in deltas:
        for k, delta in d.items():
            t[k] = t.get(k, 0) + 1
            if kind == "momentum":
                m[k] = delta if t[k] == 1 else momentum * m[k] + delta
                x[k] = x[k] + lr * m[k]
                continue
            m[k] = b1 * m.get(k, 0.0) + (1 - b1) * delta
            prev = v.get(k, np.zeros_like(delta))
            if kind == "adam":
                v[k] = b2 * prev + (1 - b2) * delta**2
            elif kind == "yogi":
                v[k] = prev - (1 - b2) * delta**2 * np.sign(prev - delta**2)
            else:
                v[k] = prev + delta**2
            corr = 1.0 if kind == "adagrad" else np.sqrt(1 - b2 ** t[k]) / (1 - b1 ** t[k])
            x[k] = x[k] + lr * corr * m[k] / (np.sqrt(v[k]) + tau)
    return x


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("momentum", {"lr": 1.0, "momentum": 0.9}),
        ("momentum", {"lr": 2.5, "momentum": 0.0}),
        ("adam", {"lr": 0.01, "tau": 1e-3}),
        ("yogi", {"lr": 0.01, "tau": 1e-4}),
        ("adagrad", {"lr": 0.05, "tau": 1e-3}),
    ],
)
def test_server_optimizer_update_equals_its_formula(kind: str, params: dict) -> None:
    got = _run(ServerOptimizer(kind=kind, **params))
    want = _expected(kind, **params)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-12)


def test_momentum_with_lr_1_and_no_momentum_is_fedavg() -> None:
    x, deltas = _rounds()
    avg = {k: x[k] + deltas[0][k] for k in x}
    out = ServerOptimizer(kind="momentum", lr=1.0).step(x, avg)
    for k in x:
        np.testing.assert_allclose(out[k], avg[k])


def test_buffers_and_unstepped_networks_are_plainly_averaged() -> None:
    current = {"g.w": np.zeros(2), "g.bn.running_var": np.ones(2), "g.bn.n": np.array(4),
               "d.w": np.zeros(2)}  # fmt: skip
    avg = {"g.w": np.full(2, 0.1), "g.bn.running_var": np.full(2, 0.5), "g.bn.n": np.array(6),
           "d.w": np.full(2, 0.1)}  # fmt: skip
    opt = ServerOptimizer(kind="momentum", lr=3.0, stepped={"g.w"})
    out = opt.step(current, avg)
    np.testing.assert_allclose(out["g.w"], 0.3)  # stepped: lr x delta
    np.testing.assert_allclose(out["g.bn.running_var"], 0.5)  # a buffer: the average
    assert out["g.bn.n"] == 6 and out["g.bn.n"].dtype.kind == "i"
    np.testing.assert_allclose(out["d.w"], 0.1)  # not stepped: the average


def _keys(cfg: Config) -> ModelKeys:
    return ModelKeys.of(networks_for(cfg))


def test_model_keys_find_parameters_buffers_and_norm_layers(toy_config: Config) -> None:
    keys = _keys(toy_config)
    nets = networks_for(toy_config)
    state = pack_state(nets)
    assert keys.all == set(state)
    bn = [k for k in state if k.endswith("running_var")]
    assert bn and all(k in keys.norms and k not in keys.parameters for k in bn)
    # the DCGAN discriminator's GroupNorm is a norm layer too, with its affine weights
    group_norm = [m for m, mod in nets["discriminator"].named_modules()
                  if isinstance(mod, torch.nn.GroupNorm)]  # fmt: skip
    assert f"discriminator.{group_norm[0]}.weight" in keys.norms
    convs = [k for k in keys.parameters if k not in keys.norms]
    assert convs and all(state[k].dim() >= 2 for k in convs if k.endswith("weight"))


# --- what travels ---------------------------------------------------------------------------


def _plan(toy_config: Config, **fed) -> SharingPlan:
    cfg = with_changes(toy_config, federation=fed)
    return sharing_plan(cfg)


def test_a_local_discriminator_never_travels(toy_config: Config) -> None:
    plan = _plan(toy_config, share_discriminator=0)
    d_keys = plan.keys.networks["discriminator"]
    for r in range(1, 12):
        assert not (plan.sent(r) | plan.returned(r)) & d_keys
        assert plan.keys.networks["generator"] <= plan.sent(r) & plan.returned(r)
    assert plan.never_shared == d_keys


def test_discriminator_averaged_every_k_rounds(toy_config: Config) -> None:
    plan = _plan(toy_config, share_discriminator=3)
    d_keys = plan.keys.networks["discriminator"]
    sent = [r for r in range(1, 10) if d_keys <= plan.sent(r)]
    returned = [r for r in range(1, 10) if d_keys <= plan.returned(r)]
    assert returned == [3, 6, 9]
    assert sent == [1, 4, 7]  # each hospital resumes from the average it took part in
    everyone = _plan(toy_config)
    assert everyone.shares_everything and everyone.sent(5) == everyone.keys.all


def test_fedbn_never_sends_or_averages_the_discriminators_norm_layers(toy_config: Config) -> None:
    plan = _plan(toy_config, local_norm=True)
    d_norms = plan.keys.norms & plan.keys.networks["discriminator"]
    g_norms = plan.keys.norms & plan.keys.networks["generator"]
    assert d_norms and g_norms  # GroupNorm in D, BatchNorm in G
    for r in range(1, 6):
        assert not (plan.sent(r) | plan.returned(r)) & d_norms
        assert g_norms <= plan.sent(r) & plan.returned(r)  # the global G stays whole
    assert plan.never_shared == d_norms


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _reply(state: dict[str, torch.Tensor], hospital: int) -> Message:
    report = HospitalReport(hospital=hospital, num_examples=10, examples_seen=8, steps=1,
                            d_loss=0.0, g_loss=0.0, train_seconds=0.1)  # fmt: skip
    content = RecordDict({"arrays": to_arrays(state),
                          "metrics": MetricRecord(report.to_metrics())})  # fmt: skip
    return Message(content=content, dst_node_id=0, message_type="train")


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm"])
def test_the_server_sends_and_averages_only_shared_keys(toy_config: Config, strategy: str) -> None:
    cfg = resolve(with_changes(toy_config, federation={
        "strategy": strategy, "share_discriminator": 0, "local_norm": True,
        "num_hospitals": 2, "avgm_momentum": 0.5}))  # fmt: skip
    keys = _keys(cfg)
    plan = SharingPlan.from_config(cfg.federation, keys)
    srv = build_strategy(cfg.federation, keys=keys)
    initial = pack_state(networks_for(cfg))
    arrays = to_arrays(initial)
    messages = list(srv.configure_train(1, arrays, ConfigRecord({"round-offset": 0}),
                                        _Grid([11, 12])))  # fmt: skip
    assert len(messages) == 2
    for msg in messages:
        assert set(msg.content["arrays"]) == {PACKED_KEY}  # one array on the wire...
        assert set(unpack(msg.content["arrays"])) == plan.sent(1)  # ...of no D, no norm layer
    replies = []
    for i in range(len(messages)):
        trained = {k: v + (i + 1) * 0.1 if v.is_floating_point() else v for k, v in initial.items()}
        replies.append(_reply({k: v for k, v in trained.items() if k in plan.returned(1)}, i))
    out, _ = srv.aggregate_train(1, replies)
    merged = from_arrays(out)
    assert set(merged) == set(initial)  # the global model stays whole
    for k in plan.never_shared:  # what no hospital sent stays as it was
        assert torch.equal(merged[k], initial[k]), k
    shared = sorted(plan.returned(1) & keys.parameters)
    assert all(not torch.equal(merged[k], initial[k]) for k in shared)
    if strategy == "fedavg":
        np.testing.assert_allclose(merged[shared[0]], initial[shared[0]] + 0.15, rtol=1e-5)


# --- a hospital's kept weights and optimizer state --------------------------------------------


def _local_d(toy_config: Config):
    """A config with local discriminators, its plan, hospital 0's data, the initial weights
    and the part of them the server sends."""
    cfg = with_changes(toy_config, federation={"share_discriminator": 0})
    plan = sharing_plan(cfg)
    start = pack_state(networks_for(cfg))
    sent = {k: v for k, v in start.items() if k in plan.sent(1)}
    return cfg, plan, hospital_dataset(cfg.data, 0, 0, 3), start, sent


def test_a_hospital_trains_its_kept_discriminator(toy_config: Config) -> None:
    cfg, plan, ds, start, sent = _local_d(toy_config)
    first = local_round(cfg, ds, sent, None, round_=1, hospital=0)
    d_keys = plan.keys.networks["discriminator"]
    assert any(not torch.equal(first.state[k], start[k]) for k in d_keys)
    # next round: the server's generator, this hospital's own discriminator
    second = local_round(cfg, ds, sent, first.optimizer_state, round_=2, hospital=0,
                         kept_state=first.state)  # fmt: skip
    forgot = local_round(cfg, ds, sent, first.optimizer_state, round_=2, hospital=0)
    assert any(not torch.equal(second.state[k], forgot.state[k]) for k in d_keys)


def test_reset_optimizers_restarts_only_what_the_server_replaced(toy_config: Config) -> None:
    cfg, _, ds, _, sent = _local_d(toy_config)
    blob = None
    kept = None
    for r in (1, 2, 3):
        res = local_round(cfg, ds, sent, blob, round_=r, hospital=0, kept_state=kept,
                          reset_optimizers=True)  # fmt: skip
        blob, kept = res.optimizer_state, res.state
    steps = cfg.train.local_steps
    nets = networks_for(cfg)
    from fedgan.training import make_optimizers

    opts = make_optimizers(nets, cfg.train)
    restore_optimizers(opts, blob)
    assert optimizer_steps(opts["generator"]) == steps  # received every round: restarted
    assert optimizer_steps(opts["discriminator"]) == 3 * steps  # kept: continued
    keep = local_round(cfg, ds, sent, blob, round_=4, hospital=0, kept_state=kept)
    opts = make_optimizers(nets, cfg.train)
    restore_optimizers(opts, keep.optimizer_state)
    assert optimizer_steps(opts["generator"]) == 2 * steps  # kept from round 3


def test_bad_sharing_settings_are_refused() -> None:
    for setting, match in [
        ("federation.share_discriminator=-1", "share_discriminator"),
        ("federation.server_networks=critic", "server_networks"),
        ("federation.optimizer_state=forget", "optimizer_state"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_config(None, [setting])
    with pytest.raises(ValueError, match="share_discriminator=1"):
        resolve(load_config(None, ["privacy.mode=central-dp", "privacy.target_epsilon=10",
                                   "federation.share_discriminator=0"]))  # fmt: skip
