"""The one objective abstraction and the one loop: DP-SGD for the image-to-image tasks,
FedProx's proximal term, and the loop's batch policy."""

from __future__ import annotations

import math

import pytest
import torch

from fedgan.config import Config, load_config, with_changes
from fedgan.data import hospital_dataset
from fedgan.experiment import resolve
from fedgan.models import pack_state
from fedgan.privacy.per_sample import GaussianMechanism, clipped_sum
from fedgan.training import (
    ProximalTerm,
    StepContext,
    make_objective,
    make_optimizers,
    networks_for,
    phase_step,
    shuffled_batches,
    train,
)
from fedgan.training.hospital import local_round

I2I = {
    "enhance": [],
    "super-resolution": ["task.scale=2", "task.relativistic=false"],
    "translate": [],
}
EXTRA = {**I2I, "anomaly": ["data.train_label=0"]}


def _cfg(task: str, *extra: str) -> Config:
    return resolve(
        load_config(
            None,
            [
                f"task.name={task}",
                *EXTRA.get(task, []),
                "data.image_size=16",
                "data.num_images=64",
                "model.base_channels=4",
                "train.batch_size=4",
                "train.local_steps=2",
                "federation.num_hospitals=2",
                *extra,
            ],
        )
    )


def _batch(task: str, cfg: Config, rows: int = 5):
    objective = make_objective(cfg)
    ctx = StepContext.seeded(3, torch.device("cpu"))
    real = torch.rand(rows, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return objective, objective.make_batch(real, torch.zeros(rows), None, ctx), ctx


def _independent_clipped_sum(objective, nets, batch, phase, max_norm):
    """Each row through ordinary autograd on its own, clipped jointly over the phase's
    networks, then summed: the textbook definition."""
    names = objective.phase(phase).networks
    params = [p for n in names for p in nets[n].parameters()]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(batch)):
        row = type(batch)({k: v[i : i + 1] for k, v in batch.tensors.items()})
        for p in params:
            p.grad = None
        captured = {}

        def backward(loss_fn, nets_, b, captured=captured):
            loss = loss_fn(nets_, b)
            loss.backward()
            captured["loss"] = loss
            return loss.detach()

        ctx = StepContext(device=torch.device("cpu"), noise=None, cpu=torch.Generator(),
                          backward=backward)  # fmt: skip
        objective.accumulate_gradients(phase, nets, row, ctx)
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        factor = min(1.0, max_norm / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    return total


@pytest.mark.parametrize(
    ("task", "phase"),
    [("enhance", "D"), ("enhance", "G"), ("super-resolution", "G"), ("translate", "G"),
     ("translate", "D"), ("anomaly", "E")],
)  # fmt: skip
def test_per_sample_clipping_equals_an_independent_per_row_computation(task, phase) -> None:
    cfg = _cfg(task)
    objective, batch, _ = _batch(task, cfg)
    nets = networks_for(cfg, objective)
    names = objective.phase(phase).networks
    for net in nets.values():  # eval-free, deterministic layers: same function both ways
        net.train()
    clip = 1e-3 if task == "anomaly" else 0.05  # the encoder's first gradients are small
    summed, losses, norms = clipped_sum(
        lambda n, b: _loss_of(objective, phase, n, b), nets, batch, names, clip
    )
    expected = _independent_clipped_sum(objective, nets, batch, phase, clip)
    got = [summed[n][k] for n in names for k, _ in nets[n].named_parameters()]
    assert len(got) == len(expected) and len(losses) == len(batch)
    assert (norms > clip).any()  # clipping was exercised
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def _loss_of(objective, phase, nets, batch):
    """The loss function ``objective`` hands to its context's backward for ``phase``."""
    captured = {}

    def grab(loss_fn, nets_, b):
        captured["fn"] = loss_fn
        return torch.zeros(())

    objective.accumulate_gradients(
        phase, nets, batch, StepContext(torch.device("cpu"), None, torch.Generator(), grab)
    )
    return captured["fn"](nets, batch)


def test_gaussian_mechanism_without_noise_is_the_clipped_mean_and_charges_one_step() -> None:
    from opacus.accountants import RDPAccountant

    cfg = _cfg("enhance")
    objective, batch, _ = _batch("enhance", cfg)
    nets = networks_for(cfg, objective)
    accountant = RDPAccountant()
    mechanism = GaussianMechanism(noise_multiplier=0.0, max_grad_norm=0.05,
                                  expected_batch_size=4, sample_rate=0.25,
                                  accountant=accountant, generator=None)  # fmt: skip
    summed, _, _ = clipped_sum(lambda n, b: _loss_of(objective, "D", n, b), nets, batch,
                               ("discriminator",), 0.05)  # fmt: skip
    ctx = StepContext(torch.device("cpu"), None, torch.Generator(),
                      mechanism.backward(("discriminator",)))  # fmt: skip
    objective.accumulate_gradients("D", nets, batch, ctx)
    for key, p in nets["discriminator"].named_parameters():
        torch.testing.assert_close(p.grad, summed["discriminator"][key] / 4)
    assert accountant.history == [(0.0, 0.25, 1)]


@pytest.mark.parametrize("task", list(I2I))
def test_dp_sgd_for_image_to_image_tasks_is_accounted_and_within_budget(task: str) -> None:
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    cfg = _cfg(task, "privacy.mode=dp-sgd", "privacy.target_epsilon=6", "federation.num_rounds=2",
               "privacy.accountant=rdp")  # checked against Flower's RDP accountant  # fmt: skip
    ds = hospital_dataset(cfg.data, 0, 0, 2)
    state = pack_state(networks_for(cfg))
    acc, opt, eps = None, None, []
    for r in (1, 2):
        res = local_round(cfg, ds, state, opt, round_=r, hospital=0, accountant=acc)
        acc, opt = res.accountant, res.optimizer_state
        assert all(torch.isfinite(v.float()).all() for v in res.state.values())
        assert any(not torch.equal(res.state[k], state[k]) for k in state)  # it trained
        state = res.state
        eps.append(res.privacy["epsilon"])
    p = res.privacy
    assert eps[0] < eps[1] <= 6.0 and eps[1] > 5.0  # calibrated to the whole run, not past it
    steps = 2 * cfg.train.local_steps * 2  # rounds x iterations x (D and G both read images)
    assert p["dp_steps"] == steps
    # Flower's RDP accountant, an implementation independent of Opacus's, agrees.
    batches = round(1 / p["sample_rate"])
    independent = RdpAccountant(
        PrivacyConfig(target_delta=p["delta"], population_size=batches,
                      neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                      sampling_method=SamplingMethod.POISSON)
    )  # fmt: skip
    independent.compose(GaussianPrivacyEvent(p["noise_multiplier"], 1, batches), count=steps)
    assert p["epsilon"] == pytest.approx(independent.get_epsilon(p["delta"]), rel=0.03)


def test_dp_sgd_refuses_batch_statistics_in_a_private_network() -> None:
    from torch import nn

    from fedgan.privacy.per_sample import check_rowwise

    with pytest.raises(ValueError, match="BatchNorm2d.*GroupNorm"):
        check_rowwise(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), "generator")


