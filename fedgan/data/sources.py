"""Data sources by name: each yields a training pool and an evaluation pool of labeled images.

Images leave a source as float32 ``[N, C, H, W]`` in [0, 1] at the configured size; the caller
normalizes them to [-1, 1]. A source may also render a hospital's view of its images (the
phantom's scanner profiles); the others leave images as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fedgan.catalog import DATASETS as _DATASETS
from fedgan.data.phantom import apply_scanner, render_phantoms_with_masks, site_profile
from fedgan.data.readers import detect_format, read_folder
from fedgan.data.transforms import convert_channels, fit_slice
from fedgan.registry import Registry

if TYPE_CHECKING:
    from fedgan.config import DataSection


@dataclass(frozen=True)
class ImagePool:
    """Labeled images in [0, 1]: ``images`` float32 ``[N, C, H, W]``, ``labels`` int64 ``[N]``.

    Attributes:
        sites: The site folder each image came from (``data.site_folders``), else ``None``.
        files: The file behind each image, where the source has files (empty otherwise).
        skipped: ``(file, reason)`` of every bad file skipped under ``data.skip_bad_files``.
        classes: Class names (sub-folder names), where the source names them.
        masks: Lesion masks ``[N, 1, H, W]`` (1 = lesion), where the source knows them (the
            phantom draws its nodules).
    """

    images: torch.Tensor
    labels: torch.Tensor
    sites: torch.Tensor | None = None
    files: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    classes: tuple[str, ...] = ()
    masks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError(
                f"an image pool needs [N, C, H, W] images and N labels, got "
                f"{tuple(self.images.shape)} and {tuple(self.labels.shape)}"
            )

    def subset(self, idx: np.ndarray | torch.Tensor) -> ImagePool:
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return ImagePool(
            self.images[idx_t],
            self.labels[idx_t],
            sites=None if self.sites is None else self.sites[idx_t],
            files=tuple(self.files[i] for i in idx_t.tolist()) if self.files else (),
            skipped=self.skipped,
            classes=self.classes,
            masks=None if self.masks is None else self.masks[idx_t],
        )


class DataSource(Protocol):
    """What a registered data set provides."""

    def load(self, cfg: DataSection, seed: int) -> tuple[ImagePool, ImagePool]:
        """Returns ``(train_pool, eval_pool)``."""

    plain: bool  # False when the source renders hospitals through scanners of its own

    def hospital_view(self, images: torch.Tensor, hospital: int, seed: int) -> torch.Tensor:
        """Renders ``images`` as hospital ``hospital`` would hold them."""


DATASETS: Registry[DataSource] = _DATASETS  # declared in fedgan.catalog


def fit_images(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Resizes a batch ``[N, C, H, W]`` in [0, 1] to ``size`` and converts its channels (the
    fast path for arrays that share one shape, e.g. a MedMNIST ``.npz``)."""
    images = convert_channels(images, channels)
    if images.shape[-2:] != (size, size):
        images = F.interpolate(
            images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return images.clamp(0.0, 1.0).contiguous()


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (train, eval) index arrays."""
    order = np.random.default_rng(seed + 7).permutation(n)
    n_eval = round(n * fraction)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


class _PlainViews:
    plain = True  # images as the files hold them; no synthetic scanner of the source's own

    def hospital_view(self, images: torch.Tensor, hospital: int, seed: int) -> torch.Tensor:
        return images


class PhantomSource:
    """The embedded procedural phantoms (see :mod:`fedgan.data.phantom`)."""

    plain = False  # every hospital always renders through its own scanner profile

    def load(self, cfg: DataSection, seed: int) -> tuple[ImagePool, ImagePool]:
        images, labels, masks = render_phantoms_with_masks(
            cfg.num_images, cfg.image_size, seed=seed, lesion_fraction=cfg.lesion_fraction
        )
        images = fit_images(images, cfg.image_size, cfg.channels)
        pool = ImagePool(images, labels, masks=masks)
        train_idx, eval_idx = holdout_split(len(pool.labels), cfg.eval_fraction, seed)
        return pool.subset(train_idx), pool.subset(eval_idx)

    def hospital_view(self, images: torch.Tensor, hospital: int, seed: int) -> torch.Tensor:
        return apply_scanner(images, site_profile(hospital), seed=seed * 1000 + hospital)


def npz_arrays(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of one split of a MedMNIST-layout ``.npz``, checked.

    Raises:
        ValueError: If the file is not such an ``.npz`` (naming what is wrong and the layout).
    """
    layout = (
        "a MedMNIST .npz holds train_images/train_labels/val_images/val_labels/"
        "test_images/test_labels"
    )
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npz ({err}); {layout}") from None
    with data:
        key = f"{split}_images"
        if key not in data or f"{split}_labels" not in data:
            raise ValueError(f"{path}: no '{key}' or '{split}_labels' array; {layout}")
        try:
            images, labels = data[key], data[f"{split}_labels"]
        except ValueError as err:  # object arrays need pickle, which is never allowed
            raise ValueError(f"{path}: {key} cannot be read safely ({err}); {layout}") from None
    if images.dtype.kind not in "biuf" or labels.dtype.kind not in "biu":
        raise ValueError(
            f"{path}: {key} holds {images.dtype} and {split}_labels {labels.dtype}; images must "
            "be numbers (uint8 0-255, or floats in [0, 1]) and labels integers"
        )
    if images.ndim not in (3, 4) or len(images) != len(labels):
        raise ValueError(
            f"{path}: {key} has shape {images.shape} for {len(labels)} labels; expected "
            "[N, H, W] or [N, H, W, C] with one label per image"
        )
    return images, labels


def npz_pool(path: Path, split: str, cfg: DataSection) -> ImagePool:
    """Reads one split of a MedMNIST-layout ``.npz`` into an :class:`ImagePool`."""
    images, labels = npz_arrays(path, split)
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    if images.dtype.kind in "biu":  # MedMNIST's uint8; float files are taken as [0, 1]
        x = x / 255.0
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    y = torch.from_numpy(np.asarray(labels).reshape(len(labels), -1)[:, 0].astype(np.int64))
    return ImagePool(fit_images(x, cfg.image_size, cfg.channels), y)


def check_medmnist_subset(subset: str) -> None:
    """Raises ``ValueError`` unless ``subset`` is a 2D MedMNIST subset (fedgan trains 2D GANs)."""
    import medmnist

    known = sorted(k for k in medmnist.INFO if not k.endswith("3d"))
    if subset not in known:
        raise ValueError(
            f"data.subset {subset!r} is not a 2D MedMNIST subset; known: {', '.join(known)}"
        )


def medmnist_file(cfg: DataSection) -> Path:
    """Finds (or, where there is a network and no local file, downloads) the subset's ``.npz``.

    ``data.path`` may be the ``.npz`` itself or the folder holding ``<subset>.npz``.
    """
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if path.is_file():
            return path
        candidate = path / f"{cfg.subset}.npz"
        if candidate.is_file():
            return candidate
        raise FileNotFoundError(
            f"data.path {cfg.path!r}: neither a .npz file nor a folder holding "
            f"{cfg.subset}.npz; point data.path at the MedMNIST file, or leave it empty to "
            "download it with the medmnist package"
        )
    import medmnist  # imported lazily: only the download path needs it

    check_medmnist_subset(cfg.subset)
    root = Path.home() / ".medmnist"
    root.mkdir(parents=True, exist_ok=True)
    cls = getattr(medmnist, medmnist.INFO[cfg.subset]["python_class"])
    try:
        cls(split="train", root=str(root), download=True)
    except RuntimeError as err:
        url = medmnist.INFO[cfg.subset].get("url", "the MedMNIST Zenodo record")
        raise FileNotFoundError(
            f"could not download MedMNIST {cfg.subset!r} (no network?); download {url} and "
            f"set data.path to the .npz file (or put it in {root})"
        ) from err
    return root / f"{cfg.subset}.npz"


class MedMNISTSource(_PlainViews):
    """A 2D MedMNIST subset: the official train split trains, the test split evaluates."""

    def load(self, cfg: DataSection, seed: int) -> tuple[ImagePool, ImagePool]:
        path = medmnist_file(cfg)
        return npz_pool(path, "train", cfg), npz_pool(path, "test", cfg)


def file_pool(root: Path, fmt: str, cfg: DataSection) -> ImagePool:
    """Every ``fmt`` file under ``root`` as a pool (sub-folder names are class labels), fitted to
    the model's size; ``data.site_folders`` reads ``root/<site>/...`` and records each image's
    site for the ``site-shift`` partition."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {str(root)!r} does not exist; point data.path (or the SuperNode's "
            "data-path) at the folder of images"
        )
    if cfg.site_folders:
        sites = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not sites:
            raise ValueError(
                f"data.site_folders is true but {str(root)!r} has no sub-folders; lay the data "
                "out as <path>/<site>/[<class>/]files or set data.site_folders: false"
            )
        parts = [read_folder(site, fmt, cfg) for site in sites]
    else:
        parts = [read_folder(root, fmt, cfg)]
    found = sorted({c for part in parts for c in part.classes})
    classes = cfg.class_names() or found
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise ValueError(
            f"data folder {str(root)!r} has class folder(s) {', '.join(unknown)} that "
            f"data.classes ({cfg.classes}) does not name; add them to data.classes or move "
            "them out of the folder"
        )
    index = {name: i for i, name in enumerate(classes)}
    images, labels, site_ids, files = [], [], [], []
    skipped = [x for part in parts for x in part.skipped]
    for s, part in enumerate(parts):
        for image, label, src in zip(part.slices, part.labels, part.sources, strict=True):
            try:
                images.append(fit_slice(image, cfg, src))
            except ValueError as err:
                if not cfg.skip_bad_files:
                    raise ValueError(f"{err} (or set data.skip_bad_files: true)") from err
                skipped.append((src, str(err)))
                continue
            labels.append(index[part.classes[label]] if part.classes else 0)
            site_ids.append(s)
            files.append(src)
    if not images:
        raise ValueError(f"no usable images under {str(root)!r}: {skipped[0][1]}")
    return ImagePool(
        torch.stack(images),
        torch.tensor(labels, dtype=torch.long),
        sites=torch.tensor(site_ids, dtype=torch.long) if cfg.site_folders else None,
        files=tuple(files),
        skipped=tuple(skipped),
        classes=tuple(classes),
    )


def folder_pool(root: Path, cfg: DataSection, fmt: str | None = None) -> ImagePool:
    """A folder of images in ``fmt`` (detected from the files when ``None``)."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {str(root)!r} does not exist; point data.path (or the SuperNode's "
            "data-path) at the folder of images"
        )
    return file_pool(root, fmt or detect_format(root), cfg)


