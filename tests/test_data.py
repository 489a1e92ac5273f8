"""Data: phantom determinism and site differences, partition invariants, hospital views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedgan.config import Config, load_config
from fedgan.data import (
    PARTITIONERS,
    eval_dataset,
    hospital_dataset,
    local_dataset,
    pooled_dataset,
)
from fedgan.data.phantom import apply_scanner, render_phantoms, site_profile


def test_phantoms_are_deterministic_and_seed_dependent() -> None:
    a, la = render_phantoms(16, 32, seed=5)
    b, lb = render_phantoms(16, 32, seed=5)
    c, _ = render_phantoms(16, 32, seed=6)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.shape == (16, 1, 32, 32) and a.min() >= 0.0 and a.max() <= 1.0


def test_lesion_label_changes_the_image() -> None:
    imgs, labels = render_phantoms(400, 32, seed=0, lesion_fraction=0.5)
    assert 0.35 < labels.float().mean() < 0.65
    # Lesions are bright nodules in dark lungs: lesion slices are brighter on average.
    assert imgs[labels == 1].mean() > imgs[labels == 0].mean()
    _none, lab0 = render_phantoms(50, 32, seed=0, lesion_fraction=0.0)
    assert lab0.sum() == 0


def test_sites_differ_measurably() -> None:
    clean, _ = render_phantoms(64, 32, seed=1)
    views = [apply_scanner(clean, site_profile(s), seed=s) for s in range(4)]
    means = [float(v.mean()) for v in views]
    # High-frequency energy reflects noise and blur differences between scanners.
    hf = [float((v[..., 1:] - v[..., :-1]).abs().mean()) for v in views]
    assert max(means) - min(means) > 0.02
    assert max(hf) / min(hf) > 1.3
    assert site_profile(7) == site_profile(7) and site_profile(7) != site_profile(8)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "quantity", "site-shift"])
def test_partitions_are_disjoint_complete_and_seeded(name: str) -> None:
    labels = np.random.default_rng(0).integers(0, 3, size=500)
    split = PARTITIONERS.get(name)
    parts = split(labels, 5, seed=1, alpha=0.5)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == 500  # disjoint and complete
    assert all(len(p) > 0 for p in parts)
    again = split(labels, 5, seed=1, alpha=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))
    other = split(labels, 5, seed=2, alpha=0.5)
    assert not all(np.array_equal(x, y) for x, y in zip(parts, other, strict=True))


def _label_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    global_p = np.bincount(labels, minlength=2) / len(labels)
    return float(
        np.mean(
            [np.abs(np.bincount(labels[p], minlength=2) / len(p) - global_p).sum() for p in parts]
        )
    )


def test_dirichlet_alpha_controls_skew() -> None:
    labels = np.random.default_rng(0).integers(0, 2, size=2000)
    split = PARTITIONERS.get("dirichlet")
    skew = {
        a: np.mean([_label_skew(split(labels, 5, seed=s, alpha=a), labels) for s in range(5)])
        for a in (0.1, 1.0, 100.0)
    }
    assert skew[0.1] > skew[1.0] > skew[100.0]
    iid = _label_skew(PARTITIONERS.get("iid")(labels, 5, seed=0), labels)
    assert iid < skew[1.0]


def test_partition_refuses_more_hospitals_than_images() -> None:
    with pytest.raises(ValueError, match="every hospital needs at least one image"):
        PARTITIONERS.get("iid")(np.zeros(3, dtype=int), 4, seed=0)


def test_hospital_data_pooled_and_eval(toy_config: Config) -> None:
    d = toy_config.data
    parts = [hospital_dataset(d, 0, h, 3) for h in range(3)]
    pooled = pooled_dataset(d, 0, 3)
    ev = eval_dataset(d, 0, 3)
    assert sum(len(p) for p in parts) == len(pooled)
    assert len(pooled) + len(ev) == d.num_images
    for ds in (*parts, pooled, ev):
        x = ds.tensors[0]
        assert x.shape[1:] == (1, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(pooled.tensors[0][: len(parts[0])], parts[0].tensors[0])
    with pytest.raises(ValueError, match="outside 0..2"):
        hospital_dataset(d, 0, 3, 3)


def test_medmnist_npz_and_missing_path(pneumonia_npz, tmp_path) -> None:
    cfg = load_config(None, ["data.source=medmnist", f"data.path={pneumonia_npz}"])
    ds = hospital_dataset(cfg.data, 0, 0, 2)
    assert ds.tensors[0].shape[1:] == (1, 32, 32)
    assert set(ds.tensors[1].unique().tolist()) <= {0, 1}
    assert len(local_dataset(pneumonia_npz, cfg.data)) == 4708
    bad = load_config(None, ["data.source=medmnist", f"data.path={tmp_path / 'nothing'}"])
    with pytest.raises(FileNotFoundError, match="data.path"):
        hospital_dataset(bad.data, 0, 0, 2)


def test_local_folder_dataset(tmp_path) -> None:
    from PIL import Image

    for cls in ("normal", "lesion"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 20), 40 * i, dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    cfg = load_config(None, ["data.image_size=16"])
    ds = local_dataset(tmp_path, cfg.data)
    assert ds.tensors[0].shape == (6, 1, 16, 16)
    assert sorted(ds.tensors[1].tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(FileNotFoundError, match="data-path"):
        local_dataset(tmp_path / "missing", cfg.data)


def test_phantom_lesion_masks_match_the_drawn_nodules() -> None:
    from fedgan.data.phantom import render_phantoms_with_masks

    images, labels, masks = render_phantoms_with_masks(200, 32, seed=4)
    plain, plain_labels = render_phantoms(200, 32, seed=4)
    assert torch.equal(images, plain) and torch.equal(labels, plain_labels)
    assert masks.shape == images.shape and set(masks.unique().tolist()) <= {0.0, 1.0}
    lesion = labels == 1
    assert masks[~lesion].sum() == 0  # a lesion-free slice has an empty mask
    area = masks[lesion].sum((1, 2, 3))
    assert area.min() >= 3 and area.max() < 0.05 * 32 * 32  # one small nodule each
    # inside the mask the slice has the nodule's intensity (0.62; at least half of it on the
    # anti-aliased edge); the same anatomy rendered without lesions differs only around them
    healthy, _, _ = render_phantoms_with_masks(200, 32, seed=4, lesion_fraction=0.0)
    inside = images[lesion][masks[lesion] > 0]
    assert (inside - 0.62).abs().median() < 0.01 and inside.min() > 0.3
    changed = (images - healthy).abs() > 0.05
    rim = torch.nn.functional.max_pool2d(masks, 3, stride=1, padding=1)  # one pixel around
    assert (changed & (rim == 0)).sum() == 0  # only the soft edge lies outside the mask
    assert (masks.bool() & ~changed).sum() <= 0.1 * masks.sum()


def _site(root, classes: dict[str, int]):  # type: ignore[no-untyped-def]
    """A site's folder: ``classes`` maps a class folder to how many PNGs it holds, each
    image's grey level telling its class (normal 40, lesion 200)."""
    from PIL import Image

    level = {"normal": 40, "lesion": 200, "other": 120}
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((20, 20), level[cls], dtype=np.uint8)).save(
                root / cls / f"{i}.png"
            )
    return root