@pytest.mark.parametrize("private", [False, True])
def test_fedprox_adds_mu_times_the_drift_to_every_update(private: bool) -> None:
    """With SGD at rate lr, the proximal step differs from the plain one by exactly
    ``-lr * mu * (w - w_global)``, before or after DP-SGD's clipping and noise."""
    from fedgan.privacy import HospitalAccountant, PrivacyPlan, make_private_discriminator

    cfg = load_config(None, ["data.image_size=16", "model.base_channels=8",
                             "model.latent_dim=16", "train.batch_size=8"])  # fmt: skip
    objective = make_objective(cfg)
    lr, mu = 0.1, 0.5
    images = torch.rand(16, 1, 16, 16) * 2 - 1
    results = []
    for proximal_on in (False, True):
        nets = networks_for(cfg, objective)
        prox = ProximalTerm(mu, nets)  # anchored at the received weights
        with torch.no_grad():  # local training has drifted away from them
            for p in nets["discriminator"].parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
        drifted = [p.detach().clone() for p in nets["discriminator"].parameters()]
        opts = {n: torch.optim.SGD(net.parameters(), lr=lr) for n, net in nets.items()}
        ctx = StepContext.seeded(0, torch.device("cpu"))
        d = nets["discriminator"]
        if private:
            plan = PrivacyPlan(noise_multiplier=0.0, sample_rate=0.5, delta=1e-5, budget=10.0,
                               accountant="rdp", max_grad_norm=0.1, planned_steps=1)  # fmt: skip
            priv = make_private_discriminator(
                d, opts["discriminator"], images, torch.zeros(16), plan, HospitalAccountant("rdp"),
                batch_size=8, secure_mode=False, seed=0, device=torch.device("cpu"),
                grad_sample_mode="ghost",
            )  # fmt: skip
            nets = {**nets, "discriminator": priv.module}
            opts = {**opts, "discriminator": priv.optimizer}
            ctx.paired_forward = True
            from fedgan.training.private import _clipped

            ctx.backward = _clipped(priv.module)
        batch = objective.make_batch(images[:8], torch.zeros(8), None, ctx)
        phase_step(objective, objective.phase("D"), nets, opts, batch, ctx,
                   prox if proximal_on else None)  # fmt: skip
        anchor = prox.anchors["discriminator"]
        results.append(([p.detach().clone() for p in d.parameters()], drifted, anchor))
    (plain, drifted, anchor), (proximal, _, _) = results
    for a, b, w, w0 in zip(plain, proximal, drifted, anchor, strict=True):
        # b - a subtracts two float32 weights: it cannot be closer than a few of their ulps
        # (the expected term is about lr * mu * 0.01 = 5e-4 per weight)
        ulps = 8 * torch.finfo(w.dtype).eps * float(w.abs().max())
        torch.testing.assert_close(b - a, -lr * mu * (w - w0), rtol=1e-4, atol=max(ulps, 1e-7))