class FileSource(_PlainViews):
    """Files under ``data.path`` in one format; whole files are held out for evaluation (the
    slices of one volume never sit on both sides)."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt

    def load(self, cfg: DataSection, seed: int) -> tuple[ImagePool, ImagePool]:
        if not cfg.path:
            raise ValueError(
                f"data.source {self.fmt!r} needs data.path: the folder of {self.fmt} files"
            )
        pool = file_pool(Path(cfg.path).expanduser(), self.fmt, cfg)
        names = sorted(set(pool.files))
        order = {f: i for i, f in enumerate(names)}
        file_ids = np.array([order[f] for f in pool.files])
        train_files, eval_files = holdout_split(len(names), cfg.eval_fraction, seed)
        if len(names) < 2 and cfg.eval_fraction > 0:  # one volume: hold out slices instead
            train_idx, eval_idx = holdout_split(len(pool.labels), cfg.eval_fraction, seed)
        else:
            train_idx = np.flatnonzero(np.isin(file_ids, train_files))
            eval_idx = np.flatnonzero(np.isin(file_ids, eval_files))
        return pool.subset(train_idx), pool.subset(eval_idx)


DATASETS.add("phantom", PhantomSource())
DATASETS.add("medmnist", MedMNISTSource())
for _fmt in ("folder", "dicom", "nifti"):
    DATASETS.add(_fmt, FileSource(_fmt))
