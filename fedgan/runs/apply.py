"""Applying a trained run: synthetic data from its generator (PNG files and a MedMNIST-layout
``.npz``), or its image-to-image generator over new files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image

from fedgan.config import Config
from fedgan.evaluation.anomaly import HealthyStats
from fedgan.evaluation.central import CentralEvaluator
from fedgan.models import ImageShape
from fedgan.progress import track
from fedgan.rundir import atomic_save_image, atomic_write_bytes
from fedgan.training import make_objective
from fedgan.training.objectives.image2image import ImageToImage


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> ``[N, H, W]`` (gray) or ``[N, H, W, 3]`` uint8."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr: np.ndarray = pixels.permute(0, 2, 3, 1).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def export_samples(
    cfg: Config,
    state: dict[str, torch.Tensor],
    n: int,
    out: Path,
    *,
    label: int | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Writes ``n`` generated images to ``out``.

    Conditional generators write ``out/<label>/<i>.png`` (balanced over classes, or all of
    ``label``); unconditional ones ``out/<i>.png``. ``out/synthetic.npz`` holds ``train_images``
    (and ``train_labels``, ``[N, 1]``) in the MedMNIST layout, ready to augment a data set.

    Returns:
        Images written per label (``-1`` for an unconditional generator).

    Raises:
        ValueError: For ``n < 1``, a label on an unconditional generator, or a label out of range.
    """
    if make_objective(cfg).paired:
        raise ValueError(
            f"this run learns task {cfg.task.name!r}, an image-to-image mapping; apply it to "
            "images with fedgan enhance --run RUN --input FILES --out DIR"
        )
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    ev = CentralEvaluator(cfg, ImageShape(cfg.data.channels, cfg.data.image_size), out)
    generator = ev.generator(state)
    num_classes = int(getattr(generator, "num_classes", 0))
    if label is not None and not num_classes:
        raise ValueError(
            f"--label needs a conditional generator; this run's family is {cfg.model.family!r}"
        )
    if label is not None and not 0 <= label < num_classes:
        raise ValueError(f"--label {label} is outside 0..{num_classes - 1}")
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    with torch.no_grad():
        for start in track(range(0, n, 500), f"generating {n} images"):
            m = min(500, n - start)
            z = torch.randn(m, cfg.model.latent_dim, generator=g).to(ev.device)
            if num_classes:
                y = (
                    torch.full((m,), label)
                    if label is not None
                    else torch.arange(start, start + m) % num_classes
                )
                images.append(generator(z, y.to(ev.device)).cpu())
                labels.append(y)
            else:
                images.append(generator(z).cpu())
    pixels = to_uint8(torch.cat(images))
    y_all = torch.cat(labels).numpy() if labels else None
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for i, img in enumerate(pixels):
        folder = out / str(int(y_all[i])) if y_all is not None else out
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:06d}.png")
        key = str(int(y_all[i])) if y_all is not None else "-1"
        counts[key] = counts.get(key, 0) + 1
    arrays = {"train_images": pixels}
    if y_all is not None:
        arrays["train_labels"] = y_all.reshape(-1, 1).astype(np.uint8)
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(out / "synthetic.npz", buf.getvalue())
    return counts


