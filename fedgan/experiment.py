"""``resolve``: a config checked as a whole experiment, the one step between reading a config
and running it.

``fedgan.config`` checks each field on its own; this module checks what spans sections or
lives in registries: registered names (listed from ``fedgan.catalog`` without importing torch
or flwr), the privacy rules of families and tasks, and the federation's arithmetic. The CLI,
the ClientApp, the ServerApp and the study runner all call :func:`resolve`.
"""

from __future__ import annotations

from collections.abc import Callable

from fedgan.catalog import (
    DATASETS,
    FAMILIES,
    METRICS,
    PARTITIONERS,
    STRATEGIES,
    TASKS,
    validation_keys,
)
from fedgan.config import Config

#: Strategies whose guarantees need a bound on Byzantine hospitals: name -> the fewest
#: hospitals a round needs for ``f`` of them, as ``(a, b)`` in ``a * f + b``.
_BYZANTINE_QUORUM = {"krum": (2, 3), "multikrum": (2, 3), "bulyan": (4, 3)}


def _fail(key: str, problem: str) -> None:
    raise ValueError(f"config key {key!r}: {problem}")


def _check_name(key: str, value: str, names: list[str]) -> None:
    if value not in names:
        _fail(key, f"unknown value {value!r}; allowed: {', '.join(names)}")


def resolve(cfg: Config) -> Config:
    """Checks ``cfg`` as a whole and returns it.

    Raises:
        ValueError: Naming the key, the problem and the allowed values or the fix.
    """
    _check_name("data.source", cfg.data.source, DATASETS.names())
    _check_name("data.partition", cfg.data.partition, PARTITIONERS.names())
    _check_name("model.family", cfg.model.family, FAMILIES.names())
    _check_name("federation.strategy", cfg.federation.strategy, STRATEGIES.names())
    _check_name("task.name", cfg.task.name, TASKS.names())
    for key, names in (
        ("eval.metrics", cfg.eval.metric_list),
        ("eval.final_metrics", cfg.eval.final_metric_list),
    ):
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            _fail(key, f"unknown metric(s) {unknown}; known: {', '.join(METRICS.names())}")
    _check_select(cfg)
    _check_lpips(cfg)
    _check_privacy(cfg)
    if cfg.train.diff_augment_views > 1 and cfg.task.name not in ("synthesis", "anomaly"):
        _fail(
            "train.diff_augment_views",
            f"DiffAugment views apply to the synthesis discriminator; task {cfg.task.name!r} "
            "has none: leave them at 1",
        )
    if (
        cfg.train.diff_augment_views > 1
        and cfg.privacy.mode == "dp-sgd"
        and cfg.privacy.grad_sample_mode != "ghost"
        and cfg.task.name == "synthesis"
    ):
        _fail(
            "train.diff_augment_views",
            f"Opacus's {cfg.privacy.grad_sample_mode!r} mode would clip each view as a patient "
            "image of its own; set privacy.grad_sample_mode=ghost, which clips an image's "
            "views together, or leave the views at 1",
        )
    if cfg.train.embedding_weight > 0:
        if cfg.task.name not in ("synthesis", "anomaly"):
            _fail(
                "train.embedding_weight",
                f"the embedding term pulls a synthesis generator towards the data; task "
                f"{cfg.task.name!r} has none: set train.embedding_weight=0",
            )
        if FAMILIES.get(cfg.model.family).conditional:
            _fail(
                "train.embedding_weight",
                f"{cfg.model.family!r} draws classes in proportions of its own, so one "
                "embedding of all the images would pull it off the data's class mix; "
                "use an unconditional family (e.g. dcgan) or set train.embedding_weight=0",
            )
    if cfg.train.critic_schedule == "adaptive" and cfg.task.name != "synthesis":
        _fail(
            "train.critic_schedule",
            f"the adaptive schedule paces a synthesis GAN's discriminator; task "
            f"{cfg.task.name!r} trains with train.n_critic: set train.critic_schedule=auto",
        )
    _check_federation(cfg)
    if cfg.task.name == "anomaly":
        if cfg.data.train_label < 0:
            _fail(
                "data.train_label",
                "task anomaly learns healthy anatomy only: set it to the healthy class "
                "(0 for the phantom and PneumoniaMNIST)",
            )
        if cfg.model.family not in ANOMALY_FAMILIES:
            _fail(
                "model.family",
                f"task anomaly scores with the discriminator's features, which "
                f"{cfg.model.family!r} does not expose; use dcgan or wgan-gp",
            )
    if cfg.task.name == "super-resolution" and cfg.data.image_size // cfg.task.scale < 8:
        _fail(
            "task.scale",
            f"x{cfg.task.scale} from {cfg.data.image_size} px leaves inputs under 8 px; "
            "raise data.image_size or lower task.scale",
        )
    return cfg


