"""Paired ghost clipping (fedgan.privacy.ghost): the clipped update equals an independent
per-pair computation, and equals Opacus's own per-sample path step for step."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedgan.config import Config, ModelSection, with_changes
from fedgan.models import FAMILIES, ImageShape, build_networks
from fedgan.privacy import HospitalAccountant, PrivacyPlan, make_private_discriminator
from fedgan.privacy.ghost import PairedClipping
from fedgan.training import d_step, g_step, make_optimizers


class _Mixed(nn.Module):
    """Every code path: a padded conv (direct norms), a dilated conv (F.unfold), a grouped conv
    (Opacus's sampler), a wide bias-free conv (ghost norms), LayerNorm, and Linear over a
    sequence and a vector."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, 1, 1)
        self.c2 = nn.Conv2d(8, 8, 3, 1, 2, dilation=2)
        self.c3 = nn.Conv2d(8, 8, 3, 2, 1, groups=2)
        self.c4 = nn.Conv2d(8, 96, 4, 4, 0, bias=False)  # 2x2 output: ghost is cheaper
        self.norm = nn.LayerNorm(96)
        self.seq = nn.Linear(96, 16)
        self.out = nn.Linear(16 * 4, 1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.c3(self.act(self.c2(self.act(self.c1(x))))))
        h = self.c4(h).flatten(2).transpose(1, 2)  # [b, 4 positions, 96]
        h = self.act(self.seq(self.norm(h)))
        return self.out(h.flatten(1)).flatten()


def _reference(d, family, real, fake, labels, clip):
    """Per-pair gradients by torch.func, clipped one by one and summed: no shared code."""
    params = {k: v.detach() for k, v in d.named_parameters()}

    def pair_loss(p, r, f, y):
        extra = () if labels is None else (y[None],)
        return family.d_loss(
            functional_call(d, p, (r[None], *extra)), functional_call(d, p, (f[None], *extra))
        )

    y = labels if labels is not None else torch.zeros(len(real), dtype=torch.long)
    per_pair = vmap(grad(pair_loss), in_dims=(None, 0, 0, 0))(params, real, fake, y)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_pair.values()]).norm(dim=0)
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    return norms, {k: torch.einsum("i,i...->...", coef, g) for k, g in per_pair.items()}


@pytest.mark.parametrize(
    ("name", "size"), [("dcgan", 16), ("dcgan", 32), ("cgan", 32), ("mixed", 16)]
)
def test_clipped_sum_equals_clipping_each_pair_independently(name: str, size: int) -> None:
    torch.manual_seed(0)
    family = FAMILIES.get("dcgan" if name == "mixed" else name)
    if name == "mixed":
        d: nn.Module = _Mixed()
    else:
        cfg_model = ModelSection(family=name, latent_dim=8)
        d = build_networks(cfg_model, ImageShape(1, size), seed=0)["discriminator"]
    n = 10
    real, fake = torch.rand(n, 1, size, size) * 2 - 1, torch.rand(n, 1, size, size) * 2 - 1
    labels = torch.randint(0, 2, (n,)) if family.conditional else None
    norms, expected = _reference(d, family, real, fake, labels, clip=1.0)
    clip = float(norms.median())  # some pairs are clipped, some are not
    norms, expected = _reference(d, family, real, fake, labels, clip=clip)
    assert (norms > clip).any() and (norms < clip).any()

    wrapped = PairedClipping(d, clip)
    both = torch.cat([real, fake])
    out = wrapped(both) if labels is None else wrapped(both, torch.cat([labels, labels]))
    wrapped.clipped_backward(family.d_loss(out[:n], out[n:]))
    assert wrapped.per_pair_norms is not None
    torch.testing.assert_close(wrapped.per_pair_norms, norms, rtol=1e-4, atol=1e-6)
    for key, p in d.named_parameters():
        assert p.grad is not None, key
        scale = float(expected[key].abs().max())  # float32 sums in a different order
        torch.testing.assert_close(p.grad, expected[key], rtol=1e-4, atol=1e-4 * scale)


def _private(toy: Config, mode: str, sigma: float = 0.0):
    nets = build_networks(toy.model, ImageShape(1, 16), seed=0)
    opts = make_optimizers(nets, toy.train)
    plan = PrivacyPlan(sigma, 0.25, 1e-5, 10.0, "rdp", 0.05, 100)
    images = torch.rand(32, 1, 16, 16) * 2 - 1
    private = make_private_discriminator(
        nets["discriminator"], opts["discriminator"], images, torch.zeros(32, dtype=torch.long),
        plan, HospitalAccountant("rdp"), batch_size=8, secure_mode=False, seed=3,
        device=torch.device("cpu"), grad_sample_mode=mode,
    )  # fmt: skip
    return nets, opts, private


def test_ghost_steps_match_opacus_per_sample_steps(toy_config: Config) -> None:
    """Three private D steps and two G steps, from the same start and batches, with Opacus's
    ExpandedWeights path and with paired ghost clipping: the same networks come out."""
    family = FAMILIES.get("dcgan")
    torch.manual_seed(1)
    batches = [(torch.rand(n, 1, 16, 16) * 2 - 1, torch.randn(n, 16)) for n in (8, 5, 11)]
    result = {}
    for mode in ("ew", "ghost"):
        nets, opts, private = _private(toy_config, mode)
        for real, z in batches:
            d_step(family, nets["generator"], private.module, private.optimizer, real, z)
            g_step(family, nets["generator"], private.module, opts["generator"], z)
        assert private.engine.accountant.history == [(0.0, 0.25, 3)]
        private.close()
        result[mode] = {k: v.clone() for n in nets.values() for k, v in n.state_dict().items()}
    moved = [k for k, v in result["ew"].items() if v.is_floating_point()]
    for key in moved:
        torch.testing.assert_close(result["ghost"][key], result["ew"][key], rtol=1e-4, atol=1e-5)


