"""Reading a hospital's files: image folders, DICOM and NIfTI, through MONAI's readers.

Every reader turns one file into 2D slices ``[C, H, W]`` float32 in [0, 1] (a PNG gives one,
a multi-frame DICOM or a NIfTI volume several). :func:`read_folder` walks a folder, takes class
labels from sub-folder names, and either stops at the first bad file with an error naming it and
the fix, or (``data.skip_bad_files``) skips it and counts it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedgan.catalog import FORMATS as _FORMATS
from fedgan.progress import track
from fedgan.registry import Registry

if TYPE_CHECKING:
    from fedgan.config import DataSection

log = logging.getLogger("fedgan.data")
# MONAI announces on every DICOM reader it builds that a GPU-only decoder plugin is missing;
# the pydicom decoding fedgan uses needs none, so the line is only noise to a hospital's IT.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


class BadFile(ValueError):
    """A file that cannot become training images; the message says why."""


@dataclass(frozen=True)
class FileFormat:
    """How one kind of file is found and read.

    Attributes:
        suffixes: File name endings that belong to the format (lower case).
        read: ``read(path, cfg) -> [S, C, H, W]`` slices in [0, 1]; raises :class:`BadFile`.
        accepts_no_suffix: DICOM files often have no extension at all.
    """

    suffixes: tuple[str, ...]
    read: Callable[[Path, DataSection], torch.Tensor]
    accepts_no_suffix: bool = False

    def matches(self, path: Path) -> bool:
        name = path.name.lower()
        if name.startswith("."):
            return False
        return name.endswith(self.suffixes) or (self.accepts_no_suffix and "." not in name)


FORMATS: Registry[FileFormat] = _FORMATS  # declared in fedgan.catalog


@cache
def _loader(reader: str):
    from monai.transforms import LoadImage

    return LoadImage(reader=reader, image_only=True, ensure_channel_first=True)


def _load(reader: str, path: Path) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's notes on optional codecs, not about the file
        try:
            image = _loader(reader)(str(path))
        except Exception as err:
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            if "InvalidDicomError" in reason:  # pydicom's own advice (force=True) is not ours
                reason = "not a DICOM file (no DICM header; a file with no suffix is read as DICOM)"
            raise BadFile(f"cannot read {str(path)!r}: {reason[:300]}") from err
    array = torch.as_tensor(np.asarray(image), dtype=torch.float32)
    if not torch.isfinite(array).all():
        raise BadFile(f"{str(path)!r} holds NaN or infinite values")
    return array


def scale_range(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Maps ``[low, high]`` to [0, 1] and clips (MONAI's ScaleIntensityRange)."""
    from monai.transforms import ScaleIntensityRange

    if high <= low:
        return torch.zeros_like(x)
    out = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(x)
    return torch.as_tensor(out, dtype=torch.float32)