def _check_select(cfg: Config) -> None:
    """``eval.select`` must be a validation figure of a metric computed every evaluation
    (task anomaly is always scored by metric ``anomaly``; the others by ``eval.metrics``)."""
    key = cfg.eval.select
    if not key:
        return
    computed = ["anomaly"] if cfg.task.name == "anomaly" else cfg.eval.metric_list
    offered = validation_keys(computed)
    if key not in offered:
        choices = ", ".join(f"{k} (metric {m})" for k, m in offered.items())
        _fail(
            "eval.select",
            f"{key!r} is not a validation figure of task {cfg.task.name}'s evaluation; "
            + (f"choose {choices}" if choices else "it measures none")
            + ", or leave it empty to keep the last round",
        )


def _check_lpips(cfg: Config) -> None:
    weights = cfg.eval.lpips_weights
    named = "lpips" in cfg.eval.metric_list + cfg.eval.final_metric_list
    files = ("vgg16-397923af.pth", "lpips_weights.pt")
    if named and not weights:
        _fail(
            "eval.lpips_weights",
            f"LPIPS needs its weights: set it to a folder holding {' and '.join(files)}, "
            "or to download",
        )
    if weights and weights != "download":
        from pathlib import Path

        missing = [f for f in files if not (Path(weights) / f).is_file()]
        if missing:
            _fail(
                "eval.lpips_weights",
                f"{weights!r} lacks {', '.join(missing)}; put torchvision's VGG16 and piq's "
                "LPIPS weights there, or set it to download",
            )


#: The families whose discriminator exposes the features f-AnoGAN's score reads.
ANOMALY_FAMILIES = ("dcgan", "wgan-gp")


def _check_privacy(cfg: Config) -> None:
    if cfg.privacy.mode == "dp-sgd":
        if cfg.task.name in ("synthesis", "anomaly"):  # the family's GAN, privately
            family = FAMILIES.get(cfg.model.family)  # imports the family's module (torch)
            if family.dp_incompatibility:
                private = [n for n in FAMILIES.names() if not FAMILIES.get(n).dp_incompatibility
                           and (cfg.task.name != "anomaly" or n in ANOMALY_FAMILIES)]  # fmt: skip
                _fail(
                    "model.family",
                    f"{cfg.model.family!r} cannot be trained with DP-SGD: "
                    f"{family.dp_incompatibility}. Choose one of: {', '.join(private)}",
                )
        elif cfg.task.name == "super-resolution" and cfg.task.relativistic:
            _fail(
                "task.relativistic",
                "the relativistic loss compares each image with the batch mean, so one patient's "
                "gradient depends on the others' and DP-SGD's clipping does not bound it; set "
                "task.relativistic=false with privacy.mode=dp-sgd",
            )
    if cfg.privacy.mode == "dp-sgd" and cfg.privacy.embedding_noise > 0:
        from fedgan.privacy.accounting import release_epsilon

        # the largest delta a hospital can get (default_delta caps it at 1e-5), where the
        # release's epsilon is smallest: what fails here fails at every hospital
        delta = cfg.privacy.delta or 1e-5
        spent = release_epsilon(cfg.privacy.embedding_noise, delta, cfg.privacy.accountant)
        if spent >= cfg.privacy.target_epsilon - 0.01:
            _fail(
                "privacy.embedding_noise",
                f"the embedding's one release at sigma {cfg.privacy.embedding_noise} alone "
                f"spends epsilon {spent:.2f} of privacy.target_epsilon="
                f"{cfg.privacy.target_epsilon}; raise it (0 takes 20 / target_epsilon) or set "
                "train.embedding_weight=0",
            )
    if cfg.privacy.mode == "central-dp" and cfg.federation.strategy != "fedavg":
        _fail(
            "federation.strategy",
            "privacy.mode 'central-dp' is accounted on equal-weight FedAvg only; "
            "set federation.strategy=fedavg",
        )
    if cfg.privacy.mode == "central-dp" and cfg.federation.keeps_local:
        _fail(
            "federation.share_discriminator",
            "central DP clips and noises the whole model's update each round; set "
            "federation.share_discriminator=1 and federation.local_norm=false with "
            "privacy.mode=central-dp",
        )
    if cfg.privacy.mode == "central-dp" and cfg.federation.message_dtype != "float32":
        _fail(
            "federation.message_dtype",
            "central DP clips and noises each update in full precision; set "
            "federation.message_dtype=float32 with privacy.mode=central-dp",
        )


