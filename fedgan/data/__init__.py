"""Hospital data: sources by name, partitions for simulations, local data for deployments."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import TensorDataset

from fedgan.data.partition import PARTITIONERS
from fedgan.data.phantom import apply_scanner, site_profile
from fedgan.data.sources import DATASETS, ImagePool, fit_images, folder_pool, npz_pool

if TYPE_CHECKING:
    from fedgan.config import DataSection

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "ImagePool",
    "check_site_data",
    "eval_dataset",
    "eval_masks",
    "fit_images",
    "hospital_dataset",
    "local_dataset",
    "pooled_dataset",
]


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the range the generators produce."""
    return images * 2.0 - 1.0


@lru_cache(maxsize=4)
def _pools(cfg: DataSection, seed: int) -> tuple[ImagePool, ImagePool]:
    # Cached per process: a simulation's ClientApp is called every round in the same worker.
    return DATASETS.get(cfg.source).load(cfg, seed)


@lru_cache(maxsize=4)
def _partition(cfg: DataSection, seed: int, num_hospitals: int) -> tuple:
    train, _ = _pools(cfg, seed)
    parts = PARTITIONERS.get(cfg.partition)(
        train.labels.numpy(),
        num_hospitals,
        seed=seed,
        alpha=cfg.dirichlet_alpha,
        groups=None if train.sites is None else train.sites.numpy(),
    )
    return tuple(parts)


def _scanner_view(cfg: DataSection, images: torch.Tensor, hospital: int, seed: int) -> torch.Tensor:
    """Hospital ``hospital``'s rendering: the source's own (the phantom's scanners), or, for a
    ``site-shift`` partition of data without site folders, a synthetic scanner profile."""
    source = DATASETS.get(cfg.source)
    if cfg.partition == "site-shift" and not cfg.site_folders and source.plain:
        return apply_scanner(images, site_profile(hospital), seed=seed * 1000 + hospital)
    return source.hospital_view(images, hospital, seed)


def train_only(pool: ImagePool, cfg: DataSection) -> ImagePool:
    """The images a hospital trains on: all, or those of ``data.train_label``."""
    if cfg.train_label < 0:
        return pool
    return pool.subset(torch.nonzero(pool.labels == cfg.train_label).flatten())


def hospital_pool(cfg: DataSection, seed: int, hospital: int, num_hospitals: int) -> ImagePool:
    """Hospital ``hospital``'s share of the training pool, as its scanner renders it."""
    if not 0 <= hospital < num_hospitals:
        raise ValueError(f"hospital index {hospital} is outside 0..{num_hospitals - 1}")
    train, _ = _pools(cfg, seed)
    part = train_only(train.subset(_partition(cfg, seed, num_hospitals)[hospital]), cfg)
    if len(part.labels) == 0:
        raise ValueError(
            f"hospital {hospital} received no images from the {cfg.partition!r} partition"
            + (f" of label {cfg.train_label}" if cfg.train_label >= 0 else "")
            + "; use fewer hospitals, more data, or a larger data.dirichlet_alpha"
        )
    return replace(part, images=_scanner_view(cfg, part.images, hospital, seed))


def hospital_dataset(
    cfg: DataSection, seed: int, hospital: int, num_hospitals: int
) -> TensorDataset:
    """The training data of one simulated hospital: ``(image in [-1, 1], label)`` pairs."""
    pool = hospital_pool(cfg, seed, hospital, num_hospitals)
    return TensorDataset(to_signed(pool.images), pool.labels)


def pooled_dataset(cfg: DataSection, seed: int, num_hospitals: int) -> TensorDataset:
    """Every hospital's training data in one set: the centralized baseline sees exactly these."""
    pools = [hospital_pool(cfg, seed, h, num_hospitals) for h in range(num_hospitals)]
    return TensorDataset(
        to_signed(torch.cat([p.images for p in pools])), torch.cat([p.labels for p in pools])
    )


def eval_dataset(cfg: DataSection, seed: int, num_hospitals: int) -> TensorDataset:
    """Held-out real images for central evaluation, rendered round-robin by every hospital's
    scanner so they follow the consortium's mix of sites."""
    _, pool = _pools(cfg, seed)
    images = pool.images.clone()
    for h in range(min(num_hospitals, len(images))):  # fewer images than hospitals: some get none
        idx = torch.arange(h, len(images), num_hospitals)
        images[idx] = _scanner_view(cfg, pool.images[idx], h, seed + 99_991)
    return TensorDataset(to_signed(images), pool.labels)


