"""The house's structure: import contracts, a config that loads neither torch nor flwr, and a
catalog that agrees with what its modules register."""

from __future__ import annotations

import importlib
import inspect
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from fedgan.catalog import declared

REPO = Path(__file__).resolve().parent.parent


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    return subprocess.run(
        [str(exe) if exe.exists() else "lint-imports", "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)},
    )


def test_import_contracts_are_kept() -> None:
    res = _lint_imports(REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert re.search(r"Contracts: 2 kept, 0 broken", res.stdout), res.stdout[-2000:]


def test_import_contracts_catch_a_lower_layer_importing_upwards(tmp_path: Path) -> None:
    shutil.copytree(
        REPO / "fedgan", tmp_path / "fedgan", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    config = tmp_path / "fedgan" / "config.py"
    config.write_text(config.read_text() + "\nimport fedgan.runs.recorder  # noqa\n")
    training = tmp_path / "fedgan" / "training" / "loop.py"
    training.write_text(training.read_text() + "\nimport flwr  # noqa\n")
    res = _lint_imports(tmp_path)
    assert res.returncode != 0
    assert "fedgan's layers BROKEN" in res.stdout and "imports flwr BROKEN" in res.stdout


def test_building_and_resolving_a_config_imports_neither_flwr_nor_torch() -> None:
    code = (
        "import sys\n"
        "from fedgan.config import load_config\n"
        "from fedgan.experiment import resolve\n"
        "cfg = resolve(load_config('configs/default.yaml', ['federation.strategy=krum',"
        " 'federation.num_hospitals=5', 'federation.malicious_hospitals=1']))\n"
        "heavy = sorted(m for m in ('flwr', 'torch', 'torchmetrics', 'opacus', 'monai')"
        " if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "HEAVY []" in res.stdout


@pytest.mark.parametrize("command", ["simulate", "centralized", "config", "compare"])
def test_dry_runs_load_no_training_code(command: str) -> None:
    """``--dry-run`` and ``fedgan config`` only resolve and print: they must not pay for torch
    or flwr (seconds and most of a GiB on a laptop)."""
    code = (
        "import sys\n"
        "from fedgan.cli import main\n"
        f"rc = main([{command!r}, '--config', 'configs/default.yaml'"
        + (", '--dry-run'" if command != "config" else "")
        + "])\n"
        "heavy = sorted(m for m in ('flwr', 'torch') if m in sys.modules)\n"
        "print('RC', rc, 'HEAVY', heavy)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "RC 0 HEAVY []" in res.stdout, res.stdout[-2000:]
    assert "federation:" in res.stdout


def test_catalog_names_are_exactly_what_each_module_registers() -> None:
    for registry, modules in declared().items():
        for module, names in modules.items():
            importlib.import_module(module)
            for name in names:
                assert registry.declared_module(name) == module
                registry.get(name)  # registered by its module
        expected = sorted(n for names in modules.values() for n in names)
        assert registry.names() == expected, f"{registry.kind}: not declared in the catalog"


def test_catalog_validation_keys_are_what_each_metric_declares() -> None:
    from fedgan.catalog import METRICS, VALIDATION_KEYS

    for name in METRICS.names():
        metric = METRICS.get(name)
        assert metric.validation == VALIDATION_KEYS.get(name, ()), name
        assert set(metric.validation) <= set(metric.output_keys), name
    assert set(VALIDATION_KEYS) <= set(METRICS.names())


def test_every_config_key_is_read_outside_the_config() -> None:
    from fedgan.config import SECTIONS

    sources = "\n".join(
        p.read_text() for p in (REPO / "fedgan").rglob("*.py") if p.name != "config.py"
    )

    def read(kind: type, name: str) -> bool:
        """Read outside the config, directly or through one of the section's own accessors
        (a method or property whose body reads ``self.<name>``) that is itself used outside."""
        if re.search(rf"\.{name}\b", sources):
            return True
        for attr, member in vars(kind).items():
            func = member.fget if isinstance(member, property) else member
            if callable(func) and not attr.startswith("__"):
                body = inspect.getsource(func)
                if re.search(rf"self\.{name}\b", body) and re.search(rf"\.{attr}\b", sources):
                    return True
        return False

    unread = [
        f"{section}.{f.name}"
        for section, kind in SECTIONS.items()
        for f in fields(kind)
        if not read(kind, f.name)
    ]
    assert not unread, f"config keys nothing reads: {unread}"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("fid_2k", "lower"),
        ("kid_2k_std", "spread"),
        ("domain_recall", "higher"),
        ("ms_ssim_diversity", "near-real"),
        ("ms_ssim_diversity_real", "reference"),
        ("memorization_copy_fraction", "lower"),
        ("trtr_auc", "reference"),
        ("psnr", "higher"),
        ("mae", "lower"),
        ("nlm_psnr", "higher"),
        ("bicubic_mae", "lower"),
        ("psnr_gain", "higher"),
        ("domain_fd", "lower"),
        ("not_a_metric", None),
    ],
)
def test_metrics_declare_their_direction(key: str, expected: str | None) -> None:
    from fedgan.evaluation.metrics import direction

    assert direction(key) == expected


def test_a_hospital_round_does_not_import_the_evaluation_stack() -> None:
    """A deployed round is a fresh ClientApp process: importing it must not load what only the
    server's evaluation uses (seconds of imports per round otherwise)."""
    heavy = ("torchmetrics", "torchvision", "matplotlib", "fedgan.evaluation", "fedgan.report")
    code = (
        "import sys, fedgan.federated.client_app\n"
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
