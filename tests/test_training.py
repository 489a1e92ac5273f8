"""The local loop, a hospital round and the centralized baseline."""

from __future__ import annotations

import io
import json

import pytest
import torch

from fedgan.config import Config, with_changes
from fedgan.data import hospital_dataset
from fedgan.models import build_networks, pack_state
from fedgan.rundir import RunDir
from fedgan.runs.centralized import steps_per_round, train_centralized
from fedgan.training.hospital import config_shape, local_round


def test_local_round_trains_and_keeps_optimizer_state(toy_config: Config) -> None:
    ds = hospital_dataset(toy_config.data, 0, 0, 3)
    start = pack_state(build_networks(toy_config.model, config_shape(toy_config), seed=0))
    first = local_round(toy_config, ds, start, None, round_=1, hospital=0)
    assert first.num_examples == len(ds)  # examples, not batches
    assert first.stats.steps == 2 and first.stats.examples == 16
    assert any(not torch.equal(start[k], first.state[k]) for k in start)
    again = local_round(toy_config, ds, start, None, round_=1, hospital=0)
    assert all(torch.equal(first.state[k], again.state[k]) for k in start)  # seeded
    resumed = local_round(toy_config, ds, start, first.optimizer_state, round_=1, hospital=0)
    assert any(not torch.equal(first.state[k], resumed.state[k]) for k in start)


def test_the_cosine_schedule_is_torchs_and_reaches_each_hospital_round(toy_config: Config) -> None:
    """``train.lr_schedule=cosine`` gives round r the rate torch's own CosineAnnealingLR gives
    epoch r - 1 (an independent implementation); a hospital's round trains at it even when its
    optimizer state, which carries last round's rate, is restored."""
    from fedgan.training import round_lr_scale

    rounds, final = 7, 0.2
    cfg = with_changes(toy_config, train={"lr_schedule": "cosine", "lr_final": final},
                       federation={"num_rounds": rounds})  # fmt: skip
    lr = cfg.train.lr_g
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=rounds - 1, eta_min=lr * final)
    for r in range(1, rounds + 1):
        assert lr * round_lr_scale(cfg.train, r, rounds) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert round_lr_scale(toy_config.train, 5, rounds) == 1.0  # constant: the default

    ds = hospital_dataset(cfg.data, 0, 0, 3)
    start = pack_state(build_networks(cfg.model, config_shape(cfg), seed=0))
    first = local_round(cfg, ds, start, None, round_=1, hospital=0)
    last = local_round(cfg, ds, first.state, first.optimizer_state, round_=rounds, hospital=0)
    for result, scale in ((first, 1.0), (last, final)):
        saved = torch.load(io.BytesIO(result.optimizer_state), weights_only=True)
        assert saved["generator"]["param_groups"][0]["lr"] == pytest.approx(lr * scale)
        assert saved["discriminator"]["param_groups"][0]["lr"] == pytest.approx(
            cfg.train.lr_d * scale
        )


def test_local_round_rejects_mismatched_images(toy_config: Config) -> None:
    ds = hospital_dataset(toy_config.data, 0, 0, 3)
    bigger = with_changes(toy_config, data={"image_size": 32})
    start = pack_state(build_networks(bigger.model, config_shape(bigger), seed=0))
    with pytest.raises(ValueError, match="data.image_size"):
        local_round(bigger, ds, start, None, round_=1, hospital=0)


def test_centralized_run_dir_and_matched_compute(toy_config: Config) -> None:
    summary = train_centralized(toy_config, log=lambda _: None)
    rd = RunDir(toy_config.run_dir)
    records = rd.read_metrics()
    assert [r["round"] for r in records] == [1, 2]
    # the pooled run sees what all hospitals see in a federated round
    per_round = steps_per_round(toy_config) * toy_config.train.batch_size
    assert all(r["aggregate"]["examples_seen"] == per_round for r in records)
    assert summary["examples_seen"] == 2 * per_round
    assert (rd.samples / "round_0002.png").exists()
    assert json.loads(rd.summary_path.read_text())["rounds"] == 2
    assert rd.load_checkpoint()["round"] == 2
    with pytest.raises(FileExistsError, match="run.resume=true"):
        train_centralized(toy_config, log=lambda _: None)


def test_centralized_resumes_after_a_crash(toy_config: Config) -> None:
    two = with_changes(toy_config, federation={"num_rounds": 2})
    train_centralized(two, log=lambda _: None)
    more = with_changes(toy_config, federation={"num_rounds": 3}, run={"resume": True})
    train_centralized(more, log=lambda _: None)
    records = RunDir(toy_config.run_dir).read_metrics()
    assert [r["round"] for r in records] == [1, 2, 3]


@pytest.mark.parametrize("schedule", ["fixed", "adaptive"])
def test_a_resumed_pooled_run_ends_as_the_uninterrupted_one(
    toy_config: Config, schedule: str
) -> None:
    """The checkpoint keeps the Adam moments and the critic schedule, so stopping after round
    2 and resuming gives round 3's weights bit for bit (fresh optimizers would not)."""
    cfg = with_changes(toy_config, train={"critic_schedule": schedule, "critic_grace": 1})
    straight = with_changes(cfg, run={"name": "straight"}, federation={"num_rounds": 3})
    train_centralized(straight, log=lambda _: None)
    train_centralized(with_changes(cfg, federation={"num_rounds": 2}), log=lambda _: None)
    resumed = with_changes(cfg, federation={"num_rounds": 3}, run={"resume": True})
    train_centralized(resumed, log=lambda _: None)
    a = RunDir(straight.run_dir).load_checkpoint()
    b = RunDir(cfg.run_dir).load_checkpoint()
    assert a["round"] == b["round"] == 3
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    last = [RunDir(c.run_dir).read_metrics()[-1]["aggregate"] for c in (straight, cfg)]
    assert last[0]["d_loss"] == last[1]["d_loss"]
