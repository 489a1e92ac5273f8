"""A deployed site's decoded-image cache: read again when a file changes, safe to delete,
never in the way when it cannot be read or written."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from PIL import Image

from fedgan.config import load_config
from fedgan.data import local_pool
from fedgan.federated.client_app import site_data
from fedgan.federated.site_cache import cached_pool


def _folder(root: Path, values: list[int]) -> Path:
    for i, v in enumerate(values):
        sub = root / ("normal" if i % 2 else "pneumonia")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 20), v, np.uint8)).save(sub / f"{i}.png")
    return root


class Reader:
    """``local_pool`` that counts how often the files were really decoded."""

    def __init__(self, path: Path, cfg) -> None:
        self.path, self.cfg, self.calls = path, cfg, 0

    def __call__(self):
        self.calls += 1
        local_pool.cache_clear()  # decode for real, not from this process's memory
        return local_pool(str(self.path), self.cfg, "folder")


@pytest.fixture
def site(tmp_path: Path):
    cfg = load_config(None, ["data.image_size=16"]).data
    folder = _folder(tmp_path / "data", [10, 60, 110, 160])
    return folder, cfg, Reader(folder, cfg), tmp_path / "cache"


def test_a_second_round_reads_the_cache_not_the_files(site) -> None:
    folder, cfg, read, cache = site
    first = cached_pool(folder, cfg, "folder", cache, read)
    again = cached_pool(folder, cfg, "folder", cache, read)
    assert read.calls == 1
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert first.classes == again.classes and first.files == again.files
    assert len(list(cache.glob("site_*.pt"))) == 1


def test_a_changed_added_or_removed_file_is_read_again(site) -> None:
    folder, cfg, read, cache = site
    before = cached_pool(folder, cfg, "folder", cache, read)
    changed = next(folder.rglob("*.png"))
    Image.fromarray(np.full((20, 20), 250, np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))  # even with a time set back, the size or name tells
    after = cached_pool(folder, cfg, "folder", cache, read)
    assert read.calls == 2 and not torch.equal(before.images, after.images)
    _folder(folder / "extra", [200])
    assert len(cached_pool(folder, cfg, "folder", cache, read).images) == 5
    assert read.calls == 3
    assert len(list(cache.glob("site_*.pt"))) == 1  # the stale caches are gone


def test_other_data_settings_are_another_cache(site) -> None:
    folder, cfg, read, cache = site
    cached_pool(folder, cfg, "folder", cache, read)
    other = load_config(None, ["data.image_size=32"]).data
    pool = cached_pool(folder, other, "folder", cache, Reader(folder, other))
    assert pool.images.shape[-1] == 32


def test_a_deleted_or_garbled_cache_is_rebuilt(site) -> None:
    folder, cfg, read, cache = site
    first = cached_pool(folder, cfg, "folder", cache, read)
    (file,) = cache.glob("site_*.pt")
    file.write_bytes(b"not a cache")
    assert torch.equal(cached_pool(folder, cfg, "folder", cache, read).images, first.images)
    for f in cache.glob("site_*.pt"):
        f.unlink()
    assert torch.equal(cached_pool(folder, cfg, "folder", cache, read).images, first.images)
    assert read.calls == 3


def test_a_cache_that_cannot_be_written_costs_only_the_decoding(site, tmp_path: Path) -> None:
    folder, cfg, read, _ = site
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    pool = cached_pool(folder, cfg, "folder", blocked / "cache", read)
    assert len(pool.images) == 4 and read.calls == 1


def test_the_client_app_uses_the_sites_cache_dir(site, tmp_path: Path) -> None:
    folder, _, _, cache = site
    cfg = load_config(None, ["data.image_size=16", f"run.output_dir={tmp_path / 'runs'}"])
    node = {"data-path": str(folder), "data-format": "folder", "cache-dir": str(cache),
            "hospital-id": 3}  # fmt: skip
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    dataset, hospital = site_data(cfg, context)
    assert hospital == 3 and len(dataset) == 4
    assert len(list(cache.glob("site_*.pt"))) == 1
    images = dataset.tensors[0]
    assert images.min() >= -1 and images.max() <= 1  # training pairs, in [-1, 1]
