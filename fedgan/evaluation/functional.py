"""Pure metric functions on feature vectors or images; the feature extractor is the caller's."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)


def _stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = features.double()
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / max(len(x) - 1, 1)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two ``[N, D]`` feature sets (FID's formula).

    ``tr(sqrt(S1 S2))`` is the sum of square roots of the eigenvalues of ``S1 S2``.
    """
    mu1, s1 = _stats(real)
    mu2, s2 = _stats(fake)
    eig = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0)
    value = (mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * eig.sqrt().sum()
    return float(value.clamp(min=0))


def kernel_distance(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    subsets: int = 20,
    subset_size: int = 500,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the cubic polynomial kernel ``(x.y/d + 1)^3``, averaged over
    random subsets (Binkowski et al. 2018).

    Returns:
        ``(mean, std)`` over subsets.
    """
    g = torch.Generator().manual_seed(seed)
    m = min(subset_size, len(real), len(fake))
    d = real.shape[1]
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=g)[:m]].double()
        y = fake[torch.randperm(len(fake), generator=g)[:m]].double()
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = 1 - torch.eye(m, dtype=torch.float64)
        mmd = (kxx * off).sum() / (m * (m - 1)) + (kyy * off).sum() / (m * (m - 1))
        values.append(float(mmd - 2 * kxy.mean()))
    return float(np.mean(values)), float(np.std(values))


def prdc(real: torch.Tensor, fake: torch.Tensor, *, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` features
    (Naeem et al. 2020), with k-nearest-neighbour balls."""
    real, fake = real.double(), fake.double()
    d_rr = torch.cdist(real, real)
    d_ff = torch.cdist(fake, fake)
    d_rf = torch.cdist(real, fake)  # [R, F]
    r_real = d_rr.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0
    r_fake = d_ff.kthvalue(k + 1, dim=1).values
    inside_real = d_rf <= r_real[:, None]  # fake j inside real i's ball
    return {
        "precision": float(inside_real.any(0).double().mean()),
        "recall": float((d_rf <= r_fake[None, :]).any(1).double().mean()),
        "density": float(inside_real.double().sum(0).mean() / k),
        "coverage": float((d_rf.min(1).values <= r_real).double().mean()),
    }


def pairwise_ssim(images: torch.Tensor, *, pairs: int = 500, seed: int = 0) -> float:
    """Mean (MS-)SSIM over random pairs of distinct images in [-1, 1]: high means alike.

    MS-SSIM needs images of at least 161 px at its five scales; smaller images use SSIM.
    """
    n = len(images)
    if n < 2:
        raise ValueError("diversity needs at least 2 images")
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n, (pairs,), generator=g)
    j = (i + torch.randint(1, n, (pairs,), generator=g)) % n  # never the same index
    a, b = (images[i] + 1) / 2, (images[j] + 1) / 2
    values: torch.Tensor
    if images.shape[-1] > 160:
        values = multiscale_structural_similarity_index_measure(  # type: ignore[assignment]
            a, b, data_range=1.0, reduction="none"
        )
    else:
        kernel = 7 if images.shape[-1] < 64 else 11
        values = structural_similarity_index_measure(  # type: ignore[assignment]
            a, b, data_range=1.0, kernel_size=kernel, reduction="none"
        )
    return float(values.mean())


def nearest_distances(
    queries: torch.Tensor, reference: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance from each query to its nearest reference point, and that point's
    index (batched, so large sets fit in memory)."""
    q, r = queries.flatten(1).double(), reference.flatten(1).double()
    dists, idx = [], []
    for chunk in q.split(256):
        d = torch.cdist(chunk, r)
        m = d.min(1)
        dists.append(m.values)
        idx.append(m.indices)
    return torch.cat(dists), torch.cat(idx)


def copy_statistics(
    generated: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor
) -> dict[str, float]:
    """Data-copying statistics: generated images' nearest-training-image distances against
    those of real held-out images (which were never trained on).

    Returns:
        ``nn_ratio``: median generated NN distance / median held-out NN distance (well below 1
        suggests copying); ``copy_fraction``: share of generated images closer to the training
        set than 95% of held-out images are (about 0.05 for a generator that does not copy).
    """
    d_gen, _ = nearest_distances(generated, train)
    d_held, _ = nearest_distances(heldout, train)
    threshold = torch.quantile(d_held, 0.05)
    return {
        "nn_ratio": float(d_gen.median() / d_held.median().clamp(min=1e-12)),
        "copy_fraction": float((d_gen <= threshold).double().mean()),
        "gen_nn_median": float(d_gen.median()),
        "heldout_nn_median": float(d_held.median()),
    }


def paired_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Image-to-image quality of ``pred`` against ``target`` (both ``[N, C, H, W]`` in [-1, 1]):
    PSNR, SSIM, MS-SSIM (images >= 161 px), NMI and MAE."""
    from skimage.metrics import normalized_mutual_information

    a, b = (pred.clamp(-1, 1) + 1) / 2, (target + 1) / 2
    out = {
        "psnr": float(peak_signal_noise_ratio(a, b, data_range=1.0)),
        "ssim": float(
            structural_similarity_index_measure(  # type: ignore[arg-type]
                a, b, data_range=1.0, kernel_size=7 if a.shape[-1] < 64 else 11
            )
        ),
        "mae": float(F.l1_loss(a, b)),
        "nmi": float(
            np.mean(
                [
                    normalized_mutual_information(x.numpy(), y.numpy(), bins=64)
                    for x, y in zip(a, b, strict=True)
                ]
            )
        ),
    }
    if a.shape[-1] > 160:
        out["ms_ssim"] = float(
            multiscale_structural_similarity_index_measure(a, b, data_range=1.0)  # type: ignore[arg-type]
        )
    return out
