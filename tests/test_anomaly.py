"""Anomaly detection (f-AnoGAN): healthy-only training data, the encoder's phase, Dice/IoU
against an independent implementation, the threshold chosen on validation images, scores that
rank a lesion above its healthy twin, the encoder through every strategy, the evaluator, and
`fedgan detect` on PNG, DICOM and NIfTI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedgan.config import load_config
from fedgan.data import eval_dataset, eval_masks, hospital_dataset, pooled_dataset
from fedgan.evaluation import functional as fn
from fedgan.experiment import resolve
from fedgan.federated.strategies import STRATEGIES
from fedgan.models import load_state, pack_state
from fedgan.training import make_objective, networks_for

TOY = ["task.name=anomaly", "data.train_label=0", "data.image_size=16", "data.num_images=160",
       "model.base_channels=8", "model.latent_dim=16", "train.batch_size=16"]  # fmt: skip


def test_dice_and_iou_match_sklearn_and_hand_made_cases() -> None:
    from sklearn.metrics import f1_score, jaccard_score

    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        pred = torch.rand(3, 1, 8, 8, generator=g) > 0.6
        target = torch.rand(3, 1, 8, 8, generator=g) > 0.7
        p, t = pred.flatten().numpy(), target.flatten().numpy()
        assert fn.dice(pred, target) == pytest.approx(f1_score(t, p))
        assert fn.iou(pred, target) == pytest.approx(jaccard_score(t, p))
    m = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    m[0, 0, :2] = True  # 8 pixels
    half = torch.zeros_like(m)
    half[0, 0, 1:3] = True  # 4 of them, plus 4 others
    assert fn.dice(m, m) == 1.0 and fn.iou(m, m) == 1.0
    assert fn.dice(m, ~m) == 0.0 and fn.iou(m, ~m) == 0.0
    assert fn.dice(half, m) == pytest.approx(0.5) and fn.iou(half, m) == pytest.approx(1 / 3)
    assert fn.dice(m & False, m & False) == 1.0  # nothing to find, nothing found


def test_best_threshold_recovers_a_planted_region() -> None:
    g = torch.Generator().manual_seed(1)
    masks = torch.zeros(10, 1, 16, 16)
    masks[:, :, 4:8, 5:9] = 1
    maps = 0.3 * torch.rand(masks.shape, generator=g) + 0.5 * masks
    t = fn.best_threshold(maps, masks)
    assert 0.3 <= t < 0.5 + 1e-6
    assert fn.dice(maps > t, masks) == 1.0


def test_top_score_is_the_mean_of_the_largest_pixels() -> None:
    from fedgan.evaluation.anomaly import top_score

    maps = torch.rand(6, 1, 20, 20, generator=torch.Generator().manual_seed(3))
    flat = np.sort(maps.flatten(1).numpy(), axis=1)[:, ::-1]
    assert torch.allclose(top_score(maps), torch.from_numpy(flat[:, :4].mean(1).copy()))
    assert torch.allclose(top_score(maps[:, :, :5, :5]), maps.flatten(1).new_tensor(
        [m[:, :5, :5].max() for m in maps]))  # fmt: skip


def test_the_shift_tolerant_residual_forgives_a_one_pixel_miss_and_keeps_a_spot() -> None:
    from fedgan.data.degrade import shift_tolerant_residual

    g = torch.Generator().manual_seed(4)
    x, rec = torch.rand(3, 2, 9, 11, generator=g), torch.rand(3, 2, 9, 11, generator=g)
    assert torch.equal(shift_tolerant_residual(x, rec), (x - rec).abs().mean(1, keepdim=True))
    # written out pixel by pixel: the smallest channel-mean residual over the 3x3 shifts,
    # the reconstruction's edge pixels repeated beyond the border
    padded = np.pad(rec.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    want = np.full((3, 1, 9, 11), np.inf)
    for i in range(9):
        for j in range(11):
            for dy in range(3):
                for dx in range(3):
                    d = np.abs(x.numpy()[:, :, i, j] - padded[:, :, i + dy, j + dx]).mean(1)
                    want[:, 0, i, j] = np.minimum(want[:, 0, i, j], d)
    assert np.allclose(shift_tolerant_residual(x, rec, 1).numpy(), want, atol=1e-6)
    # a disc drawn one pixel off: its edge is residual for the plain map, nothing for shift 1
    disc, _ = _discs(1, 0)
    moved = torch.roll(disc, 1, dims=-1)
    assert (disc - moved).abs().sum() > 5 and shift_tolerant_residual(disc, moved, 1).max() == 0
    # a spot the reconstruction does not draw stays whole
    spot = torch.zeros(1, 1, 16, 16)
    spot[..., 7:9, 7:9] = 1.0
    kept = shift_tolerant_residual(spot, torch.zeros_like(spot), 2)
    assert torch.equal(kept, spot)
    with pytest.raises(ValueError, match="shift"):
        shift_tolerant_residual(x, rec, -1)


def test_the_map_shift_reaches_fedgans_map_and_every_method_chooses_on_validation(
    trained, tmp_path: Path
) -> None:
    from fedgan.data.degrade import shift_tolerant_residual
    from fedgan.evaluation.anomaly import (
        AnomalyEvaluator,
        load_stats,
        mean_image_detector,
        pca_detector,
    )

    for bad in ("-1", "4"):
        with pytest.raises(ValueError, match="task.map_shift"):
            load_config(None, [*TOY, f"task.map_shift={bad}"])
    cfg = resolve(load_config(None, [*TOY, "data.source=phantom", "task.map_shift=1"]))
    objective = make_objective(cfg)
    nets = networks_for(cfg, objective)
    images = _discs(8, 1, lesion=True)[0]
    _, maps, rec = objective.anomaly_maps(nets, images)  # type: ignore[attr-defined]
    assert torch.allclose(maps, shift_tolerant_residual(images, rec, 1))
    assert not torch.allclose(maps, (images - rec).abs())  # untrained: the shift changes it

    evaluator = AnomalyEvaluator(cfg, tmp_path, objective)  # type: ignore[arg-type]
    chosen = evaluator.baselines()
    healthy = evaluator._healthy_reference()
    makers = {"mean": lambda k: mean_image_detector(healthy, k),
              "pca": lambda k: pca_detector(healthy, seed=cfg.run.seed, shift=k)}  # fmt: skip
    for name, make in makers.items():
        each = [evaluator._score(make(k))[0] for k in (0, 1)]
        shift = int(chosen[name]["anomaly_map_shift"])
        assert chosen[name]["anomaly_auc"] == each[shift]["anomaly_auc"]
        assert each[shift]["anomaly_val_auc"] >= each[1 - shift]["anomaly_val_auc"]
        if each[0]["anomaly_val_auc"] == each[1]["anomaly_val_auc"]:
            assert shift == 0  # a tie keeps the plain map
    # fedgan chooses the same way (here with the trained toy's networks), and keeps the
    # statistics of the map it chose
    state = torch.load(trained[1] / "checkpoints" / "round_0002.pt", weights_only=True)["state"]
    result = evaluator.metrics(3, state)
    each = [evaluator._score(evaluator.detector(state, k)) for k in (0, 1)]
    shift = int(result["anomaly_map_shift"])
    assert result["anomaly_auc"] == each[shift][0]["anomaly_auc"]
    assert each[shift][0]["anomaly_val_auc"] >= each[1 - shift][0]["anomaly_val_auc"]
    kept = load_stats(tmp_path / "round_0003.healthy.pt")
    assert torch.allclose(kept[0], each[shift][2][0]) and torch.allclose(kept[1], each[shift][2][1])
    assert not torch.allclose(kept[0], each[1 - shift][2][0])


def _halves(kind: str, seed: int) -> tuple[tuple[dict[str, torch.Tensor], torch.Tensor],
                                           torch.Tensor]:  # fmt: skip
    """``(({"own": ..., "critic": ...}, smoothed maps), labels)`` of 40 images, half
    abnormal; the one named by ``kind`` tells the classes apart, the others are noise:
    ``focal``, an abnormal map has a bright 2x2 spot; ``diffuse``, the own score;
    ``critic``, the critic's score; ``edge``, every map has a brighter, varying "organ
    edge" in its corner, and an abnormal one a fainter 2x2 spot (what only ``ztop`` sees);
    ``healthy``, ``edge``'s maps with no abnormal one (its healthy statistics)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(40) % 2 * int(kind != "healthy")
    maps = 0.3 * torch.rand(40, 1, 16, 16, generator=g)
    scores = {"own": torch.rand(40, generator=g), "critic": torch.rand(40, generator=g)}
    if kind in ("edge", "healthy"):
        maps[:, :, :3, :3] += 1.0 + 0.5 * torch.rand(40, 1, 1, 1, generator=g)
        maps[labels == 1, :, 8:10, 8:10] += 0.5
    elif kind == "focal":
        maps[labels == 1, :, 5:7, 5:7] += 1.0
    else:
        scores["own" if kind == "diffuse" else "critic"] += labels
    return (scores, maps), labels


