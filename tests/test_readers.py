"""Reading real files (PNG folders, DICOM, NIfTI) through MONAI, bad files, new partitions."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fedgan.config import load_config
from fedgan.data import PARTITIONERS, check_site_data, hospital_pool, local_pool
from fedgan.data.readers import detect_format, read_folder
from fedgan.data.transforms import augmenter, fit_slice


def _data(*overrides: str):
    return load_config(None, ["data.image_size=16", *overrides]).data


def _png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _dicom_files(*names: str) -> list[Path]:
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = [get_testdata_file(n) for n in names]
    if any(f is None for f in files):
        pytest.skip(f"pydicom's test files {names} are not installed")
    return [Path(str(f)) for f in files]


def _nifti_dir() -> Path:
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data"


# --- image folders ------------------------------------------------------------------------


def test_png_folder_classes_rgb_and_orientation(tmp_path: Path) -> None:
    gradient = np.tile(np.arange(0, 240, 12, dtype=np.uint8)[None, :], (20, 1))  # left dark
    _png(tmp_path / "normal" / "a.png", gradient)
    rgb = np.zeros((24, 24, 3), dtype=np.uint8)
    rgb[:12] = 200  # top half bright
    _png(tmp_path / "lesion" / "b.png", rgb)
    pool = local_pool(str(tmp_path), _data())
    assert pool.images.shape == (2, 1, 16, 16)
    assert pool.classes == ("lesion", "normal") and pool.labels.tolist() == [0, 1]
    a, b = pool.images[1, 0], pool.images[0, 0]
    assert a[:, :4].mean() < a[:, -4:].mean()  # columns stay columns
    assert b[:4].mean() > 0.5 > b[-4:].mean()  # rows stay rows, RGB became gray
    rgb_pool = local_pool(str(tmp_path), _data("data.channels=3"))
    assert rgb_pool.images.shape == (2, 3, 16, 16)


def test_fit_modes_and_mixed_sizes(tmp_path: Path) -> None:
    wide = torch.zeros(1, 16, 32)
    wide[:, :, 8:24] = 1.0  # a bright square in the middle of a wide image
    assert fit_slice(wide, _data("data.fit=crop")).mean() == pytest.approx(1.0, abs=0.05)
    assert fit_slice(wide, _data("data.fit=resize")).mean() == pytest.approx(0.5, abs=0.05)
    assert fit_slice(wide, _data("data.fit=pad")).mean() < 0.4
    _png(tmp_path / "ok.png", np.zeros((16, 16), dtype=np.uint8))
    _png(tmp_path / "odd.png", np.zeros((20, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"odd\.png.*20x16.*data\.fit"):
        local_pool(str(tmp_path), _data("data.fit=none"))
    skipped = local_pool(str(tmp_path), _data("data.fit=none", "data.skip_bad_files=true"))
    assert len(skipped.images) == 1 and "odd.png" in skipped.skipped[0][0]


def test_corrupt_files_name_the_file_or_are_skipped(tmp_path: Path) -> None:
    _png(tmp_path / "good.png", np.full((16, 16), 100, dtype=np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=r"broken\.png.*skip_bad_files"):
        read_folder(tmp_path, "folder", _data())
    found = read_folder(tmp_path, "folder", _data("data.skip_bad_files=true"))
    assert len(found.slices) == 1 and found.skipped[0][0].endswith("broken.png")
    with pytest.raises(ValueError, match="no dicom files"):
        read_folder(tmp_path, "dicom", _data())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        local_pool(str(tmp_path / "nowhere"), _data())
    with pytest.raises(ValueError, match="data-format"):
        local_pool(str(tmp_path), _data(), "jpeg2000")


# --- DICOM --------------------------------------------------------------------------------


def test_dicom_rescale_window_and_truncated_file(tmp_path: Path) -> None:
    ct, mr, truncated = _dicom_files("CT_small.dcm", "MR_small.dcm", "MR_truncated.dcm")
    shutil.copy(ct, tmp_path / "ct.dcm")
    shutil.copy(mr, tmp_path / "mr")  # DICOM files often have no extension
    assert detect_format(tmp_path) == "dicom"
    found = read_folder(tmp_path, "dicom", _data())
    assert len(found.slices) == 2 and all(s.min() >= 0 and s.max() <= 1 for s in found.slices)
    # CT_small stores raw values with intercept -1024: a narrow window around water (0 HU)
    # and one around bone (+700 HU) see different pixels, which only works on rescaled HU.
    water = read_folder(tmp_path, "dicom", _data("data.window_center=0", "data.window_width=200"))
    bone = read_folder(tmp_path, "dicom", _data("data.window_center=700", "data.window_width=200"))
    ct_index = found.sources.index(str(tmp_path / "ct.dcm"))
    assert water.slices[ct_index].mean() > bone.slices[ct_index].mean() + 0.1
    shutil.copy(truncated, tmp_path / "truncated.dcm")
    with pytest.raises(ValueError, match=r"truncated\.dcm"):
        read_folder(tmp_path, "dicom", _data())
    pool = local_pool(str(tmp_path), _data("data.skip_bad_files=true"), "dicom")
    assert pool.images.shape == (2, 1, 16, 16) and len(pool.skipped) == 1
    # a stray file without a suffix (a README, a lock file) is read as DICOM and refused in
    # fedgan's words, not with pydicom's advice to its own callers (force=True)
    (tmp_path / "truncated.dcm").unlink()
    (tmp_path / "NOTES").write_text("scanner moved to room 2\n")
    with pytest.raises(ValueError, match=r"'.*NOTES': not a DICOM file \(no DICM header") as err:
        read_folder(tmp_path, "dicom", _data())
    assert "force" not in str(err.value)


# --- NIfTI --------------------------------------------------------------------------------


def test_nifti_slices_along_axis_and_empty_slices_dropped(tmp_path: Path) -> None:
    import nibabel as nib

    volume = np.zeros((24, 20, 10), dtype=np.float32)
    volume[4:20, 4:16, 2:7] = np.random.default_rng(0).uniform(100, 1000, (16, 12, 5))
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "vol.nii.gz")
    axis2 = read_folder(tmp_path, "nifti", _data())
    assert len(axis2.slices) == 5  # the 5 slices with content; the 5 empty ones dropped
    assert axis2.slices[0].shape == (1, 20, 24)
    axis0 = read_folder(tmp_path, "nifti", _data("data.slice_axis=0"))
    assert len(axis0.slices) == 16 and axis0.slices[0].shape == (1, 10, 20)
    shutil.copy(_nifti_dir() / "anatomical.nii", tmp_path / "anatomical.nii")
    pool = local_pool(str(tmp_path), _data(), "nifti")
    assert len(pool.images) > 5 and pool.images.shape[1:] == (1, 16, 16)
    assert set(pool.files) == {str(tmp_path / "vol.nii.gz"), str(tmp_path / "anatomical.nii")}


def test_nifti_holdout_keeps_volumes_whole(tmp_path: Path) -> None:
    import nibabel as nib

    rng = np.random.default_rng(1)
    for i in range(6):
        nib.save(
            nib.Nifti1Image(rng.uniform(1, 2, (12, 12, 4)).astype(np.float32), np.eye(4)),
            tmp_path / f"v{i}.nii",
        )
    cfg = load_config(
        None,
        [
            "data.image_size=16",
            "data.source=nifti",
            f"data.path={tmp_path}",
            "data.eval_fraction=0.34",
            "federation.num_hospitals=2",
        ],
    )
    from fedgan.data import _pools

    train, held = _pools(cfg.data, 0)
    assert len(train.images) == 16 and len(held.images) == 8
    assert not set(train.files) & set(held.files)


# --- partitions and augmentation ----------------------------------------------------------


def test_quantity_alpha_controls_size_skew() -> None:
    labels = np.zeros(2000, dtype=int)
    split = PARTITIONERS.get("quantity")
    spread = {
        a: np.mean([np.std([len(p) for p in split(labels, 5, seed=s, alpha=a)]) for s in range(5)])
        for a in (0.2, 1.0, 100.0)
    }
    assert spread[0.2] > spread[1.0] > spread[100.0]
    assert min(len(p) for p in split(labels, 5, seed=0, alpha=0.05)) >= 2000 // 50


def test_site_shift_from_site_folders_and_from_scanner_profiles(tmp_path: Path) -> None:
    for site, value in (("site-a", 50), ("site-b", 200)):
        for i in range(4):
            _png(tmp_path / site / f"{i}.png", np.full((16, 16), value + i, dtype=np.uint8))
    cfg = load_config(
        None,
        [
            "data.image_size=16",
            "data.source=folder",
            f"data.path={tmp_path}",
            "data.site_folders=true",
            "data.partition=site-shift",
            "data.eval_fraction=0",
        ],
    )
    a, b = (hospital_pool(cfg.data, 0, h, 2) for h in range(2))
    assert a.images.mean() < 0.25 < 0.75 < b.images.mean()
    with pytest.raises(ValueError, match="2 site folders.*num_hospitals is 3"):
        hospital_pool(cfg.data, 0, 0, 3)
    # Without site folders: an IID split, each hospital through its own scanner profile.
    flat = load_config(
        None,
        [
            "data.image_size=16",
            "data.source=folder",
            f"data.path={tmp_path / 'site-a'}",
            "data.partition=site-shift",
            "data.eval_fraction=0",
        ],
    )
    iid = load_config(
        None,
        [
            "data.image_size=16",
            "data.source=folder",
            f"data.path={tmp_path / 'site-a'}",
            "data.eval_fraction=0",
        ],
    )
    shifted = [hospital_pool(flat.data, 0, h, 2).images for h in range(2)]
    plain = [hospital_pool(iid.data, 0, h, 2).images for h in range(2)]
    assert not torch.allclose(shifted[1], plain[1])


def test_augmenter_is_seeded_flips_and_rotates() -> None:
    assert augmenter(_data()) is None
    x = torch.rand(8, 1, 16, 16)
    flip_only = augmenter(_data("data.augment=true", "data.augment_rotation=0"))
    out = flip_only(x, torch.Generator().manual_seed(0))
    for orig, new in zip(x, out, strict=True):
        assert torch.allclose(new, orig, atol=1e-5) or torch.allclose(new, orig.flip(-1), atol=1e-5)
    rotate = augmenter(_data("data.augment=true", "data.augment_rotation=20"))
    a = rotate(x, torch.Generator().manual_seed(3))
    b = rotate(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.allclose(a, x)


def test_data_describe_command(tmp_path: Path, capsys) -> None:
    from fedgan.cli import main

    rc = main(
        [
            "data",
            "describe",
            "--set",
            "data.image_size=16",
            "--set",
            "data.num_images=96",
            "--set",
            "data.partition=quantity",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "held-out" in out and "quantity partition over 4 hospitals" in out
    assert (tmp_path / "partition.png").stat().st_size > 1000
    assert (tmp_path / "samples.png").stat().st_size > 1000
    import json

    rows = json.loads((tmp_path / "describe.json").read_text())
    assert sum(r["images"] for r in rows) == 96


# --- a site's data, checked before its SuperNode starts -------------------------------------


def test_a_sites_data_is_checked_before_it_joins(tmp_path: Path) -> None:
    """``fedgan data check`` (and clients/start-supernode.sh): the files listed, one read, and
    every way a site's DATA_PATH can be wrong named in one line."""
    for i, cls in enumerate(["normal", "normal", "pneumonia"]):
        _png(tmp_path / "pngs" / cls / f"{i}.png", np.full((20, 20), 40 * i, np.uint8))
    said = check_site_data(tmp_path / "pngs")
    assert "3 image (PNG/JPEG/TIFF) files in class folders normal, pneumonia" in said
    (ct,) = _dicom_files("CT_small.dcm")
    shutil.copy(ct, tmp_path / "dcm.dcm")
    (tmp_path / "dcm").mkdir()
    shutil.copy(ct, tmp_path / "dcm" / "a.dcm")
    assert "1 DICOM files (no class folders)" in check_site_data(tmp_path / "dcm", "dicom")
    npz = tmp_path / "site.npz"
    np.savez(npz, train_images=np.zeros((5, 8, 8), np.uint8), train_labels=np.zeros((5, 1), int))
    assert "MedMNIST-layout .npz, 5 training images" in check_site_data(npz)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.dcm").write_bytes(b"not a dicom file")
    wrong = [
        (tmp_path / "nowhere", "", FileNotFoundError, "does not exist"),
        (tmp_path / "dcm.dcm", "", ValueError, "is a single .dcm file"),
        (tmp_path / "empty", "", ValueError, "no images under"),
        (tmp_path / "pngs", "dicom", ValueError, "no dicom files"),
        (tmp_path / "pngs", "jpeg2000", ValueError, "is not a file format"),
        (tmp_path / "bad", "", ValueError, r"x\.dcm: .*check DATA_FORMAT \(dicom\)"),
    ]
    for path, fmt, kind, says in wrong:
        with pytest.raises(kind, match=says):
            check_site_data(path, fmt)
    bad_npz = tmp_path / "other.npz"
    np.savez(bad_npz, images=np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="no 'train_images'"):
        check_site_data(bad_npz)