def _check_federation(cfg: Config) -> None:
    fed = cfg.federation
    if fed.min_hospitals > fed.num_hospitals:
        _fail(
            "federation.min_hospitals",
            f"{fed.min_hospitals} exceeds federation.num_hospitals ({fed.num_hospitals})",
        )
    quorum = _BYZANTINE_QUORUM.get(fed.strategy)
    if quorum is not None:
        a, b = quorum
        need = a * fed.malicious_hospitals + b
        if fed.sampled < need:
            _fail(
                "federation.malicious_hospitals",
                f"{fed.strategy} with {fed.malicious_hospitals} Byzantine hospital(s) needs at "
                f"least {need} hospitals a round, the config trains {fed.sampled}; lower "
                "federation.malicious_hospitals or train more hospitals a round",
            )
    if fed.strategy == "multikrum" and fed.krum_select > fed.sampled - fed.malicious_hospitals:
        _fail(
            "federation.krum_select",
            f"{fed.krum_select} exceeds the honest hospitals of a round "
            f"({fed.sampled} - {fed.malicious_hospitals})",
        )


def check_output_dir(cfg: Config) -> None:
    """Refuses a ``run.output_dir`` that cannot be written, before anything is written.

    Raises:
        ValueError: Naming the folder and why.
    """
    import os
    import tempfile
    from pathlib import Path

    wanted = Path(cfg.run.output_dir).expanduser()
    existing = wanted
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        _fail("run.output_dir", f"{str(existing)!r} is a file, not a folder; choose a folder")
    try:  # the only sure test is to try (root passes every permission check, /proc too)
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(existing)
        os.rmdir(tempfile.mkdtemp(prefix=".fedgan-probe-", dir=existing))
    except OSError as err:
        _fail(
            "run.output_dir",
            f"{str(wanted)!r} cannot be written ({str(existing)!r}: "
            f"{err.strerror or 'not writable'}); choose a folder you can write to",
        )
    run_dir = wanted / cfg.run.name
    if run_dir.exists() and not run_dir.is_dir():
        _fail("run.name", f"{str(run_dir)!r} is a file; choose another run.name")


#: Keys that only say where things are on this machine, or how this process runs: a run
#: continued, or an arm reused, with them set otherwise is the same run.
LOCATORS = frozenset({
    "run.name", "run.output_dir", "run.resume", "run.keep_checkpoints", "data.path",
    "eval.cache_dir",
    "eval.inception_weights", "eval.lpips_weights", "eval.background", "task.vgg_weights",
    "train.device", "federation.concurrent_hospitals",
})  # fmt: skip


def changed_settings(
    cfg: Config,
    allowed: frozenset[str] = frozenset(),
    settle: Callable[[Config], Config] | None = None,
) -> list[str]:
    """The settings of ``cfg`` that differ from those ``cfg.run_dir`` was trained with (its
    ``config.yaml``), as ``"key earlier -> now"``; :data:`LOCATORS` and ``allowed`` are left
    out, and a directory without ``config.yaml`` has none. ``settle`` (the training layer's
    :func:`fedgan.training.settle`) gives both configs the values of their default rules
    first: a run records what its rules gave, so a rule that a later fedgan changed shows
    as a changed setting (a run recorded before fedgan did so is settled by today's rules).

    Raises:
        ValueError: If that ``config.yaml`` does not read.
    """
    from dataclasses import asdict

    from fedgan.config import load_config
    from fedgan.rundir import RunDir

    path = RunDir(cfg.run_dir).config_path
    if not path.is_file():
        return []
    try:
        earlier = resolve(load_config(path))
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(
            f"{str(path)!r} does not read ({err}); it is not a run this fedgan can continue or "
            "reuse: choose another run.name (or --out)"
        ) from None

    def flat(c: Config) -> dict[str, object]:
        return {f"{section}.{key}": value for section, fields in asdict(c).items()
                for key, value in fields.items()}  # fmt: skip

    if settle is not None:
        earlier, cfg = settle(earlier), settle(cfg)
    before, now = flat(earlier), flat(cfg)
    keys = sorted(now.keys() - LOCATORS - allowed)
    return [f"{k} {before.get(k)!r} -> {now[k]!r}" for k in keys if before.get(k) != now[k]]