def test_the_image_score_is_chosen_on_the_validation_half() -> None:
    from sklearn.metrics import roc_auc_score

    from fedgan.evaluation.anomaly import SCORE_RULES, detection_scores, healthy_stats

    def top2(maps: torch.Tensor) -> torch.Tensor:  # top 1 % of 256 pixels: the largest 2
        return torch.tensor([np.sort(m.flatten().numpy())[-2:].mean() for m in maps])

    healthy = _halves("healthy", 9)[0][1]
    mean, std = healthy.mean(0, keepdim=True), healthy.std(0, keepdim=True)
    stats = healthy_stats(healthy)
    assert torch.allclose(stats[0], mean) and torch.allclose(stats[1], std)

    def z(maps: torch.Tensor) -> torch.Tensor:  # written out: (m - mean) / (std + 10 %), >= 0
        return torch.from_numpy(np.maximum(((maps - mean) / (std + 0.1 * std.mean())).numpy(), 0))

    kinds = (("diffuse", 0.0), ("focal", 1.0), ("critic", 2.0), ("edge", 3.0))
    for kind, rule in kinds:
        val, val_labels = _halves(kind, 0)
        test, test_labels = _halves(kind, 1)
        out = detection_scores(val, test, test_labels, None, None, val_labels, stats)
        assert SCORE_RULES[int(out["anomaly_score_rule"])] == {
            "diffuse": "own", "focal": "top", "critic": "critic", "edge": "ztop"}[kind]  # fmt: skip
        top = top2(test[1])
        chosen = [test[0]["own"], top, test[0]["critic"], top2(z(test[1]))][int(rule)]
        assert out["anomaly_auc"] == pytest.approx(roc_auc_score(test_labels, chosen))
        own = test[0]["own"]
        assert out["anomaly_auc_own"] == pytest.approx(roc_auc_score(test_labels, own))
        # the figure eval.select may choose a round by: the chosen score on validation only
        val_chosen = [val[0]["own"], top2(val[1]), val[0]["critic"], top2(z(val[1]))][int(rule)]
        assert out["anomaly_val_auc"] == pytest.approx(roc_auc_score(val_labels, val_chosen))
        assert out["anomaly_auc"] > 0.95
        # the test half's labels never choose: the same rule with them scrambled
        scrambled = test_labels[torch.randperm(40, generator=torch.Generator().manual_seed(2))]
        again = detection_scores(val, test, scrambled, None, None, val_labels, stats)
        assert again["anomaly_score_rule"] == rule
    # without healthy statistics ztop is not offered: the edge hides the spot from top
    edge, labels = _halves("edge", 0)
    plain = detection_scores(edge, _halves("edge", 1)[0], labels, None, None, labels)
    assert plain["anomaly_score_rule"] != 3.0 and plain["anomaly_auc"] < 0.8
    focal, labels = _halves("focal", 0)
    one_class = detection_scores(focal, focal, labels, None, None, torch.zeros(40).long())
    assert one_class["anomaly_score_rule"] == 0.0  # nothing to choose on: the own score
    assert one_class["anomaly_auc"] == one_class["anomaly_auc_own"]
    assert "anomaly_val_auc" not in one_class  # undefined on one class: nothing to choose by
    assert detection_scores(focal, focal, labels, None, None)["anomaly_score_rule"] == 0.0
    # a baseline offers its own score alone (a tensor): the critic is never chosen for it
    critic, labels = _halves("critic", 0)
    own_only = (critic[0]["own"], critic[1])
    assert detection_scores(own_only, own_only, labels, None, None, labels)[
        "anomaly_score_rule"] in (0.0, 1.0)  # fmt: skip


