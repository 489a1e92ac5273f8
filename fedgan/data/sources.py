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

from fedgan.data.phantom import apply_scanner, render_phantoms, site_profile
from fedgan.registry import Registry

if TYPE_CHECKING:
    from fedgan.config import DataSection


@dataclass(frozen=True)
class ImagePool:
    """Labeled images in [0, 1]: ``images`` float32 ``[N, C, H, W]``, ``labels`` int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError(
                f"an image pool needs [N, C, H, W] images and N labels, got "
                f"{tuple(self.images.shape)} and {tuple(self.labels.shape)}"
            )

    def subset(self, idx: np.ndarray | torch.Tensor) -> ImagePool:
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return ImagePool(self.images[idx_t], self.labels[idx_t])


class DataSource(Protocol):
    """What a registered data set provides."""

    def load(self, cfg: DataSection, seed: int) -> tuple[ImagePool, ImagePool]:
        """Returns ``(train_pool, eval_pool)``."""

    def hospital_view(self, images: torch.Tensor, hospital: int, seed: int) -> torch.Tensor:
        """Renders ``images`` as hospital ``hospital`` would hold them."""


DATASETS: Registry[DataSource] = Registry("data source")


def fit_images(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Resizes ``[N, C, H, W]`` images in [0, 1] to ``size`` and converts channels
    (RGB -> gray by luminance, gray -> RGB by repetition)."""
    if images.shape[1] == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
        images = (images * weights).sum(1, keepdim=True)
    elif images.shape[1] == 1 and channels == 3:
        images = images.repeat(1, 3, 1, 1)
    elif images.shape[1] != channels:
        raise ValueError(
            f"images have {images.shape[1]} channels; data.channels must be 1 or 3 to convert"
        )
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
    def hospital_view(self, images: torch.Tensor, hospital: int, seed: int) -> torch.Tensor:
        return images


class PhantomSource:
    """The embedded procedural phantoms (see :mod:`fedgan.data.phantom`)."""

    def load(self, cfg: DataSection, seed: int) -> tuple[ImagePool, ImagePool]:
        images, labels = render_phantoms(
            cfg.num_images, cfg.image_size, seed=seed, lesion_fraction=cfg.lesion_fraction
        )
        images = fit_images(images, cfg.image_size, cfg.channels)
        pool = ImagePool(images, labels)
        train_idx, eval_idx = holdout_split(len(pool.labels), cfg.eval_fraction, seed)
        return pool.subset(train_idx), pool.subset(eval_idx)

    def hospital_view(self, images: torch.Tensor, hospital: int, seed: int) -> torch.Tensor:
        return apply_scanner(images, site_profile(hospital), seed=seed * 1000 + hospital)


def _npz_arrays(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        key = f"{split}_images"
        if key not in data:
            raise ValueError(
                f"{path}: no '{key}' array; a MedMNIST .npz holds "
                "train_images/train_labels/val_images/val_labels/test_images/test_labels"
            )
        return data[key], data[f"{split}_labels"]


def npz_pool(path: Path, split: str, cfg: DataSection) -> ImagePool:
    """Reads one split of a MedMNIST-layout ``.npz`` into an :class:`ImagePool`."""
    images, labels = _npz_arrays(path, split)
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    y = torch.from_numpy(np.asarray(labels).reshape(len(labels), -1)[:, 0].astype(np.int64))
    return ImagePool(fit_images(x, cfg.image_size, cfg.channels), y)


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

    if cfg.subset not in medmnist.INFO:
        raise ValueError(
            f"data.subset {cfg.subset!r} is not a MedMNIST subset; known: "
            f"{', '.join(sorted(medmnist.INFO))}"
        )
    root = Path.home() / ".medmnist"
    root.mkdir(parents=True, exist_ok=True)
    cls = getattr(medmnist, medmnist.INFO[cfg.subset]["python_class"])
    cls(split="train", root=str(root), download=True)
    return root / f"{cfg.subset}.npz"


class MedMNISTSource(_PlainViews):
    """A 2D MedMNIST subset: the official train split trains, the test split evaluates."""

    def load(self, cfg: DataSection, seed: int) -> tuple[ImagePool, ImagePool]:
        path = medmnist_file(cfg)
        return npz_pool(path, "train", cfg), npz_pool(path, "test", cfg)


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def folder_pool(root: Path, cfg: DataSection) -> ImagePool:
    """Reads every image under ``root``; sub-folder names, when present, are class labels."""
    from PIL import Image

    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist; check data.path")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(
            f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {str(root)!r}; check data.path"
        )
    classes = sorted({p.parent.relative_to(root).parts[0] for p in files if p.parent != root})
    index = {name: i for i, name in enumerate(classes)}
    mode = "L" if cfg.channels == 1 else "RGB"
    tensors, labels = [], []
    for p in files:
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {str(p)!r}: {err}") from err
        t = torch.from_numpy(arr)
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        tensors.append(fit_images(t.unsqueeze(0), cfg.image_size, cfg.channels)[0])
        rel = p.parent.relative_to(root).parts
        labels.append(index[rel[0]] if rel else 0)
    return ImagePool(torch.stack(tensors), torch.tensor(labels, dtype=torch.long))


class FolderSource(_PlainViews):
    """A folder of PNG/JPEG/TIFF images (``data.path``); part of it is held out for evaluation."""

    def load(self, cfg: DataSection, seed: int) -> tuple[ImagePool, ImagePool]:
        if not cfg.path:
            raise ValueError("data.source 'folder' needs data.path: the folder of images")
        pool = folder_pool(Path(cfg.path).expanduser(), cfg)
        train_idx, eval_idx = holdout_split(len(pool.labels), cfg.eval_fraction, seed)
        return pool.subset(train_idx), pool.subset(eval_idx)


DATASETS.add("phantom", PhantomSource())
DATASETS.add("medmnist", MedMNISTSource())
DATASETS.add("folder", FolderSource())
