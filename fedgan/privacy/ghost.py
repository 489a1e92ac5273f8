"""Paired ghost clipping: DP-SGD for a GAN discriminator without per-sample gradients where
they are the expensive part.

DP-SGD clips each privacy unit's gradient to ``max_grad_norm``. In a discriminator step the unit
is a pair: real image ``i`` and the generated image ``i`` drawn for it, whose losses are summed
before one backward. Clipping the pair once is what keeps the step's signal: a real image's
gradient and a generated image's point almost opposite ways (cosine -0.85 to -0.94 on
PneumoniaMNIST, norms 50-170 against a clip norm of 1), so their sum is the discriminative
difference. Clipped one by one, each keeps mostly the shared part, which cancels only after
clipping: the clipped sum shrank 2-6x and turned away from the true gradient, and a private
run's recall fell from 0.49 to 0.05 (``simulations/README.md``, study 32). Opacus's
``ew``/``hooks`` modes materialize every pair's gradient, a ``[pairs, out, in]`` tensor per
layer, then scale and sum it: at 32 px that is 16 MB for one conv layer and most of the DP
overhead on a CPU. Opacus's own ghost clipping avoids that for ``nn.Linear`` only, and refuses a
module called twice per step (the real and fake forward passes).

Here the discriminator sees ``cat([real, fake])`` in one forward, rows ``i`` and ``n + i`` form
pair ``i``, and for every layer with parameters the gradient norm of each pair comes from what
the layer already has, its input activations ``A`` and output gradients ``G``:

* ``Conv2d``/``Linear``: with ``A`` unfolded to ``[pairs, d, T]`` and ``G`` to ``[pairs, p, T]``
  (``T``: the positions of both images), a pair's weight gradient is ``G Aᵀ``. Its squared norm
  is either ``‖G Aᵀ‖²`` (direct, ``p·d·T`` per pair) or ``⟨AᵀA, GᵀG⟩`` (ghost norm, Li et al.
  2022, ``T²·(p+d)``), whichever costs less for that layer. The clipped sum is then one matrix
  product of the coefficient-scaled ``G`` with ``A``, the cost of an ordinary weight gradient.
* every other layer type (GroupNorm, Embedding, LayerNorm, grouped convs, ...): Opacus's own
  per-sample gradient function, folded into pairs; these layers have few parameters.

One ``torch.autograd.grad`` call gives every layer's ``G`` without computing any weight gradient,
so a private step costs one forward, one input-gradient backward and these per-layer products.
The result, ``sum_i min(1, C/‖g_i‖) g_i``, is exactly what Opacus's per-sample path computes (a
test compares them); noise, scaling by the expected batch size and accounting stay Opacus's
(``DPOptimizerFastGradientClipping`` and the engine's accountant).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

Clipped = dict[torch.Tensor, torch.Tensor]  # parameter -> its clipped-sum gradient


@dataclass
class _Terms:
    """One layer's contribution: squared per-pair norms, and how to form its clipped sum."""

    sq_norms: torch.Tensor  # [pairs]
    clipped_sum: Callable[[torch.Tensor], Clipped]  # pair weights [pairs] -> param -> grad