def test_ghost_d_step_clears_gradients_and_g_step_records_nothing(toy_config: Config) -> None:
    family = FAMILIES.get("dcgan")
    nets, opts, private = _private(toy_config, "ghost", sigma=1.0)
    real, z = torch.rand(8, 1, 16, 16) * 2 - 1, torch.randn(8, 16)
    d_step(family, nets["generator"], private.module, private.optimizer, real, z)
    params = list(nets["discriminator"].parameters())
    assert all(p.grad is None for p in params)
    g_step(family, nets["generator"], private.module, opts["generator"], z)
    assert all(p.grad is None for p in params)
    assert private.module._records == [] and private.module._enabled
    private.close()
    assert not nets["discriminator"]._forward_hooks
    assert all(not m._forward_hooks for m in nets["discriminator"].modules())


def test_an_empty_poisson_batch_still_adds_noise_and_counts_a_step(toy_config: Config) -> None:
    family = FAMILIES.get("dcgan")
    nets, _, private = _private(toy_config, "ghost", sigma=1.0)
    before = [p.detach().clone() for p in nets["discriminator"].parameters()]
    empty = torch.zeros(0, 1, 16, 16)
    d_step(family, nets["generator"], private.module, private.optimizer, empty, torch.zeros(0, 16))
    assert private.engine.accountant.history == [(1.0, 0.25, 1)]
    after = list(nets["discriminator"].parameters())
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))  # noise moved it


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def test_unsupported_and_shared_layers_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"1 \(_Scale\).*grad_sample_mode=hooks"):
        PairedClipping(nn.Sequential(nn.Conv2d(1, 2, 3), _Scale()), 1.0)
    conv = nn.Conv2d(1, 1, 3, padding=1)
    shared = PairedClipping(nn.Sequential(conv, nn.LeakyReLU(0.2), conv), 1.0)
    out = shared(torch.rand(4, 1, 8, 8))
    with pytest.raises(RuntimeError, match="more than once"):
        shared.clipped_backward(out.mean())
    odd = PairedClipping(nn.Sequential(nn.Flatten(), nn.Linear(4, 1)), 1.0)
    with pytest.raises(RuntimeError, match="not pairs"):
        odd.clipped_backward(odd(torch.rand(3, 4)).mean())


def test_ghost_is_the_default_and_the_choice_is_checked(toy_config: Config) -> None:
    assert toy_config.privacy.grad_sample_mode == "ghost"
    with pytest.raises(ValueError, match="grad_sample_mode"):
        with_changes(toy_config, privacy={"grad_sample_mode": "fast"})


@pytest.mark.parametrize(("name", "size"), [("dcgan", 16), ("cgan", 32), ("mixed", 16)])
def test_each_pairs_views_are_clipped_as_one_unit(name: str, size: int) -> None:
    """Augmentation multiplicity: pair i is V views of real i and V of fake i (rows i + j n),
    its loss their average; the clipped sum equals clipping each pair's averaged gradient,
    computed independently by torch.func over [V, ...] stacks."""
    torch.manual_seed(2)
    family = FAMILIES.get("dcgan" if name == "mixed" else name)
    if name == "mixed":
        d: nn.Module = _Mixed()
    else:
        d = build_networks(ModelSection(family=name, latent_dim=8), ImageShape(1, size),
                           seed=0)["discriminator"]  # fmt: skip
    n, views = 6, 3
    real = torch.rand(views, n, 1, size, size) * 2 - 1  # [view, pair, ...]
    fake = torch.rand(views, n, 1, size, size) * 2 - 1
    labels = torch.randint(0, 2, (n,)) if family.conditional else torch.zeros(n, dtype=torch.long)
    params = {k: v.detach() for k, v in d.named_parameters()}

    def pair_loss(p, r, f, y):  # r, f: [views, 1, H, W] of one pair
        extra = () if not family.conditional else (y.expand(views),)
        return family.d_loss(functional_call(d, p, (r, *extra)), functional_call(d, p, (f, *extra)))

    per_pair = vmap(grad(pair_loss), in_dims=(None, 1, 1, 0))(params, real, fake, labels)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_pair.values()]).norm(dim=0)
    clip = float(norms.median())
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = {k: torch.einsum("i,i...->...", coef, g) for k, g in per_pair.items()}

    wrapped = PairedClipping(d, clip)
    rows = torch.cat([real.flatten(0, 1), fake.flatten(0, 1)])  # view-major: row j n + i
    y = labels.repeat(2 * views)
    out = wrapped(rows) if not family.conditional else wrapped(rows, y)
    wrapped.clipped_backward(family.d_loss(out[: views * n], out[views * n :]), n)
    assert wrapped.per_pair_norms is not None
    torch.testing.assert_close(wrapped.per_pair_norms, norms, rtol=1e-4, atol=1e-6)
    for key, p in d.named_parameters():
        assert p.grad is not None, key
        scale = float(expected[key].abs().max())
        torch.testing.assert_close(p.grad, expected[key], rtol=1e-4, atol=1e-4 * scale)
    out = wrapped(rows) if not family.conditional else wrapped(rows, y)
    with pytest.raises(RuntimeError, match=r"not pairs.*\(5 expected\)"):
        wrapped.clipped_backward(out.mean(), 5)
