"""DP-SGD's Gaussian mechanism for any networks: per-sample gradients by ``torch.func``, joint
clipping, noise and accounting.

The image-to-image tasks need it: their generators read real images too (a pix2pix generator's
loss compares its output with the real target), so both phases are private, and their
networks hold layers that Opacus has no per-sample gradient for (transposed convolutions,
PReLU, a bare residual gain). ``torch.func.vmap(grad(...))`` differentiates each row's loss
whatever the layers. Every network a phase updates is clipped *jointly* (one norm per row over
all of their parameters), so one row costs one mechanism invocation, as the accountant charges.

A row is one privacy unit: the real image and everything made from it (its degraded input,
the fake generated from it). The loss function must therefore treat rows independently: no
batch statistics (BatchNorm) and no batch means inside a row's loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


class _Functional:
    """A module called with given parameters (``torch.func.functional_call``)."""

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor]) -> None:  # fmt: skip
        self.module, self.params, self.buffers = module, params, buffers

    def __call__(self, *args: Any) -> Any:
        return torch.func.functional_call(self.module, (self.params, self.buffers), args)


def check_rowwise(module: nn.Module, name: str) -> None:
    """Refuses layers that mix rows of a batch (BatchNorm's batch statistics).

    Raises:
        ValueError: Naming the network and layer.
    """
    for layer_name, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"the {name} cannot be trained with DP-SGD: {layer_name or 'its top'} is "
                f"{type(layer).__name__}, whose batch statistics mix patients; use GroupNorm or "
                "InstanceNorm"
            )


def clipped_sum(
    loss_fn: Callable[[Mapping[str, Any], Any], torch.Tensor],
    nets: Mapping[str, Any],
    batch: Any,
    trained: tuple[str, ...],
    max_grad_norm: float,
) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """The sum over rows of each row's gradient clipped to ``max_grad_norm``.

    Args:
        loss_fn: ``(nets, batch) -> mean loss``; called once per row (a batch of one) under
            ``vmap``, with the trained networks replaced by functional stand-ins.
        nets: Every network (the untrained ones are used as they are).
        batch: Has ``tensors`` (name -> ``[rows, ...]``); its type is rebuilt per row.
        trained: The networks whose parameters get gradients.
        max_grad_norm: The clip norm C.

    Returns:
        ``{network: {parameter name: clipped sum}}``, the rows' losses, and their gradient
        norms before clipping.
    """
    modules = {name: nets[name] for name in trained}
    params = {n: {k: p.detach() for k, p in m.named_parameters()} for n, m in modules.items()}
    buffers = {n: dict(m.named_buffers()) for n, m in modules.items()}
    keys = list(batch.tensors)
    columns = [batch.tensors[k] for k in keys]
    rows = len(columns[0]) if columns else 0
    if rows == 0:  # an empty Poisson batch: the mechanism still runs (noise only)
        zeros = {n: {k: torch.zeros_like(p) for k, p in ps.items()} for n, ps in params.items()}
        empty = torch.zeros(0, device=next(iter(params[trained[0]].values())).device)
        return zeros, empty, empty

    def row_loss(params: dict[str, dict[str, torch.Tensor]], *row: torch.Tensor) -> torch.Tensor:
        one = type(batch)({k: r.unsqueeze(0) for k, r in zip(keys, row, strict=True)})
        stand_ins = dict(nets)
        for n, m in modules.items():
            stand_ins[n] = _Functional(m, params[n], buffers[n])
        return loss_fn(stand_ins, one)

    grads, losses = torch.func.vmap(
        torch.func.grad_and_value(row_loss),
        in_dims=(None, *[0] * len(columns)),
        randomness="different",
    )(params, *columns)
    sq = sum(g.reshape(rows, -1).square().sum(1) for ps in grads.values() for g in ps.values())
    norms = torch.as_tensor(sq).sqrt()
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    summed = {
        n: {k: torch.tensordot(factor, g, dims=1) for k, g in ps.items()} for n, ps in grads.items()
    }
    return summed, losses, norms


class GaussianMechanism:
    """Noise and accounting of DP-SGD for phases clipped by :func:`clipped_sum`.

    Args:
        noise_multiplier: sigma.
        max_grad_norm: C (the noise's std is sigma * C).
        expected_batch_size: q * n, what the noisy sum is divided by.
        sample_rate: q, for the accountant.
        accountant: An Opacus accountant continuing the hospital's history.
        generator: Seeded (or secure) noise generator; None uses torch's default.
    """

    def __init__(self, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: float, sample_rate: float, accountant: Any,
                 generator: torch.Generator | None) -> None:  # fmt: skip
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.sample_rate = sample_rate
        self.accountant = accountant
        self.generator = generator

    def backward(self, trained: tuple[str, ...]) -> Callable[..., torch.Tensor]:
        """The backward of a private phase updating ``trained``: sets each parameter's
        ``.grad`` to ``(clipped sum + N(0, (sigma C)^2)) / expected batch size``, charges one
        step, and returns the mean loss."""

        def backward(loss_fn: Callable, nets: Mapping[str, Any], batch: Any) -> torch.Tensor:
            summed, losses, _ = clipped_sum(loss_fn, nets, batch, trained, self.max_grad_norm)
            std = self.noise_multiplier * self.max_grad_norm
            for name in trained:
                for key, p in nets[name].named_parameters():
                    noise = torch.normal(0.0, std, p.shape, device=p.device,
                                         generator=self.generator)  # fmt: skip
                    p.grad = (summed[name][key] + noise) / self.expected_batch_size
            self.accountant.step(noise_multiplier=self.noise_multiplier,
                                 sample_rate=self.sample_rate)  # fmt: skip
            return losses.mean().detach() if len(losses) else torch.zeros(())

        return backward