class _Workspace:
    """Scratch tensors kept from step to step, one per (layer, role).

    On CPU a fresh tensor of several MB costs its page faults on every step (glibc hands large
    blocks back to the system when they are freed); reusing the im2col and per-pair buffers
    cut a private step's overhead over a plain one from 46% to 27% at 32 px. Poisson batches
    vary in size, so each buffer keeps the largest size seen and smaller batches use its
    beginning. Buffers start zeroed: padding borders are never written and stay zero.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[object, ...], torch.Tensor] = {}

    def get(
        self, key: tuple[object, ...], shape: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        size = math.prod(shape)
        buf = self._buffers.get(key)
        if (
            buf is None
            or buf.numel() < size
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = self._buffers[key] = torch.zeros(size, dtype=like.dtype, device=like.device)
        return buf[:size].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


def _gram_inner(a: torch.Tensor, g: torch.Tensor, n: int, m: int = 2) -> torch.Tensor:
    """``⟨AᵀA, GᵀG⟩`` per pair, from its ``m`` members (rows ``i``, ``n + i``, ...; real and
    fake, or every view of each): the pair's Gram matrix is the ``m x m`` block matrix of these
    products, never assembled (the blocks below the diagonal mirror those above)."""

    def block(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x.mT, y)

    parts = [(a[j * n : (j + 1) * n], g[j * n : (j + 1) * n]) for j in range(m)]
    sq = torch.zeros(n, dtype=a.dtype, device=a.device)
    for j, (aj, gj) in enumerate(parts):
        for k in range(j, m):
            ak, gk = parts[k]
            sq = sq + (1 if j == k else 2) * (block(aj, ak) * block(gj, gk)).sum((1, 2))
    return sq


def _matrix_terms(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    g: torch.Tensor,
    n: int,
    scratch: Callable[[str, tuple[int, ...]], torch.Tensor],
    to_weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
    m: int = 2,
) -> _Terms:
    """Conv2d/Linear: ``a`` ``[m n, d, t]`` inputs (unfolded), ``g`` ``[m n, p, t]`` output
    gradients, rows ``i``, ``n + i``, ... ``(m - 1) n + i`` a pair. ``scratch(role, shape)``
    gives a reusable buffer; ``to_weight`` maps a ``[p, d]`` gradient to the weight's layout
    (a reshape by default)."""
    d, p, t = a.shape[1], g.shape[1], m * a.shape[2]  # t: positions of a pair
    per_pair: torch.Tensor | None = None
    if t * (p + d) < p * d:  # ghost norm: cheaper than the [p, d] gradient itself
        sq = _gram_inner(a, g, n, m)
    else:  # direct: the pair's [p, d] gradient, its members' products summed in place
        out = scratch("pair", (n, p, d))
        torch.bmm(g[:n], a[:n].mT, out=out)
        for j in range(1, m):
            out.baddbmm_(g[j * n : (j + 1) * n], a[j * n : (j + 1) * n].mT)
        per_pair = out.view(n, p * d)
        sq = torch.linalg.vector_norm(per_pair, dim=1).square()
    bias_per_pair = None
    if bias is not None and bias.requires_grad:
        bias_per_pair = g.sum(2).view(m, n, p).sum(0)
        sq = sq + bias_per_pair.square().sum(1)

    def clipped_sum(w: torch.Tensor) -> Clipped:
        if per_pair is not None:
            grad = w @ per_pair
        else:  # an ordinary weight gradient, of the coefficient-scaled output gradients
            scaled = (g * w.repeat(m)[:, None, None]).transpose(0, 1).reshape(p, -1)
            grad = scaled @ a.mT.reshape(-1, d)
        out = {weight: (to_weight(grad) if to_weight else grad).reshape(weight.shape)}
        if bias_per_pair is not None and bias is not None:
            out[bias] = w @ bias_per_pair
        return out

    return _Terms(sq, clipped_sum)


def _conv_terms(
    layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, n: int, ws: _Workspace, m: int = 2
) -> _Terms:
    (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
    ph, pw = cast(tuple[int, int], layer.padding)  # a string padding never gets here

    def scratch(role: str, shape: tuple[int, ...]) -> torch.Tensor:
        return ws.get((id(layer), role, *shape[1:]), shape, a)

    if layer.dilation != (1, 1):
        cols = F.unfold(a, (kh, kw), layer.dilation, (ph, pw), (sh, sw))
        return _matrix_terms(layer.weight, layer.bias, cols, g.flatten(2), n, scratch, m=m)
    # im2col as strided windows of the channels-last input, channels innermost, copied once
    # into a kept buffer: about 10x faster than F.unfold on CPU. The columns are then ordered
    # (kh, kw, c), so the weight gradient is permuted back at the end.
    rows, c, h, w = a.shape
    padded = a.permute(0, 2, 3, 1)  # [m n, h, w, c]
    if ph or pw:
        padded = scratch("padded", (rows, h + 2 * ph, w + 2 * pw, c))  # zero borders
        padded[:, ph : ph + h, pw : pw + w].copy_(a.permute(0, 2, 3, 1))
    windows = padded.unfold(1, kh, sh).unfold(2, kw, sw)  # [m n, ho, wo, c, kh, kw]
    ho, wo = windows.shape[1:3]
    cols = scratch("cols", (rows, ho, wo, kh, kw, c))
    cols.copy_(windows.permute(0, 1, 2, 4, 5, 3))
    out_c = layer.weight.shape[0]

    def to_weight(grad: torch.Tensor) -> torch.Tensor:
        return grad.reshape(out_c, kh, kw, c).permute(0, 3, 1, 2)

    a2 = cols.view(rows, ho * wo, kh * kw * c).mT
    return _matrix_terms(layer.weight, layer.bias, a2, g.flatten(2), n, scratch, to_weight, m)


def _linear_terms(
    layer: nn.Linear, a: torch.Tensor, g: torch.Tensor, n: int, ws: _Workspace, m: int = 2
) -> _Terms:
    def scratch(role: str, shape: tuple[int, ...]) -> torch.Tensor:
        return ws.get((id(layer), role, *shape[1:]), shape, a)

    # [m n, ..., d] -> [m n, d, positions]
    a3 = a.reshape(a.shape[0], -1, a.shape[-1]).mT
    g3 = g.reshape(g.shape[0], -1, g.shape[-1]).mT
    return _matrix_terms(layer.weight, layer.bias, a3, g3, n, scratch, m=m)


def _sampled_terms(
    layer: nn.Module, inputs: list[torch.Tensor], g: torch.Tensor, n: int, m: int = 2
) -> _Terms:
    """Any other layer: Opacus's per-sample gradients, folded into pairs."""
    from opacus.grad_sample import GradSampleModule

    per_sample = GradSampleModule.GRAD_SAMPLERS[type(layer)](layer, inputs, g)
    per_pair = {p: gs.reshape(m, n, -1).sum(0) for p, gs in per_sample.items() if p.requires_grad}
    sq = sum((gs.square().sum(1) for gs in per_pair.values()), torch.zeros(n, device=g.device))

    def clipped_sum(w: torch.Tensor) -> Clipped:
        return {p: (w @ gs).reshape(p.shape) for p, gs in per_pair.items()}

    return _Terms(sq, clipped_sum)