def test_data_classes_numbers_every_site_alike(tmp_path) -> None:
    """Sorted folder names number each site's classes by what that site happens to hold: a
    site with only normal/ calls it 0, one with lesion/ too calls it 1. data.classes fixes the
    order for all of them, so data.train_label and a cgan's labels mean one class everywhere."""
    both = _site(tmp_path / "a", {"lesion": 2, "normal": 3})
    only = _site(tmp_path / "b", {"normal": 3})

    def healthy_label(site, *extra: str) -> set[int]:  # type: ignore[no-untyped-def]
        cfg = load_config(None, ["data.image_size=16", *extra]).data
        images, labels = local_dataset(site, cfg).tensors
        return set(labels[images.mean((1, 2, 3)) < 0].tolist())  # the dark (normal) images

    assert healthy_label(both) != healthy_label(only)  # the bug data.classes exists for
    fixed = "data.classes=normal,lesion"
    assert healthy_label(both, fixed) == healthy_label(only, fixed) == {0}
    cfg = load_config(None, ["data.image_size=16", fixed, "data.train_label=0"]).data
    assert len(local_dataset(only, cfg)) == len(local_dataset(both, cfg)) == 3


def test_data_classes_refuses_a_folder_it_does_not_name(tmp_path) -> None:
    site = _site(tmp_path, {"normal": 2, "other": 2})
    cfg = load_config(None, ["data.image_size=16", "data.classes=normal,lesion"]).data
    with pytest.raises(ValueError, match="other.*data.classes"):
        local_dataset(site, cfg)
    with pytest.raises(ValueError, match="data.classes"):
        load_config(None, ["data.classes=normal,normal"])
