"""Federated against centralized, side by side: a study runs several arms from one config and
writes one report.

An arm is the base config plus overrides, trained centralized (pooled data) or federated. Arms
share the model, the data, the evaluation protocol (``eval.*`` may not differ) and, unless a
variant says otherwise, the number of training examples seen. Each arm is an ordinary run
directory under the study's directory, so every figure traces back to the run (and the
``config.yaml``) that made it. A study that stops half-way picks up where it left off: finished
arms are reused, a started one resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedgan.config import Config, dump_yaml, load_config
from fedgan.rundir import RunDir, atomic_write_text

MODES = ("centralized", "federated")


@dataclass(frozen=True)
class Arm:
    """One side of the comparison: a name, how it trains, and its config overrides."""

    name: str
    mode: str = "federated"
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"arm {self.name!r}: mode must be one of {MODES}, got {self.mode!r}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"arm name {self.name!r} must be a plain folder name")
        touched = [o.split("=", 1)[0] for o in self.overrides if o.startswith("eval.")]
        if touched:
            raise ValueError(
                f"arm {self.name!r} changes {', '.join(touched)}: every arm must be evaluated "
                "the same way; set eval.* in the study's base settings instead"
            )


@dataclass(frozen=True)
class Study:
    """A comparison plan: base config and overrides, then the arms.

    Attributes:
        name: The study's folder name under ``run.output_dir``.
        config: The base experiment YAML (``None``: the defaults).
        overrides: ``key=value`` settings for every arm.
        arms: The arms, run in order.
        description: What the study asks (goes into the report).
    """

    name: str
    config: str | None
    overrides: tuple[str, ...]
    arms: tuple[Arm, ...]
    description: str = ""
    expected: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"study {self.name!r}: arm names repeat: {names}")
        if not self.arms:
            raise ValueError(f"study {self.name!r} has no arms")

    def arm_config(self, arm: Arm, out: Path) -> Config:
        """The resolved config of ``arm``, writing into ``out/<arm.name>``."""
        return load_config(
            self.config,
            [*self.overrides, *arm.overrides, f"run.output_dir={out}", f"run.name={arm.name}"],
        )


def parse_variant(text: str) -> Arm:
    """``NAME:key=value,key=value`` (federated) or ``NAME@centralized:key=value`` as an arm.

    Raises:
        ValueError: If the text has no name or a setting has no ``=``.
    """
    head, _, body = text.partition(":")
    name, _, mode = head.partition("@")
    settings = tuple(s.strip() for s in body.split(",") if s.strip())
    bad = [s for s in settings if "=" not in s]
    if not name or bad:
        raise ValueError(
            f"--variant {text!r}: expected NAME:key=value[,key=value...] "
            "(e.g. iid:data.partition=iid), or NAME@centralized:..."
        )
    return Arm(name.strip(), mode.strip() or "federated", settings)


def study_from_args(
    config: str | None, overrides: Sequence[str], variants: Sequence[str], centralized: bool
) -> Study:
    """The study of ``fedgan compare --config ... [--variant ...]``: the centralized baseline,
    the federated run, then each variant (federated unless it says ``@centralized``)."""
    arms = [Arm("centralized", "centralized")] if centralized else []
    arms.append(Arm("federated", "federated"))
    arms += [parse_variant(v) for v in variants]
    base = load_config(config, list(overrides))
    return Study(f"{base.run.name}-compare", config, tuple(overrides), tuple(arms))


def load_study(path: str | Path, extra_overrides: Sequence[str] = ()) -> Study:
    """Reads a study plan (see ``simulations/``).

    Raises:
        FileNotFoundError: If the plan or its base config does not exist.
        ValueError: For unknown keys or malformed arms.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"study plan {str(p)!r} not found (see simulations/)")
    raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    known = {"name", "description", "config", "set", "arms", "expected_runtime"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{p}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    config = raw.get("config")
    if config:
        config = str((p.parent / config).resolve()) if not Path(config).is_absolute() else config
    arms = []
    for name, spec in (raw.get("arms") or {}).items():
        spec = spec or {}
        settings = tuple(f"{k}={_scalar(v)}" for k, v in (spec.get("set") or {}).items())
        arms.append(Arm(str(name), str(spec.get("mode", "federated")), settings))
    overrides = tuple(f"{k}={_scalar(v)}" for k, v in (raw.get("set") or {}).items())
    return Study(
        name=str(raw.get("name") or p.stem),
        config=config,
        overrides=(*overrides, *extra_overrides),
        arms=tuple(arms),
        description=str(raw.get("description", "")).strip(),
        expected={str(k): str(v) for k, v in (raw.get("expected_runtime") or {}).items()},
    )


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- running -------------------------------------------------------------------------------


def _run_arm(cfg: Config, mode: str, log: Callable[[str], None]) -> dict[str, Any]:
    rd = RunDir(cfg.run_dir)
    if rd.summary_path.exists():
        summary = json.loads(rd.summary_path.read_text(encoding="utf-8"))
        if summary.get("rounds") == cfg.federation.num_rounds:
            log(f"[compare] {cfg.run.name}: finished earlier, reusing {rd.path}")
            return summary
    if rd.latest_checkpoint_path() is not None:
        log(f"[compare] {cfg.run.name}: resuming from {rd.latest_checkpoint_path()}")
        cfg = load_config(rd.config_path, ["run.resume=true"])
    if mode == "centralized":
        from fedgan.training.centralized import train_centralized

        return train_centralized(cfg, log=log)
    from fedgan.federated.simulation import simulate

    return simulate(cfg)


def run_study(study: Study, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every arm (reusing finished ones) and writes ``comparison.json``, ``report.md``,
    ``report.html``, ``curves.png`` and ``samples.png`` in ``out``.

    Returns:
        The comparison (what ``comparison.json`` holds).
    """
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    configs = {arm.name: study.arm_config(arm, out) for arm in study.arms}  # validate all first
    protocol = {name: asdict(cfg.eval) for name, cfg in configs.items()}
    if len({json.dumps(p, sort_keys=True) for p in protocol.values()}) != 1:
        raise ValueError("the arms' eval settings differ; a comparison needs one protocol")
    atomic_write_text(
        out / "study.yaml",
        yaml.safe_dump(
            {"name": study.name, "config": study.config, "set": list(study.overrides),
             "arms": {a.name: {"mode": a.mode, "set": list(a.overrides)} for a in study.arms}},
            sort_keys=False,
        ),
    )  # fmt: skip
    started = time.time()
    for arm in study.arms:
        log(f"[compare] arm {arm.name} ({arm.mode})")
        _run_arm(configs[arm.name], arm.mode, log)
    comparison = collect(study, out, configs)
    comparison["wall_seconds"] = time.time() - started
    atomic_write_text(out / "comparison.json", json.dumps(comparison, indent=2, default=str))
    write_report(comparison, out)
    log(f"[compare] report: {out / 'report.md'}")
    return comparison


# --- collecting ----------------------------------------------------------------------------

_SKIP_PREFIXES = ("seconds_", "gen_")


def _final_metrics(records: list[dict]) -> dict[str, float]:
    """The last evaluated value of every numeric metric (final-only ones included)."""
    final: dict[str, float] = {}
    for r in records:
        for key, value in (r.get("eval") or {}).items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and not key.startswith(_SKIP_PREFIXES):
                final[key] = float(value)
    return final


def _curves(records: list[dict]) -> dict[str, dict[str, list[float]]]:
    seen = 0.0
    curves: dict[str, dict[str, list[float]]] = {}
    for r in records:
        seen += r.get("aggregate", {}).get("examples_seen", 0)
        for key, value in (r.get("eval") or {}).items():
            if isinstance(value, (int, float)) and not key.startswith(_SKIP_PREFIXES):
                if key.endswith("_std"):
                    continue
                c = curves.setdefault(key, {"round": [], "examples_seen": [], "value": []})
                c["round"].append(r["round"])
                c["examples_seen"].append(seen)
                c["value"].append(float(value))
    return curves


def collect(study: Study, out: Path, configs: dict[str, Config]) -> dict[str, Any]:
    """Gathers each arm's summary, final metrics, privacy and curves from its run directory."""
    arms: dict[str, Any] = {}
    for arm in study.arms:
        cfg = configs[arm.name]
        rd = RunDir(cfg.run_dir)
        records = [r for r in rd.read_metrics() if r.get("mode") != "evaluate"]
        summary = json.loads(rd.summary_path.read_text(encoding="utf-8"))
        last = records[-1] if records else {}
        epsilons = {h: v["epsilon"] for h, v in last.get("hospitals", {}).items() if "epsilon" in v}
        last_round = int(last.get("round", 0))
        arms[arm.name] = {
            "mode": arm.mode,
            "overrides": list(arm.overrides),
            "run_dir": str(rd.path.relative_to(out)),
            "config": str(rd.config_path.relative_to(out)),
            "samples": str((rd.samples / f"round_{last_round:04d}.png").relative_to(out)),
            "hospitals": cfg.federation.num_hospitals,
            "partition": cfg.data.partition,
            "privacy": cfg.privacy.mode,
            "rounds": summary.get("rounds"),
            "examples_seen": summary.get("examples_seen"),
            "wall_seconds": summary.get("wall_seconds"),
            "bytes_communicated": summary.get("bytes_communicated"),
            "epsilon_per_hospital": epsilons,
            "max_epsilon": max(epsilons.values()) if epsilons else None,
            "final": _final_metrics(records),
            "not_computed": dict(summary.get("metrics_skipped") or {}),
            "curves": _curves(records),
        }
    baseline = next((a for a in arms.values() if a["mode"] == "centralized"), None)
    for a in arms.values():
        a["same_examples_as_baseline"] = (
            None if baseline is None else a["examples_seen"] == baseline["examples_seen"]
        )
    metrics = sorted({k for a in arms.values() for k in a["final"] if not k.endswith("_std")})
    return {
        "study": study.name,
        "description": study.description,
        "base_config": study.config,
        "overrides": list(study.overrides),
        "expected_runtime": study.expected,
        "metrics": metrics,
        "arms": arms,
    }


# --- the report ----------------------------------------------------------------------------

# Which way is better, for the reader of the table.
_LOWER_IS_BETTER = ("_fd", "_kd", "fid", "kid", "mae", "copy_fraction")
_REFERENCE = ("_real", "heldout_nn_median")  # values of the real data, not scores


def _direction(metric: str) -> str:
    if metric.endswith(_REFERENCE):
        return "(real data)"
    if metric == "ms_ssim_diversity":
        return "(≈ real)"
    lower = metric.startswith(("fid", "kid")) or any(t in metric for t in _LOWER_IS_BETTER)
    return "↓" if lower else "↑"


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def _table(comparison: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    arms = comparison["arms"]
    head = ["", *arms]
    rows = [
        ["mode", *(a["mode"] for a in arms.values())],
        ["hospitals", *(str(a["hospitals"]) if a["mode"] == "federated" else "pooled"
                        for a in arms.values())],
        ["partition", *(a["partition"] if a["mode"] == "federated" else "–"
                        for a in arms.values())],
        ["privacy", *(a["privacy"] for a in arms.values())],
        ["max ε per hospital", *(_fmt(a["max_epsilon"]) for a in arms.values())],
        ["rounds", *(_fmt(a["rounds"]) for a in arms.values())],
        ["examples seen", *(_fmt(a["examples_seen"]) for a in arms.values())],
        ["wall time (s)", *(f"{a['wall_seconds']:.0f}" for a in arms.values())],
        ["MB communicated", *(f"{a['bytes_communicated'] / 1e6:.1f}" for a in arms.values())],
    ]  # fmt: skip
    for m in comparison["metrics"]:
        rows.append([f"{m} {_direction(m)}", *(_fmt(a["final"].get(m)) for a in arms.values())])
    return head, rows


def write_report(comparison: dict[str, Any], out: Path) -> None:
    """``report.md`` and ``report.html`` (with ``curves.png`` and ``samples.png``) in ``out``."""
    from fedgan.report.plots import plot_comparison_curves, side_by_side

    arms = comparison["arms"]
    plot_comparison_curves({n: a["curves"] for n, a in arms.items()}, out / "curves.png")
    side_by_side({n: out / a["samples"] for n, a in arms.items()}, out / "samples.png")
    head, rows = _table(comparison)
    notes = [
        f"Not computed for {n}: "
        + "; ".join(f"{metric} ({why})" for metric, why in a["not_computed"].items())
        for n, a in arms.items()
        if a["not_computed"]
    ]
    if any(a["same_examples_as_baseline"] is False for a in arms.values()):
        differ = [n for n, a in arms.items() if a["same_examples_as_baseline"] is False]
        notes.append(
            f"Arms {', '.join(differ)} saw a different number of training examples than the "
            "centralized baseline (a deliberate variant, or a budget mismatch)."
        )
    md = [f"# {comparison['study']}", ""]
    if comparison["description"]:
        md += [comparison["description"], ""]
    md += [
        f"Base config: `{comparison['base_config'] or 'defaults'}`; settings: "
        + (", ".join(f"`{o}`" for o in comparison["overrides"]) or "none"),
        "",
        "## Final metrics",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "↓ lower is better, ↑ higher is better; (≈ real): closest to the real data's value is "
        "best. Values come from each arm's last evaluation (final-only metrics at the last "
        "round). ε is the largest any hospital spent.",
        "",
        *(f"{n}\n" for n in notes),
        *_epsilon_table(arms),
        "## Curves",
        "",
        "![curves](curves.png)",
        "",
        "## Samples (last round)",
        "",
        "![samples](samples.png)",
        "",
        "## Runs",
        "",
        *(
            f"- **{n}** ({a['mode']}{', ' + ', '.join(a['overrides']) if a['overrides'] else ''}):"
            f" [{a['run_dir']}]({a['run_dir']}), config [{a['config']}]({a['config']})"
            for n, a in arms.items()
        ),
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "report.html", _html(comparison, head, rows, notes))


def _epsilon_table(arms: dict[str, Any]) -> list[str]:
    """Markdown lines: ε spent by each hospital in each private arm (none if no arm is)."""
    private = {n: a["epsilon_per_hospital"] for n, a in arms.items() if a["epsilon_per_hospital"]}
    if not private:
        return []
    hospitals = sorted({h for eps in private.values() for h in eps})
    lines = ["## ε per hospital", "", "| hospital | " + " | ".join(private) + " |",
             "|" + "---|" * (len(private) + 1)]  # fmt: skip
    for h in hospitals:
        lines.append(f"| {h} | " + " | ".join(_fmt(eps.get(h)) for eps in private.values()) + " |")
    return [*lines, ""]


def _html(comparison: dict, head: list[str], rows: list[list[str]], notes: list[str]) -> str:
    from html import escape

    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    runs = "".join(
        f'<li><b>{escape(n)}</b> ({escape(a["mode"])}): <a href="{escape(a["run_dir"])}">'
        f'{escape(a["run_dir"])}</a>, <a href="{escape(a["config"])}">config</a></li>'
        for n, a in comparison["arms"].items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{escape(comparison["study"])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child{{text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>{escape(comparison["study"])}</h1><p>{escape(comparison["description"])}</p>
<p>Base config: <code>{escape(str(comparison["base_config"] or "defaults"))}</code>;
settings: <code>{escape(", ".join(comparison["overrides"]) or "none")}</code></p>
<h2>Final metrics</h2><table><tr>{cells}</tr>{body}</table>
<p>↓ lower is better, ↑ higher is better; (≈ real): closest to the real data's value is
best. ε is the largest any hospital spent.</p>
{"".join(f"<p>{escape(n)}</p>" for n in notes)}
<h2>Curves</h2><img src="curves.png" alt="curves">
<h2>Samples (last round)</h2><img src="samples.png" alt="samples">
<h2>Runs</h2><ul>{runs}</ul></body></html>
"""


def dump_study_configs(study: Study, out: Path) -> str:
    """Every arm's resolved config, for ``--dry-run``."""
    return "".join(
        f"# --- arm {arm.name} ({arm.mode})\n{dump_yaml(study.arm_config(arm, out))}"
        for arm in study.arms
    )
