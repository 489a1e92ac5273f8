"""Every registry of fedgan and the names it holds, declared without importing their code.

The config is checked against these names (``fedgan.experiment.resolve``) without importing
torch or flwr; a name's module is imported, and registers the object, the first time it is used.
A test imports every declared module and checks that the names here and the names registered
agree both ways, so adding a GAN family, task, strategy or metric means its module plus one line
here.
"""

from __future__ import annotations

from typing import Any

from fedgan.registry import Registry

#: GAN families of the ``synthesis`` task (``model.family``).
FAMILIES: Registry[Any] = Registry("GAN family")
#: Training objectives, one per task (``task.name``).
TASKS: Registry[Any] = Registry("task")
#: Server-side aggregation strategies (``federation.strategy``).
STRATEGIES: Registry[Any] = Registry("aggregation strategy")
#: Evaluation metrics (``eval.metrics``, ``eval.final_metrics``, ``fedgan evaluate``).
METRICS: Registry[Any] = Registry("metric")
#: Data sources (``data.source``).
DATASETS: Registry[Any] = Registry("data source")
#: Simulation partitions (``data.partition``).
PARTITIONERS: Registry[Any] = Registry("partitioner")
#: Image file formats read from folders.
FORMATS: Registry[Any] = Registry("file format")

_DECLARED: dict[Registry[Any], dict[str, tuple[str, ...]]] = {
    FAMILIES: {
        "fedgan.models.dcgan": ("dcgan",),
        "fedgan.models.wgan_gp": ("wgan-gp",),
        "fedgan.models.sngan": ("sngan",),
        "fedgan.models.cgan": ("cgan",),
    },
    TASKS: {
        "fedgan.training.objectives.synthesis": ("synthesis",),
        "fedgan.training.objectives.enhance": ("enhance",),
        "fedgan.training.objectives.super_resolution": ("super-resolution",),
        "fedgan.training.objectives.translate": ("translate",),
        "fedgan.training.objectives.inpaint": ("inpaint",),
        "fedgan.training.objectives.anomaly": ("anomaly",),
    },
    STRATEGIES: {
        "fedgan.federated.strategies": (
            "bulyan",
            "fedadagrad",
            "fedadam",
            "fedavg",
            "fedavgm",
            "fedmedian",
            "fedprox",
            "fedtrimmedavg",
            "fedyogi",
            "krum",
            "multikrum",
        ),
    },
    METRICS: {
        "fedgan.evaluation.anomaly": ("anomaly",),
        "fedgan.evaluation.metrics": (
            "domain_fd_1k",
            "domain_fd_2k",
            "domain_kd_1k",
            "domain_kd_2k",
            "domain_prdc_1k",
            "fid_2k",
            "fid_10k",
            "fid_50k",
            "kid_2k",
            "kid_10k",
            "kid_50k",
            "memorization_1k",
            "ms_ssim_diversity",
            "tstr_auc",
        ),
        "fedgan.evaluation.paired": (
            "gmsd",
            "hole",
            "lpips",
            "mae",
            "ms_gmsd",
            "ms_ssim",
            "mse",
            "nmi",
            "psnr",
            "ssim",
        ),
    },
    DATASETS: {"fedgan.data.sources": ("phantom", "medmnist", "folder", "dicom", "nifti")},
    PARTITIONERS: {"fedgan.data.partition": ("iid", "dirichlet", "quantity", "site-shift")},
    FORMATS: {"fedgan.data.readers": ("folder", "dicom", "nifti")},
}

#: The validation keys of each metric that has them (its ``Metric.validation``): measured on
#: held-out images its test figures never see, so ``eval.select`` may choose a round by them.
VALIDATION_KEYS: dict[str, tuple[str, ...]] = {"anomaly": ("anomaly_val_auc",)}


def validation_keys(metrics: list[str]) -> dict[str, str]:
    """The validation keys of the metrics named ``metrics``, each with its metric's name."""
    return {key: name for name in metrics for key in VALIDATION_KEYS.get(name, ())}


for _registry, _modules in _DECLARED.items():
    for _module, _names in _modules.items():
        for _name in _names:
            _registry.declare(_name, _module)


def declared() -> dict[Registry[Any], dict[str, tuple[str, ...]]]:
    """Each registry's declared modules and the names each must register (for the tests)."""
    return _DECLARED