def shown(changes: list[str]) -> str:
    """The first three of :func:`changed_settings`, and how many more."""
    more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
    return ", ".join(changes[:3]) + more


def check_resume(cfg: Config, settle: Callable[[Config], Config] | None = None) -> None:
    """Refuses to continue a run (``run.resume``) with other settings than it was trained
    with: its ``config.yaml`` would no longer say what made its figures. Only
    ``federation.num_rounds`` may change (to train a run further), and the keys that say
    where things are (:data:`LOCATORS`). ``settle``: see :func:`changed_settings`.

    Raises:
        ValueError: Naming the settings and the fix.
    """
    if not cfg.run.resume:
        return
    changes = changed_settings(cfg, frozenset({"federation.num_rounds"}), settle)
    if changes:
        raise ValueError(
            f"run.resume: {str(cfg.run_dir)!r} was trained with other settings ({shown(changes)}); "
            "resume it with its own settings (drop those --set), or start a new run.name "
            "(model.init_from=<this run> starts from its networks)"
        )


def preflight(cfg: Config, *, pooled: bool = False) -> None:
    """Checks, before Flower starts and before anything is written, what a simulation or a
    pooled run (``pooled``) will need: a writable output folder, the ``train.device`` this
    machine has, every hospital's data (readable, non-empty, finite, of the configured shape),
    the evaluation split, and a ``privacy.delta`` below 1/n of what each accountant covers
    (under DP-SGD a hospital's images, or the pooled set; under central DP the hospitals).

    Raises:
        ValueError: One line naming the problem and the fix (a file, a hospital, a key).
        FileNotFoundError: If the data is missing.
    """
    check_output_dir(cfg)
    import torch

    from fedgan.data import eval_dataset, hospital_dataset
    from fedgan.device import resolve_device
    from fedgan.privacy.accounting import check_delta

    # a simulation's hospitals and a pooled run train on this machine: a device it lacks
    # would fail every hospital after the run folder exists (a deployed site checks its own)
    resolve_device(cfg.train.device)

    n = cfg.federation.num_hospitals
    where = cfg.data.path or cfg.data.source
    sizes: list[int] = []
    for hospital in range(n):
        images = hospital_dataset(cfg.data, cfg.run.seed, hospital, n).tensors[0]
        shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        if tuple(images.shape[1:]) != shape:
            raise ValueError(
                f"hospital {hospital}'s images are {tuple(images.shape[1:])}, the config expects "
                f"{shape}; set data.image_size / data.channels to match"
            )
        sizes.append(len(images))
        bad = int((~torch.isfinite(images.flatten(1))).any(1).sum())
        if bad:
            raise ValueError(
                f"{where}: {bad} image(s) of hospital {hospital}'s share hold NaN or infinite "
                "values; clean or drop them before training"
            )
    if cfg.privacy.mode == "dp-sgd" and pooled:  # one accountant for the pooled set
        check_delta(cfg.privacy.delta, sum(sizes), "the pooled data")
    elif cfg.privacy.mode == "dp-sgd":  # each hospital accounts for its own images
        for hospital, size in enumerate(sizes):
            check_delta(cfg.privacy.delta, size, f"hospital {hospital}")
    elif cfg.privacy.mode == "central-dp":  # one accountant whose records are hospitals
        check_delta(cfg.privacy.delta, n, "the federation", unit="hospitals")
    if len(eval_dataset(cfg.data, cfg.run.seed, n)) == 0:
        raise ValueError(
            f"{where}: the evaluation split is empty; raise data.eval_fraction or add images"
        )


__all__ = [
    "LOCATORS",
    "changed_settings",
    "check_output_dir",
    "check_resume",
    "preflight",
    "resolve",
    "shown",
]
