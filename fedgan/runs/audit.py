"""``fedgan audit``: membership-inference attacks against a finished run's released networks.

Members are the hospitals' training images (the simulation knows each hospital's partition),
non-members are held-out images of the same data set: half of the evaluation split; the
other half is the attacks' reference set. The accountant's epsilon stands beside what the
attacks measure, so a reader sees both the guarantee and what an attacker learns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import TensorDataset

from fedgan.config import Config
from fedgan.data import eval_dataset, pooled_dataset, to_signed
from fedgan.data.sources import medmnist_file, npz_pool
from fedgan.device import resolve_device
from fedgan.evaluation.central import sample
from fedgan.evaluation.membership import (
    AttackResult,
    domias_scores,
    gan_leaks_scores,
    logan_scores,
    summarize,
)
from fedgan.models import FAMILIES, ImageShape, build_networks, load_state

#: delta for the empirical bound of a run without DP-SGD.
DEFAULT_DELTA = 1e-5


def accounted(records: Sequence[Mapping[str, Any]]) -> tuple[float, float]:
    """The largest epsilon any hospital spent in a run's records, and its delta
    (``(nan, nan)`` without DP-SGD)."""
    eps, delta = math.nan, math.nan
    for record in records:
        for row in record.get("hospitals", {}).values():
            if "epsilon" in row and not row["epsilon"] <= eps:
                eps, delta = float(row["epsilon"]), float(row["delta"])
    return eps, delta


#: Where non-members come from (``fedgan audit --nonmembers``).
NONMEMBER_SOURCES = ("auto", "eval", "val")


def heldout(cfg: Config, source: str) -> tuple[TensorDataset, str]:
    """The held-out images non-members and reference images are drawn from, and their name.

    ``val``: a MedMNIST subset's validation split, cut from the same pool as its training
    split (its test split is a different collection: PneumoniaMNIST's has another class mix
    and other patients, so an attack would detect the collection, not the membership).
    ``eval``: the run's evaluation split. ``auto``: ``val`` for MedMNIST, else ``eval``.

    Raises:
        ValueError: For ``val`` on a source without one.
    """
    if source == "auto":
        source = "val" if cfg.data.source == "medmnist" else "eval"
    if source == "val":
        if cfg.data.source != "medmnist":
            raise ValueError(
                f"--nonmembers val needs a MedMNIST run (its validation split); data.source is "
                f"{cfg.data.source!r}: use --nonmembers eval"
            )
        pool = npz_pool(medmnist_file(cfg.data), "val", cfg.data)
        return TensorDataset(to_signed(pool.images), pool.labels), "medmnist validation split"
    n = cfg.federation.num_hospitals
    return eval_dataset(cfg.data, cfg.run.seed, n), "evaluation split"


def audit_sets(
    cfg: Config, *, max_images: int, seed: int, nonmembers: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(members, member_labels, nonmembers, nonmember_labels, reference)``: equal numbers
    of members and non-members (at most ``max_images`` each) with the same class mix, and a
    disjoint reference set (the other half of the held-out split).

    Raises:
        ValueError: If the held-out split is too small to audit.
    """
    n = cfg.federation.num_hospitals
    train = pooled_dataset(cfg.data, cfg.run.seed, n)
    held, _ = heldout(cfg, nonmembers)
    g = torch.Generator().manual_seed(seed)
    held_order = torch.randperm(len(held), generator=g)
    half = len(held) // 2
    if half < 20:
        raise ValueError(
            f"the held-out split has {len(held)} images, too few for an audit (40 at least): "
            "raise data.eval_fraction or data.num_images"
        )
    ref_idx, non_idx = held_order[:half], held_order[half:]
    images, labels = train.tensors
    held_images, held_labels = held.tensors
    non_idx = non_idx[: min(max_images, len(non_idx))]
    # Members with the non-members' class mix (a held-out split's mix may differ from the
    # training split's: an attack would otherwise detect the class, not the membership).
    order = torch.randperm(len(train), generator=g)
    mem_parts, non_parts = [], []
    for label in held_labels[non_idx].unique():
        of_label = order[labels[order] == label]
        wanted = non_idx[held_labels[non_idx] == label]
        k = min(len(of_label), len(wanted))
        mem_parts.append(of_label[:k])
        non_parts.append(wanted[:k])
    mem_idx, non_idx = torch.cat(mem_parts), torch.cat(non_parts)
    if len(mem_idx) < 20:
        raise ValueError(
            f"only {len(mem_idx)} training images match the held-out images' classes; an audit "
            "needs 20 at least"
        )
    return (
        images[mem_idx],
        labels[mem_idx],
        held_images[non_idx],
        held_labels[non_idx],
        held_images[ref_idx],
    )