def test_the_critic_score_is_minus_the_discriminator() -> None:
    cfg = load_config(None, TOY)
    objective = make_objective(cfg)
    nets = networks_for(cfg, objective)
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    expected = -nets["discriminator"].eval()(x).flatten()
    got = objective.critic_scores(nets, x, batch=2)  # type: ignore[attr-defined]
    assert torch.allclose(got, expected, atol=1e-6)


def test_training_sees_the_healthy_label_only_and_evaluation_sees_all() -> None:
    cfg = load_config(None, TOY).data
    for h in range(2):
        assert set(hospital_dataset(cfg, 0, h, 2).tensors[1].tolist()) == {0}
    pooled = pooled_dataset(cfg, 0, 2)
    everything = pooled_dataset(load_config(None, TOY[2:4]).data, 0, 2)
    assert len(pooled) == int((everything.tensors[1] == 0).sum())
    labels = eval_dataset(cfg, 0, 2).tensors[1]
    assert set(labels.tolist()) == {0, 1}
    masks = eval_masks(cfg, 0)
    assert masks is not None and len(masks) == len(labels)
    assert bool(masks[labels == 0].sum() == 0) and bool(
        (masks[labels == 1].sum((1, 2, 3)) > 0).all()
    )


def test_anomaly_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="data.train_label"):
        resolve(load_config(None, ["task.name=anomaly"]))
    with pytest.raises(ValueError, match="model.family.*dcgan or wgan-gp"):
        resolve(load_config(None, [*TOY, "model.family=sngan"]))
    with pytest.raises(ValueError, match="train.critic_schedule"):
        resolve(load_config(None, [*TOY, "privacy.mode=dp-sgd", "privacy.target_epsilon=3",
                                   "train.critic_schedule=adaptive"]))  # fmt: skip
    with pytest.raises(ValueError, match="model.family.*cannot be trained with DP-SGD"):
        resolve(load_config(None, [*TOY, "privacy.mode=dp-sgd", "privacy.target_epsilon=3",
                                   "model.family=wgan-gp"]))  # fmt: skip
    with pytest.raises(ValueError, match="data.train_label"):
        load_config(None, ["data.train_label=-2"])
    with pytest.raises(ValueError, match="eval.select.*choose anomaly_val_auc"):
        resolve(load_config(None, [*TOY, "eval.select=anomaly_auc"]))  # a test figure
    with pytest.raises(ValueError, match="eval.select.*measures none"):
        resolve(load_config(None, ["eval.select=anomaly_val_auc"]))  # synthesis has none


