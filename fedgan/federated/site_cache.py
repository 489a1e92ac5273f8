"""A deployed site's decoded images, kept on its disk between rounds.

A deployed ClientApp is a fresh process every round, so without this it would read and decode
every DICOM, NIfTI or PNG of the site each round. The cache file is keyed by everything that
decides the result: each file's name, size and modification time, and the data settings; a
changed, added or removed file, or another setting, gives another key, so a stale cache is
never read. It holds nothing the files don't: deleting it is always safe (the next round
decodes again), and an unreadable one is decoded again and replaced.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedgan.data import ImagePool
from fedgan.rundir import atomic_write_bytes

if TYPE_CHECKING:
    from fedgan.config import DataSection

logger = logging.getLogger(__name__)

#: Bump when the cached layout or the decoding changes, so old caches are not read.
VERSION = 1


def stamp(path: Path) -> list[tuple[str, int, int]]:
    """``(name, size, mtime_ns)`` of the file at ``path``, or of every file under the folder."""
    if path.is_file():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    out = []
    for f in sorted(path.rglob("*")):
        if f.is_file():
            st = f.stat()
            out.append((str(f.relative_to(path)), st.st_size, st.st_mtime_ns))
    return out


def cache_key(path: Path, cfg: DataSection, fmt: str) -> str:
    """The cache file's name for the data at ``path`` read with ``cfg`` and ``fmt``."""
    blob = json.dumps([VERSION, str(path.resolve()), fmt, asdict(cfg), stamp(path)], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor (readers may return MONAI's MetaTensor, which a weights-only load
    refuses)."""
    return tensor.as_subclass(torch.Tensor)


def _pack(pool: ImagePool) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {
            "images": _plain(pool.images),
            "labels": _plain(pool.labels),
            "sites": None if pool.sites is None else _plain(pool.sites),
            "files": list(pool.files),
            "skipped": [list(s) for s in pool.skipped],
            "classes": list(pool.classes),
        },
        buf,
    )
    return buf.getvalue()


def _unpack(path: Path) -> ImagePool:
    d = torch.load(path, map_location="cpu", weights_only=True)
    return ImagePool(
        images=d["images"],
        labels=d["labels"],
        sites=d["sites"],
        files=tuple(d["files"]),
        skipped=tuple((str(a), str(b)) for a, b in d["skipped"]),
        classes=tuple(d["classes"]),
    )


def cached_pool(
    path: Path, cfg: DataSection, fmt: str, cache_dir: Path, read: Callable[[], ImagePool]
) -> ImagePool:
    """The pool ``read()`` returns, from ``cache_dir`` when the files have not changed.

    A cache that cannot be written (a full or read-only disk) is only logged: the site still
    trains, decoding every round."""
    file = cache_dir / f"site_{cache_key(path, cfg, fmt)}.pt"
    if file.exists():
        try:
            return _unpack(file)
        except Exception as err:  # truncated, foreign, from another torch: decode again
            logger.warning("site cache %s is unreadable (%s); decoding the data again", file,
                           type(err).__name__)  # fmt: skip
    pool = read()
    try:
        for old in cache_dir.glob("site_*.pt"):  # the files changed: the old cache is stale
            old.unlink(missing_ok=True)
        atomic_write_bytes(file, _pack(pool))
    except OSError as err:
        logger.warning("site cache not written to %s (%s); the data is decoded every round",
                       cache_dir, err)  # fmt: skip
    return pool