def audit_run(
    cfg: Config,
    state: Mapping[str, torch.Tensor],
    records: Sequence[Mapping[str, Any]],
    *,
    max_images: int = 1000,
    num_generated: int = 2000,
    nonmembers: str = "auto",
) -> dict[str, Any]:
    """Runs every attack against ``state`` (the run's released networks).

    Returns:
        ``attacks`` (each :class:`AttackResult` as JSON, or the reason it was skipped),
        the set sizes, and the accountant's ``epsilon``/``delta`` beside them.

    Raises:
        ValueError: If the run is not a synthesis run, or its held-out split is too small.
    """
    if cfg.task.name != "synthesis":
        raise ValueError(
            f"fedgan audit attacks a synthesis run's generator and discriminator; this run's "
            f"task is {cfg.task.name!r}"
        )
    seed = cfg.run.seed + 77_777
    source = heldout(cfg, nonmembers)[1]
    members, member_labels, nonmember_images, nonmember_labels, reference = audit_sets(
        cfg, max_images=max_images, seed=seed, nonmembers=nonmembers
    )
    eps, delta = accounted(records)
    bound_delta = delta if delta == delta else DEFAULT_DELTA
    device = resolve_device(cfg.train.device)
    shape = ImageShape(cfg.data.channels, cfg.data.image_size)
    nets = build_networks(cfg.model, shape, seed=cfg.run.seed)
    load_state(nets, dict(state))
    for net in nets.values():
        net.to(device).eval()
    generated, _ = sample(nets["generator"], num_generated, seed=seed, device=device)

    attacks: dict[str, Any] = {}
    conditional = FAMILIES.get(cfg.model.family).conditional

    def run(name: str, m: torch.Tensor, n: torch.Tensor) -> None:
        result: AttackResult = summarize(m, n, delta=bound_delta, seed=seed)
        attacks[name] = result.to_json()

    if cfg.federation.share_discriminator == 0:
        attacks["logan"] = {"skipped": "the discriminators never left the hospitals"}
    else:
        d = nets["discriminator"]
        m_y = member_labels.long() if conditional else None
        n_y = nonmember_labels.long() if conditional else None
        run("logan", logan_scores(d, members, m_y), logan_scores(d, nonmember_images, n_y))
    run("gan_leaks", gan_leaks_scores(members, generated, reference),
        gan_leaks_scores(nonmember_images, generated, reference))  # fmt: skip
    run("domias", domias_scores(members, generated, reference),
        domias_scores(nonmember_images, generated, reference))  # fmt: skip
    return {
        "attacks": attacks,
        "members": len(members),
        "nonmembers": len(nonmember_images),
        "nonmember_source": source,
        "reference": len(reference),
        "generated": num_generated,
        "accounted_epsilon": eps,
        "delta": bound_delta,
    }


def audit_table(result: Mapping[str, Any]) -> str:
    """The audit as a few lines of text."""
    lines = [
        f"members {result['members']}  non-members {result['nonmembers']}  reference "
        f"{result['reference']}  generated {result['generated']}  accounted epsilon "
        f"{result['accounted_epsilon']:.3g} (delta {result['delta']:.2g})",
        f"{'attack':<10} {'AUC':>6} {'TPR@1%':>7} {'TPR@0.1%':>8} {'eps lower bound':>16}",
    ]
    for name, row in result["attacks"].items():
        if "skipped" in row:
            lines.append(f"{name:<10} skipped: {row['skipped']}")
            continue
        lines.append(
            f"{name:<10} {row['auc']:6.3f} {row['tpr_at_1pct']:7.3f} {row['tpr_at_01pct']:8.3f} "
            f"{row['epsilon_lower_bound']:16.3f}"
        )
    return "\n".join(lines)


__all__ = ["accounted", "audit_run", "audit_sets", "audit_table"]