def test_encoder_step_trains_the_encoder_only() -> None:
    from fedgan.training.loop import make_optimizers, phase_step
    from fedgan.training.objectives.base import StepContext

    cfg = load_config(None, TOY)
    objective = make_objective(cfg)
    nets = networks_for(cfg, objective)
    assert nets["encoder"](torch.zeros(2, 1, 16, 16)).shape == (2, 16)
    before = {k: v.clone() for k, v in pack_state(nets).items()}
    ctx = StepContext.seeded(0, torch.device("cpu"))
    real = hospital_dataset(cfg.data, 0, 0, 2).tensors[0][:8]
    batch = objective.make_batch(real, torch.zeros(8, dtype=torch.long), None, ctx)
    loss = phase_step(objective, objective.phase("E"), nets, make_optimizers(nets, cfg.train),
                      batch, ctx)  # fmt: skip
    assert float(loss) > 0
    after = pack_state(nets)
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"encoder"}  # generator weights and BatchNorm statistics untouched


def test_private_rounds_charge_the_discriminator_and_encoder_steps(independent_epsilon) -> None:
    """Under DP-SGD both data-reading phases are private and charged: n_critic D steps and one
    E step per iteration; Google's PLD accountant agrees with the reported epsilon, the
    budget is never passed, and the loss on real images stays at the hospital."""
    from fedgan.training.hospital import local_round

    cfg = resolve(load_config(None, [*TOY, "privacy.mode=dp-sgd", "privacy.target_epsilon=5",
                                     "train.local_steps=3", "federation.num_rounds=2",
                                     "federation.num_hospitals=2"]))  # fmt: skip
    objective = make_objective(cfg)
    assert objective.critic_schedule() is None
    n_d = objective.phase("D").repeats
    assert n_d >= 3 and objective.private_steps(3) == 3 * (n_d + 1)
    ds = hospital_dataset(cfg.data, 0, 0, 2)
    state = pack_state(networks_for(cfg, objective))
    acc, opt = None, None
    for r in (1, 2):
        res = local_round(cfg, ds, state, opt, round_=r, hospital=0, accountant=acc)
        changed = {k.split(".")[0] for k in res.state if not torch.equal(res.state[k], state[k])}
        assert {"discriminator", "encoder", "generator"} <= changed
        acc, opt, state = res.accountant, res.optimizer_state, res.state
        assert np.isnan(res.stats.d_loss)  # the loss on real images is not released
    p = res.privacy
    assert p["dp_steps"] == 2 * 3 * (n_d + 1)
    pld = independent_epsilon(p["noise_multiplier"], p["sample_rate"], p["dp_steps"], p["delta"])
    assert pld - 0.02 <= p["epsilon"] <= pld + 0.02
    assert 4.0 < p["epsilon"] <= 5.0  # calibrated for both phases' steps, and not passed


