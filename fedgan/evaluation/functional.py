"""Pure metric functions on feature vectors or images; the feature extractor is the caller's."""

from __future__ import annotations

import numpy as np
import torch

#: SSIM's protocol (Wang et al. 2004): an 11-pixel Gaussian window of sigma 1.5, K1 = 0.01,
#: K2 = 0.03, averaged over the window positions inside the image (no padded borders), per
#: image; the same as ``skimage.metrics.structural_similarity(gaussian_weights=True,
#: sigma=1.5, use_sample_covariance=False)``.
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
#: MS-SSIM's protocol (Wang et al. 2003). From 161 px: the paper's 5 scales, 11-pixel window
#: and weights. Below: 3 scales (fewer under 17 px, where 3 do not fit) with a 5-pixel Gaussian
#: window of sigma 1.5, weighted by the paper's three middle weights scaled to sum to 1 (a
#: 28-32 px image is a coarse view already, so its finest scale stands for the paper's second).
#: Scales are 2x2 average pools; each SSIM term is averaged over window positions inside the
#: image, as above; negative terms count as 0 (as in the paper's code and pytorch-msssim).
MS_SSIM_FULL = (11, 1.5, (0.0448, 0.2856, 0.3001, 0.2363, 0.1333))
MS_SSIM_SMALL = (5, 1.5, (0.2856, 0.3001, 0.2363))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM per image of ``[N, C, H, W]`` images in [0, 1] under :data:`SSIM_WINDOW`'s
    protocol (channels averaged).

    Raises:
        ValueError: Images smaller than the 11-pixel window.
    """
    import piq

    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} px, got {x.shape[-1]}")
    return piq.ssim(x.float(), y.float(), kernel_size=SSIM_WINDOW, kernel_sigma=SSIM_SIGMA,
                    data_range=1.0, reduction="none", downsample=False)  # fmt: skip


def ms_ssim_protocol(size: int) -> tuple[int, float, tuple[float, ...]]:
    """``(window, sigma, scale weights)`` MS-SSIM uses on ``size``-pixel images (see
    :data:`MS_SSIM_SMALL`); the weights as given, before they are scaled to sum to 1."""
    if size >= 161:
        return MS_SSIM_FULL
    window, sigma, weights = MS_SSIM_SMALL
    levels = len(weights)
    while levels > 1 and (window - 1) * 2 ** (levels - 1) + 1 > size:
        levels -= 1
    return window, sigma, weights[:levels]


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MS-SSIM per image of ``[N, C, H, W]`` images in [0, 1] under the protocol of
    :func:`ms_ssim_protocol` (through ``piq``, which scales the weights to sum to 1)."""
    import piq

    window, sigma, weights = ms_ssim_protocol(min(x.shape[-2:]))
    if len(weights) == 1:  # one scale: plain SSIM with the small window
        return piq.ssim(x.float(), y.float(), kernel_size=window, kernel_sigma=sigma,
                        data_range=1.0, reduction="none", downsample=False)  # fmt: skip
    return piq.multi_scale_ssim(x.float(), y.float(), kernel_size=window, kernel_sigma=sigma,
                                data_range=1.0, reduction="none",
                                scale_weights=torch.tensor(weights))  # fmt: skip


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

    Each subset holds ``subset_size`` points of each set, or half the smaller set when a set
    holds fewer than twice that: subsets of a whole set would all be that set, and their
    spread would read about 0 whatever the estimate's uncertainty. The estimator is unbiased
    at any subset size, so the mean does not depend on that choice. Subsets of one small set
    share its sampling error, so the spread then understates the uncertainty of a fresh
    sample (about half of it for 300 real points, tests/test_image_metrics.py).

    Returns:
        ``(mean, std)`` over subsets.

    Raises:
        ValueError: A set of fewer than 4 points.
    """
    if min(len(real), len(fake)) < 4:
        raise ValueError("KID needs at least 4 points in each set")
    g = torch.Generator().manual_seed(seed)
    m = min(subset_size, len(real) // 2, len(fake) // 2)
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
    """Mean MS-SSIM (the protocol of :func:`ms_ssim`) over random pairs of distinct images in
    [-1, 1]: high means alike, 1 means one image drawn again and again."""
    n = len(images)
    if n < 2:
        raise ValueError("diversity needs at least 2 images")
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n, (pairs,), generator=g)
    j = (i + torch.randint(1, n, (pairs,), generator=g)) % n  # never the same index
    a, b = ((images[i] + 1) / 2).clamp(0, 1), ((images[j] + 1) / 2).clamp(0, 1)
    return float(ms_ssim(a, b).mean())


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


def dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Dice of binary maps pooled over every pixel given: ``2|P & T| / (|P| + |T|)`` (1 when
    both are empty)."""
    p, t = pred.bool(), target.bool()
    total = int(p.sum() + t.sum())
    return 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total


def iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Intersection over union of binary maps pooled over every pixel (1 when both are
    empty)."""
    p, t = pred.bool(), target.bool()
    union = int((p | t).sum())
    return 1.0 if union == 0 else int((p & t).sum()) / union


def best_threshold(maps: torch.Tensor, masks: torch.Tensor) -> float:
    """The threshold ``t`` on ``maps`` whose binary map ``maps > t`` has the highest pooled
    Dice against ``masks``, searched exactly over every distinct map value (sorted once:
    Dice of the top ``k`` pixels is ``2 TP_k / (k + |masks|)``); ``t`` lies halfway between
    the last value kept and the next."""
    v = maps.flatten().double()
    m = masks.flatten().bool()
    order = torch.argsort(v, descending=True)
    v, m = v[order], m[order].double()
    tp = torch.cumsum(m, 0)
    k = torch.arange(1, len(v) + 1, dtype=torch.float64)
    scores = 2 * tp / (k + m.sum())
    last = torch.ones(len(v), dtype=torch.bool)  # a cut only where the value changes
    last[:-1] = v[1:] < v[:-1]
    scores[~last] = -1
    best = int(torch.argmax(scores))
    below = float(v[best + 1]) if best + 1 < len(v) else float(v[best]) - 1.0
    return (float(v[best]) + below) / 2