def test_fedprox_is_a_strategy_that_sends_its_mu() -> None:
    from fedgan.federated.strategies import build_strategy

    cfg = resolve(load_config(None, ["federation.strategy=fedprox", "federation.proximal_mu=0.3"]))
    assert build_strategy(cfg.federation).proximal_mu == pytest.approx(0.3)


def test_image_to_image_iterations_share_one_batch_but_private_phases_draw_their_own() -> None:
    cfg = _cfg("enhance")
    objective = make_objective(cfg)
    nets = networks_for(cfg, objective)
    ds = hospital_dataset(cfg.data, 0, 0, 2)
    ctx = StepContext.seeded(0, torch.device("cpu"))
    source = shuffled_batches(ds, 4, ctx, seed=0)
    stats = train(objective, nets, make_optimizers(nets, cfg.train), source, steps=3, ctx=ctx)
    assert stats.examples == 3 * 4  # D and G trained on the same images
    assert math.isfinite(stats.d_loss) and math.isfinite(stats.g_loss)
    private = {"D": lambda fn, n, b: _plain(fn, n, b), "G": lambda fn, n, b: _plain(fn, n, b)}
    source = shuffled_batches(ds, 4, ctx, seed=0)
    stats = train(objective, nets, make_optimizers(nets, cfg.train), source, steps=3, ctx=ctx,
                  private=private)  # fmt: skip
    assert stats.examples == 3 * 2 * 4  # each private phase step: its own sample