def _twins(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phantoms rendered without and with a nodule: the same anatomy, and the nodule's mask."""
    from fedgan.data.phantom import render_phantoms_with_masks

    healthy, _, _ = render_phantoms_with_masks(n, size, seed=77, lesion_fraction=0.0)
    sick, _, masks = render_phantoms_with_masks(n, size, seed=77, lesion_fraction=1.0)
    return healthy * 2 - 1, sick * 2 - 1, masks


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple:
    """A toy anomaly run: 160 steps on healthy 16 px phantoms, pooled."""
    from fedgan.runs.centralized import train_centralized

    out = tmp_path_factory.mktemp("anomaly")
    cfg = resolve(load_config(None, [*TOY, "train.local_steps=40", "federation.num_rounds=2",
                                     "federation.num_hospitals=2", f"run.output_dir={out}",
                                     "run.name=toy", "eval.background=false",
                                     "eval.select=anomaly_val_auc"]))  # fmt: skip
    train_centralized(cfg, log=lambda _: None)
    return cfg, out / "toy"


def _discs(n: int, seed: int, lesion: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-made 16 px "anatomy": a grey disc of varying brightness on black; a lesion is a
    bright 3x3 square inside it. Returns ``(images in [-1, 1], lesion masks)``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(16).float()
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    disc = (((yy - 7.5) ** 2 + (xx - 7.5) ** 2) < 36).float()
    level = 0.4 + 0.2 * torch.rand(n, 1, 1, 1, generator=g)
    images = disc * level
    masks = torch.zeros(n, 1, 16, 16)
    if lesion:
        for i in range(n):
            y, x = torch.randint(5, 9, (2,), generator=g).tolist()
            masks[i, 0, y : y + 3, x : x + 3] = 1
        images = images * (1 - masks) + masks
    return images * 2 - 1, masks


def test_a_lesion_scores_above_its_healthy_twin() -> None:
    from torch.utils.data import TensorDataset

    from fedgan.training.hospital import local_round

    cfg = load_config(None, [*TOY, "train.local_steps=300", "model.base_channels=16"])
    objective = make_objective(cfg)
    nets = networks_for(cfg, objective)
    healthy, _ = _discs(256, 0)
    data = TensorDataset(healthy, torch.zeros(len(healthy), dtype=torch.long))
    result = local_round(cfg, data, pack_state(nets), None, round_=1, hospital=0)
    load_state(nets, result.state)
    twins, _ = _discs(32, 5)
    sick, masks = _discs(32, 5, lesion=True)  # the same discs (same seed), with a lesion
    s_healthy, _, _ = objective.anomaly_maps(nets, twins)  # type: ignore[attr-defined]
    s_sick, maps, _ = objective.anomaly_maps(nets, sick)  # type: ignore[attr-defined]
    assert bool((s_sick > s_healthy).all()), s_sick - s_healthy
    assert maps[masks > 0].mean() > 3 * maps[masks == 0].mean()  # the residual is the lesion


def test_the_evaluator_scores_fedgan_and_both_baselines(trained) -> None:
    _, run = trained
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ev = records[-1]["eval"]
    for method in ("", "mean_", "pca_"):
        for key in ("anomaly_auc", "anomaly_ap", "anomaly_auc_own", "anomaly_auc_map",
                    "anomaly_dice", "anomaly_iou"):  # fmt: skip
            assert 0.0 <= ev[f"{method}{key}"] <= 1.0, f"{method}{key}"
        assert ev[f"{method}anomaly_score_rule"] in ((0.0, 1.0, 2.0, 3.0) if method == ""
                                                     else (0.0, 1.0, 3.0))  # fmt: skip
        if ev[f"{method}anomaly_score_rule"] == 0.0:
            assert ev[f"{method}anomaly_auc"] == ev[f"{method}anomaly_auc_own"]
    assert ev["anomaly_auc_gain"] == pytest.approx(
        ev["anomaly_auc"] - max(ev["mean_anomaly_auc"], ev["pca_anomaly_auc"])
    )
    from fedgan.evaluation.anomaly import load_stats

    for round_ in (1, 2):  # each evaluation keeps fedgan's healthy statistics for detect
        mean, std = load_stats(run / "samples" / f"round_{round_:04d}.healthy.pt")
        assert mean.shape == std.shape == (1, 1, 16, 16) and bool((std > 0).all())
    columns = (run / "samples" / "round_0002.columns.txt").read_text().strip()
    assert columns == "input | reconstruction | fedgan map | mean map | pca map | lesion"
    from fedgan.evaluation.metrics import direction

    assert direction("pca_anomaly_dice") == "higher" and direction("anomaly_auc_gain") == "higher"


@pytest.mark.parametrize("strategy_name", STRATEGIES.names())
def test_the_encoder_federates_under_every_strategy(strategy_name: str, monkeypatch) -> None:
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedgan.federated.records import from_arrays, to_arrays
    from fedgan.federated.strategies import build_strategy
    from fedgan.runs.records import HospitalReport

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    n = 7  # enough for bulyan's quorum with one Byzantine hospital
    cfg = load_config(None, [*TOY, f"federation.strategy={strategy_name}",
                             f"federation.num_hospitals={n}"])  # fmt: skip
    common = pack_state(networks_for(cfg))
    states = []
    for i in range(n):
        s = dict(common)
        s.update({k: v + 0.01 * i for k, v in common.items()
                  if k.startswith("generator.") and v.is_floating_point()})  # fmt: skip
        states.append(s)
    strategy = build_strategy(cfg.federation)
    if hasattr(strategy, "current_arrays"):
        strategy.current_arrays = {k: v.numpy() for k, v in common.items()}

    def reply(state, i):  # type: ignore[no-untyped-def]
        report = HospitalReport(hospital=i, num_examples=10, examples_seen=8, steps=1,
                                d_loss=0.0, g_loss=0.0, train_seconds=0.1)  # fmt: skip
        content = RecordDict({"arrays": to_arrays(state),
                              "metrics": MetricRecord(report.to_metrics())})  # fmt: skip
        return Message(content=content, dst_node_id=0, message_type="train")

    arrays, _ = strategy.aggregate_train(1, [reply(s, i) for i, s in enumerate(states)])
    merged = from_arrays(arrays)
    encoder = [k for k in common if k.startswith("encoder.")]
    assert encoder and set(merged) == set(common)
    for k in encoder:  # every hospital sent the same encoder: it comes back as it went
        assert torch.allclose(merged[k].float(), common[k].float(), atol=1e-6), k
    nets = networks_for(cfg)
    load_state(nets, merged)


def test_detect_on_png_dicom_and_nifti(trained, tmp_path: Path, capsys) -> None:
    import nibabel as nib
    from PIL import Image
    from pydicom.data import get_testdata_file

    from fedgan.cli import main

    _, run = trained
    _, sick, _ = _twins(2, 16)
    src = tmp_path / "in"
    src.mkdir()
    for i, img in enumerate(sick):
        Image.fromarray(((img[0] + 1) * 127.5).round().byte().numpy()).save(src / f"p{i}.png")

    def detect(source: Path, out: str) -> int:
        return main(["detect", "--run", str(run), "--input", str(source),
                     "--out", str(tmp_path / out)])  # fmt: skip

    assert detect(src, "png") == 0
    rows = list(csv.DictReader((tmp_path / "png" / "scores.csv").open()))
    assert [r["file"] for r in rows] == ["p0.png", "p1.png"]
    assert all(float(r["score"]) > 0 for r in rows)
    from fedgan.evaluation.anomaly import SCORE_RULES

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the round with the highest validation AUC (the earliest on a tie), found here from the
    # lines, is the one checkpoints/best names, summary.json reports and detect applies
    aucs = [r["eval"]["anomaly_val_auc"] for r in records]
    best = records[aucs.index(max(aucs))]
    pointer = json.loads((run / "checkpoints" / "best").read_text())
    assert pointer["round"] == best["round"] and pointer["value"] == max(aucs)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selected"]["round"] == best["round"]
    assert summary["selected"]["eval"] == best["eval"]
    assert f"with round {best['round']}'s detector" in capsys.readouterr().out
    rule = int(best["eval"]["anomaly_score_rule"])
    assert {r["rule"] for r in rows} == {SCORE_RULES[rule]}  # the rule the evaluation chose
    # ztop, applied with the statistics the evaluation kept (and refused without them)
    from fedgan.evaluation.anomaly import load_stats, smooth_map, standardize, top_score
    from fedgan.runs.apply import detect_files

    cfg, _ = trained
    ckpt = torch.load(run / "checkpoints" / "round_0002.pt", weights_only=True)
    with pytest.raises(ValueError, match="healthy statistics"):
        detect_files(cfg, ckpt["state"], src, tmp_path / "z0", rule=3)
    assert not (tmp_path / "z0").exists()
    stats = load_stats(run / "samples" / "round_0002.healthy.pt")
    got = detect_files(cfg, ckpt["state"], src, tmp_path / "z", rule=3, stats=stats)
    objective = make_objective(cfg)
    nets = objective.build()
    load_state(nets, ckpt["state"])
    images = torch.stack([torch.from_numpy(np.array(Image.open(src / f"p{i}.png"))).float()
                          / 127.5 - 1 for i in range(2)]).unsqueeze(1)  # fmt: skip
    _, maps, _ = objective.anomaly_maps({k: v.eval() for k, v in nets.items()}, images)
    want = top_score(standardize(smooth_map(maps), stats))
    assert [score for _, score in got] == pytest.approx(want.tolist(), rel=1e-4)
    assert main(["detect", "--run", str(run), "--input", str(src), "--checkpoint", "latest",
                 "--out", str(tmp_path / "last")]) == 0  # fmt: skip
    assert "with round 2's detector;" in capsys.readouterr().out
    # a round that released an average (eval.average_rounds) says which rounds it holds
    averaged = {**ckpt, "meta": {**ckpt.get("meta", {}), "average_of_rounds": [1, 2]}}
    file = run / "checkpoints" / "averaged.pt"
    torch.save(averaged, file)
    assert main(["detect", "--run", str(run), "--input", str(src), "--checkpoint", str(file),
                 "--out", str(tmp_path / "avg")]) == 0  # fmt: skip
    assert "with round 2's detector (the mean of rounds 1-2's weights)" in capsys.readouterr().out
    file.unlink()
    overlay = np.asarray(Image.open(tmp_path / "png" / "p0.png"))
    assert overlay.shape == (16, 16, 3)
    ct = get_testdata_file("CT_small.dcm")
    assert ct is not None
    assert detect(Path(ct), "dcm") == 0 and (tmp_path / "dcm" / "CT_small.png").exists()
    vol = np.zeros((12, 12, 2), dtype=np.float32)
    vol[2:10, 2:10, :] = 5.0
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    assert detect(tmp_path / "v.nii.gz", "nii") == 0
    assert sorted(p.name for p in (tmp_path / "nii").iterdir()) == [
        "scores.csv",
        "v_s000.png",
        "v_s001.png",
    ]
    other = load_config(None, ["data.image_size=16", "data.num_images=64",
                               "model.base_channels=8", "train.batch_size=8",
                               "train.local_steps=1", "federation.num_rounds=1",
                               f"run.output_dir={tmp_path}", "run.name=gan"])  # fmt: skip
    from fedgan.runs.centralized import train_centralized

    train_centralized(other, log=lambda _: None)
    assert main(["detect", "--run", str(other.run_dir), "--input", str(src),
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "task anomaly" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_detect_draws_the_map_its_evaluation_measured(trained, tmp_path: Path, capsys) -> None:
    """A `fedgan evaluate --set task.map_shift=1` measures a shift-tolerant map and keeps its
    healthy statistics and threshold; detect on that round then draws that map, not the
    config's plain one (whose statistics would no longer match)."""
    from dataclasses import replace

    from PIL import Image

    from fedgan.cli import main
    from fedgan.evaluation.anomaly import load_stats
    from fedgan.runs.apply import detect_files

    cfg, run = trained
    src = tmp_path / "in"
    src.mkdir()
    for i, img in enumerate(_twins(2, 16)[1]):
        Image.fromarray(((img[0] + 1) * 127.5).round().byte().numpy()).save(src / f"p{i}.png")
    ckpt_path = run / "checkpoints" / "round_0002.pt"
    assert main(["evaluate", "--run", str(run), "--checkpoint", str(ckpt_path),
                 "--set", "task.map_shift=1"]) == 0  # fmt: skip
    capsys.readouterr()
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["eval"]
    assert record["anomaly_map_shift"] == 1.0
    assert main(["detect", "--run", str(run), "--input", str(src), "--checkpoint",
                 str(ckpt_path), "--out", str(tmp_path / "d")]) == 0  # fmt: skip
    got = [float(r["score"]) for r in csv.DictReader((tmp_path / "d" / "scores.csv").open())]
    ckpt = torch.load(ckpt_path, weights_only=True)
    stats = load_stats(run / "samples" / "round_0002.healthy.pt")
    chosen = {"threshold": record["anomaly_threshold"],
              "rule": int(record["anomaly_score_rule"]), "stats": stats}  # fmt: skip
    shifted = replace(cfg, task=replace(cfg.task, map_shift=1))
    want = detect_files(shifted, ckpt["state"], src, tmp_path / "w", **chosen)
    plain = detect_files(cfg, ckpt["state"], src, tmp_path / "p", **chosen)
    assert got == pytest.approx([s for _, s in want], rel=1e-5)
    assert [s for _, s in plain] != pytest.approx(got, rel=1e-3)  # the shift changes scores


@pytest.mark.slow
def test_federated_rounds_of_anomaly_detection(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "fedgan.cli", "simulate"]
    for o in (f"run.output_dir={tmp_path}", "run.name=ad", *TOY, "federation.num_hospitals=2",
              "federation.num_rounds=2", "train.local_steps=2"):  # fmt: skip
        args += ["--set", o]
    res = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "ad" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert {"anomaly_auc", "anomaly_dice", "pca_anomaly_auc"} <= set(records[-1]["eval"])
    ckpt = torch.load(tmp_path / "ad" / "checkpoints" / "round_0002.pt", weights_only=True)
    assert {k.split(".")[0] for k in ckpt["state"]} == {"generator", "discriminator", "encoder"}