def check_out_folder(out: Path, force: bool) -> None:
    """Refuses to write into a folder that already holds files, unless ``force``.

    Raises:
        FileExistsError: Naming the folder and the two ways on.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is a file; name a folder")
    if not force and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"--out {str(out)!r} already holds files, which the new ones would mix with; "
            "choose an empty folder, or pass --force to write into it anyway"
        )


def check_trained(ckpt: dict) -> None:
    """Refuses a checkpoint of round 0: the untrained networks of a run that failed or was
    stopped before its first round.

    Raises:
        ValueError: Naming the way on.
    """
    if int(ckpt.get("round", 0)) == 0:
        raise ValueError(
            "this run has no trained round (its latest checkpoint is round 0, the untrained "
            "networks): it failed or was stopped before round 1; resume it with --set "
            "run.resume=true, or choose another run (or --checkpoint)"
        )


def _read_mask(path: Path, cfg: Config) -> torch.Tensor:
    """A hole mask file -> ``[1, H, W]`` (1 where the file is non-zero).

    Raises:
        ValueError: A missing or unreadable file, or one with no non-zero pixel.
    """
    from fedgan.data.readers import FORMATS, BadFile

    if not path.is_file():
        raise ValueError(f"--mask {str(path)!r} does not exist; give an image file of the hole")
    fmt = next((n for n in FORMATS.names() if FORMATS.get(n).matches(path)), "")
    if not fmt:
        raise ValueError(f"--mask {str(path)!r}: unknown image format; use PNG, DICOM or NIfTI")
    try:
        first = FORMATS.get(fmt).read(path, replace(cfg.data, channels=1))[0]
    except BadFile as err:
        raise ValueError(f"--mask: {err}") from err
    hole = (torch.as_tensor(first).float()[:1] > 0).float()
    if not hole.any():
        raise ValueError(f"--mask {str(path)!r} has no non-zero pixel: it marks no hole")
    return hole


def input_files(source: Path) -> tuple[str, list[Path]]:
    """``(format, files)`` of ``--input``: a file, or every image of a folder.

    Raises:
        FileNotFoundError: If ``source`` does not exist.
        ValueError: A file of no known format.
    """
    from fedgan.data.readers import FORMATS, detect_format, list_files

    if not source.exists():
        raise FileNotFoundError(f"--input {str(source)!r} does not exist")
    if source.is_dir():
        fmt = detect_format(source)
        return fmt, list_files(source, fmt)
    fmt = next((n for n in FORMATS.names() if FORMATS.get(n).matches(source)), "")
    if not fmt:
        raise ValueError(
            f"{str(source)!r}: unknown image format; use PNG/JPEG/TIFF, DICOM or NIfTI"
        )
    return fmt, [source]


def read_slices(path: Path, fmt: str, cfg: Config) -> torch.Tensor:
    """The slices of one input file, ``[S, C, H, W]`` in [0, 1].

    Raises:
        ValueError: An unreadable file, naming it and the fix.
    """
    from fedgan.data.readers import FORMATS, BadFile

    try:
        return FORMATS.get(fmt).read(path, cfg.data)
    except BadFile as err:
        raise ValueError(f"{err}; fix or remove the file") from err


def detect_files(
    cfg: Config,
    state: dict[str, torch.Tensor],
    source: Path,
    out: Path,
    *,
    threshold: float | None = None,
    rule: int = 0,
    stats: HealthyStats | None = None,
) -> list[tuple[str, float]]:
    """Scores every image (or slice) in ``source`` with an ``anomaly`` run and writes
    ``out/<name>.png``: the image in grey with its anomaly map over it in red (full red at
    ``threshold``, the pixel threshold the run's evaluation chose on validation images; the
    image's own 99th map percentile without one), and ``out/scores.csv`` (file, score, and the
    score's rule: ``rule``, the image score the evaluation chose on validation images, an
    index in :data:`fedgan.evaluation.anomaly.SCORE_RULES`; ``ztop`` standardizes by
    ``stats``, the healthy statistics that evaluation measured).

    Returns:
        ``(output name, anomaly score)`` per image, in order.

    Raises:
        ValueError: For a run of another task, files of no known format, or rule ``ztop``
            without ``stats``.
        FileNotFoundError: If ``source`` does not exist.
    """
    from fedgan.data.transforms import fit_slice
    from fedgan.evaluation.anomaly import (
        SCORE_RULES,
        AnomalyEvaluator,
        candidates,
        rule_scores,
        smooth_map,
    )

    objective = make_objective(cfg)
    if not objective.detects:
        raise ValueError(
            f"fedgan detect needs a run of task anomaly; this run's task is {cfg.task.name!r}"
        )
    if SCORE_RULES[rule] == "ztop" and stats is None:
        raise ValueError("the run chose the ztop image score, but its healthy statistics "
                         "(samples/round_<k>.healthy.pt) are missing: run fedgan evaluate "
                         "on this checkpoint to write them")  # fmt: skip
    fmt, files = input_files(source)
    evaluator = AnomalyEvaluator(cfg, out, objective)  # type: ignore[arg-type]
    nets = evaluator.networks(state)
    size = cfg.data.image_size
    rows: list[tuple[str, float]] = []
    for path in track(files, f"scoring {len(files)} file(s)"):
        slices = read_slices(path, fmt, cfg)
        images = torch.stack([fit_slice(s, cfg.data, str(path), size=size) for s in slices]) * 2 - 1
        scores, maps, _ = objective.anomaly_maps(nets, images)  # type: ignore[attr-defined]
        maps = smooth_map(maps)
        offered = {"own": scores}
        if SCORE_RULES[rule] == "critic":
            offered["critic"] = objective.critic_scores(nets, images)  # type: ignore[attr-defined]
        scores = rule_scores(rule, candidates(offered, maps, stats))
        out.mkdir(parents=True, exist_ok=True)
        stem = path.name.split(".")[0]
        for k, (image, score, amap) in enumerate(zip(images, scores, maps, strict=True)):
            name = f"{stem}.png" if len(images) == 1 else f"{stem}_s{k:03d}.png"
            top = threshold or float(torch.quantile(amap.flatten().double(), 0.99)) or 1.0
            heat = (amap / top).clamp(0, 1)
            grey = ((image[:1] + 1) / 2).clamp(0, 1)
            overlay = torch.cat([grey * (1 - heat) + heat, grey * (1 - heat), grey * (1 - heat)])
            atomic_save_image(overlay, out / name)
            rows.append((name, float(score)))
    named = SCORE_RULES[rule]
    lines = ["file,score,rule"] + [f"{name},{score:.6g},{named}" for name, score in rows]
    atomic_write_bytes(out / "scores.csv", ("\n".join(lines) + "\n").encode())
    return rows


def enhance_files(
    cfg: Config,
    state: dict[str, torch.Tensor],
    source: Path,
    out: Path,
    *,
    native: bool = False,
    mask: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Runs the task's generator over every image (or slice) in ``source`` (a file or a folder)
    and writes ``out/<name>.png`` (``<name>_sNNN.png`` for the slices of a volume).

    Images of another size than the model's input are resized to it (the scale it was trained
    at), and the log says how many; with ``native`` the generator runs at each image's own
    size instead (a x4 super-resolution of a 512 px image then writes 2048 px). An ``inpaint``
    run fills the hole ``mask`` marks (an image file, non-zero = missing, applied to every
    image) or, without a mask, each image's zero pixels.

    Raises:
        ValueError: For a ``synthesis`` run, files of no known format, or (``native``) an image
            the generator cannot take at its own size.
        FileNotFoundError: If ``source`` does not exist.
    """
    from fedgan.data.transforms import fit_slice
    from fedgan.evaluation.paired import PairedEvaluator

    objective = make_objective(cfg)
    if not objective.paired:
        instead = "fedgan detect" if objective.detects else "fedgan sample"
        raise ValueError(
            f"this run generates images from noise (task {cfg.task.name}); fedgan enhance "
            "needs a run of an image-to-image task such as enhance, super-resolution or "
            f"translate (use {instead} instead)"
        )
    fmt, files = input_files(source)
    task = cast(ImageToImage, objective)  # paired, checked above
    hole = _read_mask(mask, cfg) if mask is not None else None
    if hole is not None:  # refuses a mask before any file is read if the task takes none
        task.file_inputs(torch.zeros(1, cfg.data.channels, *hole.shape[-2:]), hole[None])
    size = task.input_size
    generator = PairedEvaluator(cfg, out, task).generator(state)
    written: list[Path] = []
    resized = 0
    for path in track(files, f"applying the generator to {len(files)} file(s)"):
        slices = read_slices(path, fmt, cfg)
        sides = {tuple(s.shape[-2:]) for s in slices}
        if native:
            inputs = torch.stack([fit_slice(s, cfg.data, str(path), size=max(s.shape[-2:]))
                                  for s in slices]) * 2 - 1  # fmt: skip
        else:
            resized += sum(side != (size, size) for side in sides)
            inputs = torch.stack([fit_slice(s, cfg.data, str(path), size=size)
                                  for s in slices]) * 2 - 1  # fmt: skip
        side_mask = None
        if hole is not None:  # fitted to the input as the images are (data.fit), then binary
            one = replace(cfg.data, channels=1)
            side_mask = (fit_slice(hole, one, "--mask", size=inputs.shape[-1]) > 0.5).float()[None]
        inputs = task.file_inputs(inputs, side_mask)
        with torch.no_grad():
            try:
                outputs = generator(inputs.to(next(generator.parameters()).device)).cpu()
            except RuntimeError as err:  # e.g. a U-Net given a side it cannot halve evenly
                raise ValueError(
                    f"{str(path)!r}: the generator cannot take a {inputs.shape[-1]} px image at "
                    f"its own size ({str(err).splitlines()[0][:80]}); drop --native to resize "
                    f"it to {size} px"
                ) from None
        out.mkdir(parents=True, exist_ok=True)
        stem = path.name.split(".")[0]
        for k, image in enumerate(outputs):
            name = f"{stem}.png" if len(outputs) == 1 else f"{stem}_s{k:03d}.png"
            atomic_save_image(image, out / name, normalize=True, value_range=(-1, 1))
            written.append(out / name)
    if resized:
        log(
            f"fedgan: {resized} image size(s) differed from the model's {size}x{size} input and "
            "were resized to it (the scale it was trained at); pass --native to apply it at "
            "each image's own size"
        )
    return written