def eval_masks(cfg: DataSection, seed: int) -> torch.Tensor | None:
    """The lesion masks of :func:`eval_dataset`'s images, where the source knows them (the
    phantom); a scanner moves nothing, so they hold for every hospital's rendering."""
    return _pools(cfg, seed)[1].masks


@lru_cache(maxsize=2)
def local_pool(path: str, cfg: DataSection, fmt: str = "") -> ImagePool:
    """A deployed hospital's own data from its SuperNode ``data-path``: a MedMNIST-layout
    ``.npz`` (its train split) or a folder of images, DICOM or NIfTI files (``fmt``: ``folder``,
    ``dicom``, ``nifti``; detected from the files when empty). Cached per process.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: For an unknown format or unusable files (naming the file and the fix).
    """
    p = _site_path(path, fmt)
    if p.is_file():
        return npz_pool(p, "train", cfg)
    return folder_pool(p, cfg, fmt or None)


def _site_path(path: str | Path, fmt: str) -> Path:
    """A site's ``data-path`` as a path: an existing ``.npz`` file or folder, and a known
    ``data-format`` (or none).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: For a single file that is not an ``.npz``, or an unknown format.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"data-path {str(p)!r} does not exist; set the site's DATA_PATH (the SuperNode's "
            "node config data-path) to its .npz file or image folder"
        )
    if p.is_file() and p.suffix != ".npz":
        raise ValueError(
            f"data-path {str(p)!r} is a single {p.suffix or 'extension-less'} file; point it at "
            "a MedMNIST-layout .npz or at the folder holding the site's images"
        )
    if fmt and fmt not in ("folder", "dicom", "nifti"):
        raise ValueError(
            f"data-format {fmt!r} is not a file format; use folder (PNG/JPEG/TIFF), dicom or nifti"
        )
    return p


def check_site_data(path: str | Path, fmt: str = "") -> str:
    """What a SuperNode's ``data-path`` holds, checked before the site joins a study: a
    MedMNIST-layout ``.npz`` (its train split read), or a folder with files of ``fmt`` (detected
    when empty) of which the first reads. Cheap on a large site: it lists the files and reads
    one. ``clients/start-supernode.sh`` and ``fedgan data check`` run it.

    Returns:
        One line: how many images or files, of which format, in which class folders.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: For a single non-``.npz`` file, an unknown format, a folder with no file of
            the format, or a first file that does not read (naming it and the fix).
    """
    from fedgan.config import DataSection
    from fedgan.data.readers import FORMATS, BadFile, detect_format, list_files
    from fedgan.data.sources import npz_arrays

    p = _site_path(path, fmt)
    if p.is_file():
        images, _ = npz_arrays(p, "train")
        return f"{p}: a MedMNIST-layout .npz, {len(images)} training images"
    fmt = fmt or detect_format(p)
    files = list_files(p, fmt)
    if not files:
        raise ValueError(
            f"no {fmt} files ({', '.join(FORMATS.get(fmt).suffixes)}) under {str(p)!r}; check "
            "DATA_PATH and DATA_FORMAT"
        )
    try:
        FORMATS.get(fmt).read(files[0], DataSection())
    except BadFile as err:
        raise ValueError(
            f"{files[0]}: {err}; check DATA_FORMAT ({fmt}) or remove the file"
        ) from None
    classes = sorted({f.relative_to(p).parts[0] for f in files if f.parent != p})
    where = f"in class folders {', '.join(classes)}" if classes else "(no class folders)"
    kind = {"folder": "image (PNG/JPEG/TIFF)", "dicom": "DICOM", "nifti": "NIfTI"}[fmt]
    return f"{p}: {len(files)} {kind} files {where}; the first, {files[0].name}, reads"


def local_dataset(path: str | Path, cfg: DataSection, fmt: str = "") -> TensorDataset:
    """:func:`local_pool` as training pairs ``(image in [-1, 1], label)``."""
    pool = train_only(local_pool(str(path), cfg, fmt), cfg)
    if len(pool.labels) == 0:
        raise ValueError(
            f"data-path {str(path)!r} holds no image of label {cfg.train_label} "
            "(data.train_label); check the site's class folders or the setting"
        )
    return TensorDataset(to_signed(pool.images), pool.labels)