def _own_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _plain_conv(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d)
        and m.groups == 1
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


def _layer_terms(
    module: nn.Module, inputs: list[torch.Tensor], g: torch.Tensor, n: int, ws: _Workspace, m: int
) -> _Terms:
    if _plain_conv(module):
        return _conv_terms(module, inputs[0], g, n, ws, m)  # type: ignore[arg-type]
    if isinstance(module, nn.Linear):
        return _linear_terms(module, inputs[0], g, n, ws, m)
    return _sampled_terms(module, inputs, g, n, m)  # grouped convs too


def unsupported_layers(module: nn.Module) -> list[str]:
    """Layers with parameters that paired ghost clipping cannot handle: neither Conv2d/Linear
    nor a type Opacus has a per-sample gradient for (none in fedgan's discriminators)."""
    from opacus.grad_sample import GradSampleModule

    return [
        f"{name} ({type(m).__name__})"
        for name, m in module.named_modules()
        if _own_params(m)
        and not isinstance(m, nn.Linear)
        and type(m) not in GradSampleModule.GRAD_SAMPLERS
    ]


class PairedClipping(nn.Module):
    """Wraps a discriminator for paired ghost clipping (see the module docstring).

    Train it with one forward of ``cat([real, fake])`` (row ``i`` and ``n + i`` are a pair),
    then :meth:`clipped_backward` on the loss (a mean over the pairs, Opacus's ``mean``
    reduction), then the ``DPOptimizerFastGradientClipping`` step, which adds the noise and
    accounts for it. ``p.grad`` after :meth:`clipped_backward` is the sum of clipped pair
    gradients.

    Args:
        module: The discriminator (its parameters are updated in place; its state dict is its
            own, so checkpoints do not change).
        max_grad_norm: Clip norm ``C`` for each pair's whole gradient.
    """

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        super().__init__()
        bad = unsupported_layers(module)
        if bad:
            raise ValueError(
                "privacy.grad_sample_mode=ghost does not support these layers: "
                + ", ".join(bad)
                + ". Set privacy.grad_sample_mode=hooks (Opacus derives their per-sample "
                "gradients with functorch, slower), or build them from supported layers "
                "(Conv2d, Linear, GroupNorm, LayerNorm, Embedding, ...)."
            )
        self._module = module
        self.max_grad_norm = max_grad_norm
        self._enabled = True
        self._workspace = _Workspace()
        self._records: list[tuple[nn.Module, list[torch.Tensor], torch.Tensor]] = []
        self._handles = [
            m.register_forward_hook(self._record) for m in module.modules() if _own_params(m)
        ]
        self.per_pair_norms: torch.Tensor | None = None  # of the last step, for tests and logs

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self._module(*args, **kwargs)  # type: ignore[no-any-return]

    def disable_hooks(self) -> None:
        """Stops recording (the generator step: it needs no clipping and spends nothing)."""
        self._enabled = False
        self._records.clear()

    def enable_hooks(self) -> None:
        self._enabled = True

    def close(self) -> None:
        """Removes the hooks; the discriminator is then the plain module again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._records.clear()
        self._workspace.clear()

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], out: object) -> None:
        if self._enabled and module.training and torch.is_grad_enabled():
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"{type(module).__name__} returned {type(out).__name__}")
            self._records.append((module, [x.detach() for x in inputs], out))

    def clipped_backward(self, loss: torch.Tensor, pairs: int | None = None) -> None:
        """Sets every parameter's ``.grad`` to the sum over pairs of the clipped pair gradient.

        Args:
            loss: A mean over the pairs.
            pairs: How many pairs the forward saw. Default: half its rows (one real and one
                fake image each). With ``V`` DiffAugment views each pair is ``2 V`` rows,
                ``i + j * pairs`` for ``j < 2 V`` (every view of real ``i``, then of fake
                ``i``), and the loss averages them: they are clipped as one unit.

        Raises:
            RuntimeError: When the forward did not see whole pairs, or a layer ran twice
                (shared weights would make one pair's gradient span two records).
        """
        records, self._records = self._records, []
        params = [p for p in self._module.parameters() if p.requires_grad]
        if not records:
            raise RuntimeError("clipped_backward needs one forward of cat([real, fake]) first")
        modules = [r[0] for r in records]
        if len(set(map(id, modules))) != len(modules):
            raise RuntimeError(
                "a discriminator layer ran more than once since the last step: paired ghost "
                "clipping needs exactly one forward of cat([real, fake]) per step"
            )
        rows = records[0][2].shape[0]
        n = rows // 2 if pairs is None else pairs
        if rows % 2 or (n and rows % n) or (n == 0 and rows):
            raise RuntimeError(
                f"the forward saw {rows} images, not pairs of real and fake ({n} expected)"
            )
        m = rows // n if n else 2
        if n == 0:  # an empty Poisson batch: nothing to clip, the optimizer still adds noise
            for p in params:
                p.grad = torch.zeros_like(p)
            self.per_pair_norms = loss.new_zeros(0)
            return
        grads = torch.autograd.grad(loss, [r[2] for r in records])
        terms = [
            _layer_terms(module, inputs, g, n, self._workspace, m)
            for (module, inputs, _), g in zip(records, grads, strict=True)
        ]
        # The loss is a mean over pairs: each pair's own gradient is n times its share here.
        norms = n * torch.stack([t.sq_norms for t in terms]).sum(0).sqrt()
        self.per_pair_norms = norms.detach()
        weights = n * (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus's formula
        for t in terms:
            for param, grad in t.clipped_sum(weights).items():
                param.grad = grad if param.grad is None else param.grad + grad
        for p in params:
            if p.grad is None:  # a parameter the loss does not reach
                p.grad = torch.zeros_like(p)
