"""Partitioners that split a pool of labeled images across simulated hospitals."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedgan.catalog import PARTITIONERS as _PARTITIONERS
from fedgan.registry import Registry

Partitioner = Callable[..., list[np.ndarray]]

PARTITIONERS: Registry[Partitioner] = _PARTITIONERS  # declared in fedgan.catalog


def _check(n: int, num_parts: int) -> None:
    if num_parts < 1:
        raise ValueError(f"number of hospitals must be >= 1, got {num_parts}")
    if n < num_parts:
        raise ValueError(
            f"cannot split {n} images across {num_parts} hospitals: every hospital needs at "
            "least one image; use fewer hospitals or more data"
        )


@PARTITIONERS.register("iid")
def iid_partition(
    labels: np.ndarray, num_parts: int, *, seed: int, **_: object
) -> list[np.ndarray]:
    """Shuffles the indices and deals them into ``num_parts`` near-equal shares.

    Returns:
        One sorted index array per hospital; together they are disjoint and complete.
    """
    _check(len(labels), num_parts)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_parts)]


@PARTITIONERS.register("dirichlet")
def dirichlet_partition(
    labels: np.ndarray, num_parts: int, *, seed: int, alpha: float = 0.5, **_: object
) -> list[np.ndarray]:
    """Label skew: each class is split across hospitals by proportions ~ Dirichlet(alpha).

    Smaller ``alpha`` gives more skew. Draws are repeated (seeded) until every hospital holds
    at least one image.

    Raises:
        ValueError: If no draw in 100 leaves every hospital non-empty.
    """
    _check(len(labels), num_parts)
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _attempt in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
        for k in classes:
            idx = rng.permutation(np.flatnonzero(labels == k))
            props = rng.dirichlet(np.full(num_parts, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].append(chunk)
        merged = [np.sort(np.concatenate(p)) for p in parts]
        if all(len(m) > 0 for m in merged):
            return merged
    raise ValueError(
        f"dirichlet partition with alpha={alpha} left a hospital empty in 100 draws; "
        "raise data.dirichlet_alpha or lower federation.num_hospitals"
    )


@PARTITIONERS.register("quantity")
def quantity_partition(
    labels: np.ndarray, num_parts: int, *, seed: int, alpha: float = 0.5, **_: object
) -> list[np.ndarray]:
    """Quantity skew: hospital sizes ~ Dirichlet(alpha) above a floor of a tenth of an equal share,
    images dealt at random, so class mixes stay alike while sizes differ. Smaller ``alpha`` gives
    more unequal sizes."""
    _check(len(labels), num_parts)
    if alpha <= 0:
        raise ValueError(f"quantity alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    n = len(labels)
    props = rng.dirichlet(np.full(num_parts, alpha))
    # A floor first (a tenth of an equal share, at least one image: a hospital with a handful of
    # scans cannot fill a batch), the rest by the drawn proportions (largest remainders).
    floor = max(1, n // (10 * num_parts))
    extra = props * (n - floor * num_parts)
    sizes = np.floor(extra).astype(int)
    sizes[np.argsort(extra - sizes)[::-1][: n - floor * num_parts - sizes.sum()]] += 1
    sizes += floor
    order = rng.permutation(n)
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


@PARTITIONERS.register("site-shift")
def site_shift_partition(
    labels: np.ndarray,
    num_parts: int,
    *,
    seed: int,
    groups: np.ndarray | None = None,
    **_: object,
) -> list[np.ndarray]:
    """Site shift: hospital ``h`` holds everything from source site ``h`` (``data.site_folders``).

    Without site folders the split is IID and each hospital renders its share through its own
    scanner profile (applied by :func:`fedgan.data.hospital_pool`), so hospitals differ by
    acquisition rather than by labels.

    Raises:
        ValueError: If the number of site folders differs from the number of hospitals.
    """
    if groups is None:
        return iid_partition(labels, num_parts, seed=seed)
    sites = np.unique(groups)
    if len(sites) != num_parts:
        raise ValueError(
            f"site-shift partition: the data hold {len(sites)} site folders but "
            f"federation.num_hospitals is {num_parts}; make them equal"
        )
    return [np.flatnonzero(groups == s) for s in sites]