def percentile_window(x: torch.Tensor) -> tuple[float, float]:
    """The 0.5th and 99.5th intensity percentiles: a robust window when the file gives none."""
    flat = x.flatten().double()
    if flat.numel() > 1_000_000:
        flat = flat[:: flat.numel() // 1_000_000 + 1]
    low, high = torch.quantile(flat, torch.tensor([0.005, 0.995], dtype=flat.dtype)).tolist()
    return float(low), float(high)


def _read_picture(path: Path, cfg: DataSection) -> torch.Tensor:
    image = _load("PILReader", path)  # [C, W, H] after MONAI's reverse indexing
    image = image.transpose(-1, -2)
    if image.shape[0] == 4:  # RGBA / LA: drop alpha
        image = image[:3]
    elif image.shape[0] == 2:
        image = image[:1]
    top = 65535.0 if float(image.max()) > 255.0 else 255.0
    return (image / top).clamp(0.0, 1.0).unsqueeze(0)


def _dicom_window(path: Path) -> tuple[float, float] | None:
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    first = lambda v: float(v[0] if isinstance(v, Sequence) and not isinstance(v, str) else v)  # noqa: E731
    c, w = first(center), first(width)
    return (c - w / 2.0, c + w / 2.0) if w > 0 else None


def _read_dicom(path: Path, cfg: DataSection) -> torch.Tensor:
    """A DICOM file: MONAI applies the rescale slope/intercept (e.g. CT to Hounsfield units);
    then the configured window, else the file's own window, else robust percentiles."""
    volume = _load("PydicomReader", path)  # [C, W, H] or [C, W, H, frames]
    volume = volume.unsqueeze(-1) if volume.ndim == 3 else volume
    volume = volume.permute(3, 0, 2, 1)  # [frames, C, H, W]
    if cfg.window_width > 0:
        window = (
            cfg.window_center - cfg.window_width / 2,
            cfg.window_center + cfg.window_width / 2,
        )
    else:
        try:
            window = _dicom_window(path) or percentile_window(volume)
        except Exception:
            window = percentile_window(volume)
    if volume.shape[1] == 3:  # colour DICOM: already display values
        return (volume / max(float(volume.max()), 1.0)).clamp(0, 1)
    return scale_range(volume, *window)


def _read_nifti(path: Path, cfg: DataSection) -> torch.Tensor:
    """A NIfTI volume cut into 2D slices along ``data.slice_axis``; every 3D volume of a 4D file
    is sliced; slices with less than ``data.min_foreground`` of their pixels above the volume's
    background are dropped as empty."""
    volume = _load("NibabelReader", path)  # [C, X, Y, Z] (C = frames of a 4D file)
    axis = cfg.slice_axis
    if volume.ndim == 3:  # a single 2D image stored as NIfTI: one slice, whatever the axis
        volume, axis = volume.unsqueeze(-1), 2
    if volume.ndim != 4:
        raise BadFile(
            f"{str(path)!r}: expected a 2D, 3D or 4D NIfTI, got shape {tuple(volume.shape)}"
        )
    if volume.shape[1 + axis] < 1:
        raise BadFile(f"{str(path)!r} is empty along data.slice_axis={axis}")
    if min(volume.shape[1 + a] for a in range(3) if a != axis) < 2:
        raise BadFile(
            f"{str(path)!r} has shape {tuple(volume.shape[1:])}: its slices along "
            f"data.slice_axis={axis} would be lines, not images; choose another data.slice_axis"
        )
    slices = []
    for frame in volume:
        frame = scale_range(frame, *percentile_window(frame))
        stack = frame.movedim(axis, 0)  # [S, a, b]
        stack = stack.transpose(-1, -2).flip(-2)  # radiological display: rows top to bottom
        foreground = (stack > 0.05).flatten(1).float().mean(1)
        slices.append(stack[foreground >= cfg.min_foreground])
    kept = torch.cat(slices).unsqueeze(1)
    if len(kept) == 0:
        raise BadFile(
            f"{str(path)!r}: every slice along axis {axis} is empty (less than "
            f"{cfg.min_foreground:.0%} foreground); lower data.min_foreground or check the file"
        )
    return kept


FORMATS.add("folder", FileFormat((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"), _read_picture))
FORMATS.add("dicom", FileFormat((".dcm", ".dicom"), _read_dicom, accepts_no_suffix=True))
FORMATS.add("nifti", FileFormat((".nii", ".nii.gz"), _read_nifti))


def detect_format(root: Path) -> str:
    """The format most files under ``root`` have (for a SuperNode whose site config omits it).

    Raises:
        ValueError: If no file under ``root`` has a known format.
    """
    counts = {name: 0 for name in ("folder", "dicom", "nifti")}
    for p in root.rglob("*"):
        if p.is_file():
            for name in ("nifti", "folder"):
                if FORMATS.get(name).matches(p):
                    counts[name] += 1
            if p.name.lower().endswith((".dcm", ".dicom")):
                counts["dicom"] += 1
    best = max(counts, key=lambda k: counts[k])
    if counts[best] == 0:
        raise ValueError(
            f"no images under {str(root)!r}: expected PNG/JPEG/TIFF, DICOM (.dcm) or NIfTI "
            "(.nii/.nii.gz) files; check the data path"
        )
    return best


@dataclass(frozen=True)
class FolderImages:
    """What :func:`read_folder` found: slices ``[N, C, H, W]`` in [0, 1] (native size when all
    agree, else fitted by the caller), labels, class names, the files behind each slice, and the
    skipped files with their reasons."""

    slices: list[torch.Tensor]
    labels: list[int]
    classes: tuple[str, ...]
    sources: list[str]
    skipped: tuple[tuple[str, str], ...]


def list_files(root: Path, fmt: str) -> list[Path]:
    """Every file of format ``fmt`` under ``root``, sorted."""
    spec = FORMATS.get(fmt)
    return sorted(p for p in root.rglob("*") if p.is_file() and spec.matches(p))


def read_folder(root: Path, fmt: str, cfg: DataSection) -> FolderImages:
    """Reads every ``fmt`` file under ``root``; the first path component below ``root`` is the
    class (when files sit in sub-folders).

    Raises:
        FileNotFoundError: If ``root`` is not a folder.
        ValueError: If there are no such files, or a file is bad and ``data.skip_bad_files`` is
            false (the message names the file and the fix).
    """
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {str(root)!r} does not exist; point data.path (or the SuperNode's "
            "data-path) at the folder of images"
        )
    files = list_files(root, fmt)
    if not files:
        spec = FORMATS.get(fmt)
        raise ValueError(
            f"no {fmt} files ({', '.join(spec.suffixes)}) under {str(root)!r}; check data.path "
            "and data.source"
        )
    classes = tuple(sorted({p.relative_to(root).parts[0] for p in files if p.parent != root}))
    index = {name: i for i, name in enumerate(classes)}
    reader = FORMATS.get(fmt).read
    out = FolderImages([], [], classes, [], ())
    skipped: list[tuple[str, str]] = []
    for path in track(files, f"reading {len(files)} {fmt} files under {root.name}"):
        try:
            slices = reader(path, cfg)
        except BadFile as err:
            if not cfg.skip_bad_files:
                raise ValueError(
                    f"{err}; fix or remove the file, or set data.skip_bad_files: true to skip "
                    "bad files (they are counted in the log)"
                ) from err
            skipped.append((str(path), str(err)))
            continue
        rel = path.relative_to(root).parts
        label = index[rel[0]] if len(rel) > 1 else 0
        for s in slices:
            out.slices.append(s)
            out.labels.append(label)
            out.sources.append(str(path))
    if skipped:
        log.warning(
            "skipped %d bad file(s) under %s (data.skip_bad_files); first: %s",
            len(skipped),
            root,
            skipped[0][1],
        )
    if not out.slices:
        raise ValueError(
            f"no usable images under {str(root)!r}: all {len(files)} {fmt} file(s) were bad "
            f"(first: {skipped[0][1] if skipped else '?'})"
        )
    return FolderImages(out.slices, out.labels, classes, out.sources, tuple(skipped))