def _plain(loss_fn, nets, batch):
    loss = loss_fn(nets, batch)
    loss.backward()
    return loss.detach()


def test_synthesis_and_centralized_share_the_loop(toy_config: Config) -> None:
    """The pooled baseline and a hospital run the same objective through the same loop: with
    the same seed, data and steps, they produce the same weights."""
    from fedgan.training import round_seed
    from fedgan.training.hospital import local_round

    cfg = with_changes(toy_config, federation={"num_hospitals": 1})
    ds = hospital_dataset(cfg.data, 0, 0, 1)
    start = pack_state(networks_for(cfg))
    hospital = local_round(cfg, ds, start, None, round_=1, hospital=0).state
    objective = make_objective(cfg)
    nets = networks_for(cfg, objective)
    ctx = StepContext.seeded(round_seed(cfg.run.seed, 1, 0), torch.device("cpu"))
    train(objective, nets, make_optimizers(nets, cfg.train),
          shuffled_batches(ds, cfg.train.batch_size, ctx, seed=round_seed(cfg.run.seed, 1, 0)),
          steps=cfg.train.local_steps, ctx=ctx)  # fmt: skip
    direct = pack_state(nets)
    assert all(torch.equal(hospital[k], direct[k]) for k in hospital)


def test_a_new_task_is_one_class_and_gets_dp_prox_and_the_baseline(tmp_path) -> None:
    """The claim of the redesign: a task written against ``Objective`` alone trains in a
    hospital round, under DP-SGD with FedProx, and as the pooled baseline, with no other
    change to fedgan."""
    import torch.nn.functional as F

    from fedgan.catalog import TASKS
    from fedgan.models.image2image import patch_discriminator, unet_generator
    from fedgan.training.objectives.base import lsgan
    from fedgan.training.objectives.image2image import ImageToImage

    class Darken(ImageToImage):  # learn to undo a global darkening
        def build(self):
            c, s, w = self.cfg.data.channels, self.cfg.data.image_size, 4
            return {
                "generator": unet_generator(c, s, w),
                "discriminator": patch_discriminator(c, w, s),
            }

        def inputs(self, clean, gen):
            return clean * 0.5 - 0.5

        def accumulate_gradients(self, phase, nets, batch, ctx):
            def d_loss(n, b):
                with torch.no_grad():
                    fake = n["generator"](b["inputs"])
                return lsgan(n["discriminator"](b["targets"])[0], 1.0) + lsgan(
                    n["discriminator"](fake)[0], 0.0
                )

            def g_loss(n, b):
                fake = n["generator"](b["inputs"])
                return lsgan(n["discriminator"](fake)[0], 1.0) + F.l1_loss(fake, b["targets"])

            return ctx.backward(d_loss if phase == "D" else g_loss, nets, batch)

    TASKS.add("darken", Darken)
    try:
        _train_darken(tmp_path)
    finally:
        TASKS.remove("darken")
    with pytest.raises(KeyError, match="not a run-time registration"):
        TASKS.remove("enhance")


def _train_darken(tmp_path) -> None:
    from fedgan.runs.centralized import train_centralized

    cfg = _cfg("darken", "privacy.mode=dp-sgd", "privacy.target_epsilon=8",
               f"run.output_dir={tmp_path}", "train.local_steps=1")  # fmt: skip
    ds = hospital_dataset(cfg.data, 0, 0, 2)
    res = local_round(cfg, ds, pack_state(networks_for(cfg)), None, round_=1, hospital=0,
                      proximal_mu=0.1)  # fmt: skip
    assert res.privacy["dp_steps"] == 2 and 0 < res.privacy["epsilon"] <= 8
    summary = train_centralized(
        with_changes(cfg, privacy={"mode": "none"}, federation={"num_rounds": 1}),
        log=lambda _: None,
    )
    assert summary["rounds"] == 1 and "psnr" in summary["final"]["eval"]  # paired evaluation
