"""Membership-inference attacks on what a run releases, and what their success implies.

An audit asks, for images the hospitals trained on (members) and images of the same
distribution that no hospital saw (non-members), how well an attacker separates the two:

- ``logan`` (Hayes et al. 2019, white-box): the released discriminator's score; a
  discriminator that remembers its training images scores them higher.
- ``gan_leaks`` (Chen et al. 2020, black-box): the distance from a query to its nearest
  generated image, calibrated by its distance to the nearest image of a reference set of the
  same distribution (standing in for the paper's reference GAN): a generator that copies its
  training images puts samples closer to members than the data's own density explains.
- ``domias`` (van Breugel et al. 2023): the ratio of the generator's density to the reference
  data's density at the query, each a Gaussian KDE in a PCA embedding fitted on the
  reference images: overfitting shows as local density peaks at the members.

Each is summarised by its ROC AUC, its true-positive rate at 1 % and 0.1 % false positives,
and the lower bound on epsilon that its error rates imply for an (epsilon, delta)-DP release
(Kairouz et al. 2015; Jagielski et al. 2020): the threshold is chosen on one half of the
audit set and the bound is computed on the other half with Clopper-Pearson intervals, so it
is a 95 % lower bound, not a best case.

Distance to the closest training record alone (``memorization_*``) is a data-copying
statistic, not a privacy test: it is kept as a metric and is not one of these attacks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from fedgan.evaluation.functional import nearest_distances

#: Attacks in the order they are reported.
ATTACKS = ("logan", "gan_leaks", "domias")


@dataclass(frozen=True)
class AttackResult:
    """How well one attack separates members from non-members.

    Attributes:
        auc: ROC AUC (0.5: no better than a coin).
        tpr_at_1pct: True-positive rate at a 1 % false-positive rate.
        tpr_at_01pct: ... at 0.1 % (at these audit sizes often the rate at 0 false positives).
        epsilon_lower_bound: The 95 % lower bound on epsilon its error rates imply.
        members: Members scored.
        nonmembers: Non-members scored.
    """

    auc: float
    tpr_at_1pct: float
    tpr_at_01pct: float
    epsilon_lower_bound: float
    members: int
    nonmembers: int

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    ok = fpr <= target
    return float(tpr[ok].max()) if ok.any() else 0.0


def _rates(members: np.ndarray, nonmembers: np.ndarray, threshold: float) -> tuple[int, int]:
    """True positives and false positives of "member when score >= threshold"."""
    return int((members >= threshold).sum()), int((nonmembers >= threshold).sum())


def _bound(tp: int, positives: int, fp: int, negatives: int, delta: float, alpha: float) -> float:
    """The (1 - alpha) lower bound on epsilon of an attack with ``tp`` of ``positives``
    members and ``fp`` of ``negatives`` non-members flagged: one-sided Clopper-Pearson bounds
    (TPR from below, FPR from above) put into both DP inequalities,
    TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta."""
    from scipy.stats import beta

    tpr_low = float(beta.ppf(alpha, tp, positives - tp + 1)) if tp > 0 else 0.0
    fpr_high = float(beta.ppf(1 - alpha, fp + 1, negatives - fp)) if fp < negatives else 1.0
    fnr_high, tnr_low = 1 - tpr_low, 1 - fpr_high
    bound = 0.0
    if tpr_low - delta > 0 and fpr_high > 0:
        bound = max(bound, math.log((tpr_low - delta) / fpr_high))
    if tnr_low - delta > 0 and fnr_high > 0:
        bound = max(bound, math.log((tnr_low - delta) / fnr_high))
    return bound


def epsilon_lower_bound(
    members: np.ndarray,
    nonmembers: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    seed: int = 0,
) -> float:
    """A ``confidence`` lower bound on epsilon from attack scores (higher = member).

    The threshold is the one whose bound is largest on a random half of each set; the bound
    reported is that threshold's on the other half (Clopper-Pearson, :func:`_bound`), so the
    choice does not inflate it.
    """
    rng = np.random.default_rng(seed)
    m, n = rng.permutation(members), rng.permutation(nonmembers)
    m_fit, m_test = m[: len(m) // 2], m[len(m) // 2 :]
    n_fit, n_test = n[: len(n) // 2], n[len(n) // 2 :]
    if not len(m_fit) or not len(n_fit):
        return 0.0
    alpha = 1 - confidence
    m_sorted, n_sorted = np.sort(m_fit), np.sort(n_fit)
    best_t, best = float(m_fit.min()), -1.0
    for t in np.unique(np.concatenate([m_fit, n_fit])):
        tp = len(m_sorted) - int(np.searchsorted(m_sorted, t, side="left"))
        fp = len(n_sorted) - int(np.searchsorted(n_sorted, t, side="left"))
        b = _bound(tp, len(m_fit), fp, len(n_fit), delta, alpha)
        if b > best:
            best_t, best = float(t), b
    tp, fp = _rates(m_test, n_test, best_t)
    return _bound(tp, len(m_test), fp, len(n_test), delta, alpha)


def summarize(
    members: torch.Tensor | np.ndarray,
    nonmembers: torch.Tensor | np.ndarray,
    *,
    delta: float,
    seed: int = 0,
) -> AttackResult:
    """AUC, TPR at low FPR and the epsilon lower bound of attack scores (higher = member)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    m = np.asarray(members, dtype=np.float64)
    n = np.asarray(nonmembers, dtype=np.float64)
    y = np.r_[np.ones(len(m)), np.zeros(len(n))]
    s = np.r_[m, n]
    fpr, tpr, _ = roc_curve(y, s)
    return AttackResult(
        auc=float(roc_auc_score(y, s)),
        tpr_at_1pct=_tpr_at(fpr, tpr, 0.01),
        tpr_at_01pct=_tpr_at(fpr, tpr, 0.001),
        epsilon_lower_bound=epsilon_lower_bound(m, n, delta=delta, seed=seed),
        members=len(m),
        nonmembers=len(n),
    )


@torch.no_grad()
def logan_scores(
    discriminator: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    batch: int = 256,
) -> torch.Tensor:
    """The discriminator's score of each image (a conditional one sees the true label)."""
    discriminator.eval()
    device = next(discriminator.parameters()).device
    out = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].to(device)
        if labels is None:
            out.append(discriminator(x).flatten().cpu())
        else:
            y = labels[start : start + batch].to(device)
            out.append(discriminator(x, y).flatten().cpu())
    return torch.cat(out).double()


def gan_leaks_scores(
    queries: torch.Tensor, generated: torch.Tensor, reference: torch.Tensor
) -> torch.Tensor:
    """Calibrated reconstruction distance: distance to the nearest reference image minus
    distance to the nearest generated image (higher = the generator explains the query better
    than the data's own density does)."""
    to_generated, _ = nearest_distances(queries, generated)
    to_reference, _ = nearest_distances(queries, reference)
    return to_reference - to_generated


def domias_scores(
    queries: torch.Tensor,
    generated: torch.Tensor,
    reference: torch.Tensor,
    *,
    dims: int = 8,
) -> torch.Tensor:
    """log p_generator(x) - log p_reference(x), each a Gaussian KDE (Scott's bandwidth) in
    the ``dims``-dimensional PCA embedding of the reference images."""
    from scipy.stats import gaussian_kde
    from sklearn.decomposition import PCA

    ref = reference.flatten(1).double().numpy()
    dims = max(1, min(dims, len(ref) - 1, ref.shape[1]))
    pca = PCA(n_components=dims, random_state=0).fit(ref)

    def embed(x: torch.Tensor) -> np.ndarray:
        return pca.transform(x.flatten(1).double().numpy()).T

    q = embed(queries)
    p_gen = gaussian_kde(embed(generated)).logpdf(q)
    p_ref = gaussian_kde(embed(reference)).logpdf(q)
    return torch.from_numpy(p_gen - p_ref)


__all__ = [
    "ATTACKS",
    "AttackResult",
    "domias_scores",
    "epsilon_lower_bound",
    "gan_leaks_scores",
    "logan_scores",
    "summarize",
]
