"""Federated against centralized, side by side: the report of a study, made from its arms'
run directories (``comparison.json``, ``report.md``, ``report.html``, ``curves.png``,
``samples.png``). Each metric's direction comes from the metric itself."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgan.catalog import METRICS, VALIDATION_KEYS, validation_keys
from fedgan.config import load_config
from fedgan.evaluation.metrics import HIGHER, LOWER, NEAR_REAL, REFERENCE, direction
from fedgan.rundir import RunDir, atomic_write_text


@dataclass(frozen=True)
class ArmRun:
    """One arm of a study as the report sees it: its name, how it trained, its overrides and
    its run directory."""

    name: str
    mode: str
    overrides: tuple[str, ...]
    run_dir: Path


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


def _covered(metric: str, values: dict[str, float]) -> bool:
    """Whether ``values`` hold an output of registered ``metric`` (one computed later)."""
    return metric in METRICS and any(k in values for k in METRICS.get(metric).output_keys)


def _evaluated_after(records: list[dict], last_round: int) -> dict[str, float]:
    """Metrics that ``fedgan evaluate`` computed after training on the last round's checkpoint
    (the Inception ``fid_2k`` of a study run on CPU with domain metrics, say); later records
    win. Records of other rounds (``--checkpoint best``, an earlier round) are left out: the
    table compares last rounds."""
    later = [r for r in records if r.get("mode") == "evaluate" and r.get("round") == last_round]
    return _final_metrics(later)


#: The curves' x-axes: what each arm has spent when a value was measured.
X_AXES = ("examples_seen", "generator_steps", "wall_seconds", "round")


#: The table's second figure: the mean of this many last evaluations (one evaluation of a
#: GAN's sample metrics swings from round to round).
RECENT = 3


def _round_steps(record: dict, batch_size: int = 0) -> float:
    """A round's sequential generator steps (see :func:`_curves`)."""
    aggregate = record.get("aggregate", {})
    steps = aggregate.get("generator_steps")
    if steps is None and batch_size > 0:
        per_hospital = aggregate.get("examples_seen", 0) / max(aggregate.get("hospitals", 0), 1)
        steps = per_hospital / batch_size
    return float(steps or 0)


def _curves(records: list[dict], batch_size: int = 0) -> dict[str, dict[str, list[float]]]:
    """Each metric's values with the cumulative spend (:data:`X_AXES`) at each evaluation.

    Generator steps count sequential updates: a federated round adds its longest hospital's
    steps (hospitals train side by side), so an arm with n_D critic steps per generator step
    is not drawn n_D times further right. Wall time adds each round's seconds (evaluation runs
    off the round's path and is not counted). A run recorded before rounds counted their
    generator steps gets them from its examples: a hospital's examples over ``batch_size``
    (exact for fixed batches; DP-SGD's Poisson batches make it an estimate)."""
    spent = dict.fromkeys(("examples_seen", "generator_steps", "wall_seconds"), 0.0)
    curves: dict[str, dict[str, list[float]]] = {}
    for r in records:
        spent["examples_seen"] += r.get("aggregate", {}).get("examples_seen", 0)
        spent["generator_steps"] += _round_steps(r, batch_size)
        spent["wall_seconds"] += r.get("round_seconds") or 0.0
        for key, value in (r.get("eval") or {}).items():
            if isinstance(value, (int, float)) and not key.startswith(_SKIP_PREFIXES):
                if key.endswith("_std"):
                    continue
                c = curves.setdefault(key, {"value": [], **{x: [] for x in X_AXES}})
                c["round"].append(r["round"])
                for x in ("examples_seen", "generator_steps", "wall_seconds"):
                    c[x].append(spent[x])
                c["value"].append(float(value))
    return curves


def _audit(run_dir: Path) -> dict[str, Any] | None:
    """A run's ``audit.json`` (``fedgan audit``), if it has one."""
    path = run_dir / "audit.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def collect(
    arm_runs: Sequence[ArmRun],
    out: Path,
    *,
    study: str,
    description: str = "",
    base_config: str | None = None,
    overrides: Sequence[str] = (),
    expected: dict[str, str] | None = None,
    references: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Gathers each arm's summary, final metrics, privacy and curves from its run directory,
    and each arm's gap to its reference arm (``references``: arm -> the arm it is measured
    against; see :func:`gaps`)."""
    arms: dict[str, Any] = {}
    for arm in arm_runs:
        rd = RunDir(arm.run_dir)
        cfg = load_config(rd.config_path)
        every = rd.read_metrics()
        records = [r for r in every if r.get("mode") != "evaluate"]
        summary = json.loads(rd.summary_path.read_text(encoding="utf-8"))
        last = records[-1] if records else {}
        epsilons = {h: v["epsilon"] for h, v in last.get("hospitals", {}).items() if "epsilon" in v}
        last_round = int(last.get("round", 0))
        final = _final_metrics(records)
        after = {k: v for k, v in _evaluated_after(every, last_round).items() if k not in final}
        skipped = dict(summary.get("metrics_skipped") or {})
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
            "generator_steps": round(sum(_round_steps(r, cfg.train.batch_size) for r in records)),
            "wall_seconds": summary.get("wall_seconds"),
            "bytes_communicated": summary.get("bytes_communicated"),
            "epsilon_per_hospital": epsilons,
            "max_epsilon": max(epsilons.values()) if epsilons else None,
            "final": {**final, **after},
            "evaluated_after": sorted(after),
            "not_computed": {m: why for m, why in skipped.items() if not _covered(m, after)},
            "curves": _curves(records, cfg.train.batch_size),
            "audit": _audit(rd.path),
            "warm_start": summary.get("warm_start"),
            "selected": summary.get("selected"),
            "against": (references or {}).get(arm.name),
        }
        arms[arm.name]["recent"] = {
            key: sum(c["value"][-RECENT:]) / len(c["value"][-RECENT:])
            for key, c in arms[arm.name]["curves"].items()
            if len(c["value"]) > 1
        }
    baseline = next((a for a in arms.values() if a["mode"] == "centralized"), None)
    for a in arms.values():
        a["same_examples_as_baseline"] = (
            None if baseline is None else a["examples_seen"] == baseline["examples_seen"]
        )
    metrics = sorted({k for a in arms.values() for k in a["final"] if not k.endswith("_std")})
    return {
        "gaps": gaps([arms], metrics),
        "study": study,
        "description": description,
        "base_config": base_config,
        "overrides": list(overrides),
        "expected_runtime": dict(expected or {}),
        "metrics": metrics,
        "arms": arms,
    }


# --- gaps ----------------------------------------------------------------------------------

#: The cost beside the metrics in a gap: each arm's wall time, lower is better.
WALL = "wall_seconds"


def _figure(arm: dict[str, Any], which: str, key: str) -> float | None:
    """An arm's ``final`` or ``recent`` value of ``key`` (its wall time for :data:`WALL`)."""
    if key == WALL:
        value = arm.get(WALL) if which == "final" else None
    else:
        value = (arm.get(which) or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def gap(values: Sequence[float | None], reference: Sequence[float | None], better: str) -> dict:
    """One metric of one arm against its reference, seed by seed (a list per seed; None where
    a seed lacks the figure): the ratio of the two means (steadier than any one seed's, whose
    reference can swing), each seed's ratio, and on how many seeds the arm is level with its
    reference or ahead of it (``better``: :data:`HIGHER` or :data:`LOWER`). A ratio is None
    where it means nothing (a reference of 0 or below, a negative figure)."""
    pairs = [(a, r) for a, r in zip(values, reference, strict=True)
             if a is not None and r is not None]  # fmt: skip

    def ratio(a: float, r: float) -> float | None:
        return a / r if r > 0 and a >= 0 else None

    mean_a = sum(a for a, _ in pairs) / len(pairs) if pairs else None
    mean_r = sum(r for _, r in pairs) / len(pairs) if pairs else None
    return {
        "seeds": len(pairs),
        "arm_mean": mean_a,
        "reference_mean": mean_r,
        "ratio_of_means": None if mean_a is None or mean_r is None else ratio(mean_a, mean_r),
        "ratios": [ratio(a, r) for a, r in pairs],
        "level_or_ahead": sum((a <= r) if better == LOWER else (a >= r) for a, r in pairs),
    }


def gaps(runs: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """Each arm against the arm it names in ``against``, on every metric with a better side
    and on wall time: ``{arm: {"against": ref, "metrics": {key: {"final": gap, "recent":
    gap}}}}``. ``runs``: one comparison's ``arms`` per seed (one for a single comparison)."""
    result: dict[str, Any] = {}
    for name, arm in runs[0].items():
        ref = arm.get("against")
        if not ref or ref not in runs[0]:
            continue
        table = {}
        for key in [*(m for m in metrics if direction(m) in (HIGHER, LOWER)), WALL]:
            better = LOWER if key == WALL else str(direction(key))
            table[key] = {
                which: gap([_figure(r[name], which, key) for r in runs],
                           [_figure(r[ref], which, key) for r in runs], better)
                for which in ("final", "recent")
            }  # fmt: skip
        result[name] = {"against": ref, "metrics": table}
    return result


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def gap_lines(comparison_gaps: dict[str, Any], several: bool) -> list[str]:
    """Markdown lines of :func:`gaps`: one row per metric, one column per arm and reference
    (none if no arm has a reference). ``several``: the gaps span several seeds."""
    if not comparison_gaps:
        return []
    columns = list(comparison_gaps)
    keys = list(next(iter(comparison_gaps.values()))["metrics"])
    rows = []
    for key in keys:
        cells = []
        for name in columns:
            final = comparison_gaps[name]["metrics"][key]["final"]
            recent = comparison_gaps[name]["metrics"][key]["recent"]
            cell = _ratio(final["ratio_of_means"])
            if recent["seeds"]:
                cell += f" ({_ratio(recent['ratio_of_means'])})"
            ratios = [r for r in final["ratios"] if r is not None]
            if several and ratios:
                cell += f"; {min(ratios):.2f}-{max(ratios):.2f}x"
            if several and final["seeds"]:
                cell += f"; {final['level_or_ahead']}/{final['seeds']}"
            cells.append(cell)
        label = "wall time (s) ↓" if key == WALL else f"{key} {_direction(key)}"
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    per_seed = (
        "The ratio of the arms' means over the seeds (of the means of their last "
        f"{RECENT} evaluations in brackets); then the range of the seeds' own ratios, and on "
        "how many seeds the arm was level with its reference or ahead of it (last evaluation)."
        if several
        else f"The arm's last evaluation over its reference's (in brackets, the means of their "
        f"last {RECENT} evaluations)."
    )
    return [
        "## Gaps: each arm against its reference",
        "",
        "Each arm over the arm it is measured against (a plan's `against:`; else, for a "
        "federated arm, the pooled one). " + per_seed + " Below 1x is lower, above 1x higher: "
        "read it with the metric's arrow.",
        "",
        "| | " + " | ".join(f"{n} / {comparison_gaps[n]['against']}" for n in columns) + " |",
        "|" + "---|" * (len(columns) + 1),
        *rows,
        "",
    ]


# --- the report ----------------------------------------------------------------------------

_ARROWS = {HIGHER: "↑", LOWER: "↓", NEAR_REAL: "(≈ real)", REFERENCE: "(real data)"}


def _direction(key: str) -> str:
    """The reader's arrow for ``key``, as its metric declares it (blank for an unknown key)."""
    return _ARROWS.get(direction(key) or "", "")


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def effective_settings(overrides: Sequence[str]) -> list[str]:
    """The settings that took effect: each key once, with its last value, where it first came.

    A plan's ``set:`` and the command line's ``--set`` may both name a key (the plan's
    ``run.seed=0``, then ``--set run.seed=4``); the config loader applies them in order, so
    the last one is what ran, and a report that listed both would read as two seeds.
    """
    last: dict[str, str] = {}
    for o in overrides:
        last[o.split("=", 1)[0].strip()] = o
    return list(last.values())


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
        ["generator steps in sequence", *(_fmt(a.get("generator_steps")) for a in arms.values())],
        ["wall time (s)", *(f"{a['wall_seconds']:.0f}" for a in arms.values())],
        ["MB communicated", *(f"{a['bytes_communicated'] / 1e6:.1f}" for a in arms.values())],
    ]  # fmt: skip
    # a warm-started arm's networks before any round (what the public data alone give)
    warm = [(a.get("warm_start") or {}).get("eval") or {} for a in arms.values()]
    for m in comparison["metrics"]:
        rows.append([f"{m} {_direction(m)}", *(_with_recent(a, m) for a in arms.values())])
        if any(m in w for w in warm):
            rows.append([f"{m}, warm start alone (round 0) {_direction(m)}",
                         *(_fmt(w.get(m)) for w in warm)])  # fmt: skip
    return head, rows


def _with_recent(arm: dict[str, Any], metric: str) -> str:
    """The final value, and the mean of the last :data:`RECENT` evaluations in brackets."""
    final = _fmt(arm["final"].get(metric))
    recent = arm.get("recent", {}).get(metric)
    return final if recent is None else f"{final} ({_fmt(recent)})"


def write_report(comparison: dict[str, Any], out: Path) -> None:
    """``report.md`` and ``report.html`` (with ``curves.png`` and ``samples.png``) in ``out``."""
    from fedgan.report.plots import plot_comparison_curves, side_by_side

    arms = comparison["arms"]
    curves = {n: a["curves"] for n, a in arms.items()}
    references = {k for k in comparison["metrics"] if direction(k) == REFERENCE}
    plot_comparison_curves(curves, out / "curves.png", references=references)
    plot_comparison_curves(curves, out / "curves_steps.png", x="generator_steps",
                           references=references)  # fmt: skip
    plot_comparison_curves(curves, out / "curves_wall.png", x="wall_seconds",
                           references=references)  # fmt: skip
    side_by_side({n: out / a["samples"] for n, a in arms.items()}, out / "samples.png")
    head, rows = _table(comparison)
    notes = [
        f"Not computed for {n}: "
        + "; ".join(f"{metric} ({why})" for metric, why in a["not_computed"].items())
        for n, a in arms.items()
        if a["not_computed"]
    ]
    notes += [
        f"Computed after training by `fedgan evaluate` on {n}'s last-round checkpoint: "
        + ", ".join(a["evaluated_after"])
        for n, a in arms.items()
        if a.get("evaluated_after")
    ]
    if any(a["same_examples_as_baseline"] is False for a in arms.values()):
        differ = [n for n, a in arms.items() if a["same_examples_as_baseline"] is False]
        notes.append(
            f"Arms {', '.join(differ)} saw a different number of training examples than the "
            "centralized baseline (a deliberate variant, or a budget mismatch)."
        )
    baseline = next((a for a in arms.values() if a["mode"] == "centralized"), None)
    fewer = [f"{n} {a['generator_steps']}" for n, a in arms.items()
             if baseline and a["mode"] == "federated"
             and 0 < a.get("generator_steps", 0) < baseline.get("generator_steps", 0)]  # fmt: skip
    if baseline and fewer:
        notes.append(
            f"Generator steps in sequence: {', '.join(fewer)} against the centralized "
            f"baseline's {baseline['generator_steps']}. Hospitals train side by side, so a "
            "federated round advances one hospital's steps; at equal examples a federation of "
            "N takes 1/N of the pooled run's steps (simulations/README.md, study 48)."
        )
    md = [f"# {comparison['study']}", ""]
    if comparison["description"]:
        md += [comparison["description"], ""]
    md += [
        f"Base config: `{comparison['base_config'] or 'defaults'}`; settings: "
        + (", ".join(f"`{o}`" for o in effective_settings(comparison["overrides"])) or "none"),
        "",
        "## Final metrics",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "↓ lower is better, ↑ higher is better; (≈ real): closest to the real data's value is "
        "best. Values come from each arm's last evaluation (final-only metrics at the last "
        f"round); in brackets, the mean of its last {RECENT} evaluations, steadier than one. "
        "ε is the largest any hospital spent.",
        "",
        *(f"{n}\n" for n in notes),
        *gap_lines(comparison.get("gaps") or {}, several=False),
        *_selected_table(arms),
        *_epsilon_table(arms),
        *_audit_table(arms),
        "## Curves",
        "",
        "Against training examples seen (the arms' equal budget):",
        "",
        "![curves](curves.png)",
        "",
        "Compute-matched: against sequential generator steps (a federated round counts its "
        "longest hospital's steps, as hospitals train side by side) and against wall time. "
        "Dashed lines are the real data's values.",
        "",
        "![curves by generator steps](curves_steps.png)",
        "",
        "![curves by wall time](curves_wall.png)",
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
            + (
                f"; warm-started from networks trained on {a['warm_start']['data']} (no privacy "
                "cost: ε covers this run's data only; the rows 'warm start alone' score those "
                "networks before any round)"
                if a.get("warm_start")
                else ""
            )
            for n, a in arms.items()
        ),
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "report.html", _html(comparison, head, rows, notes))


def _selected(arms: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """The round each arm's ``eval.select`` chose on validation images, with the test
    figures of its metric at that round beside the last round's (None if no arm chose)."""
    chosen = {n: a["selected"] for n, a in arms.items() if a.get("selected")}
    if not chosen:
        return None
    owner = validation_keys(list(VALIDATION_KEYS))  # validation key -> its metric
    owners = {owner.get(c["key"]) for c in chosen.values()}
    keys = [k for m in sorted(o for o in owners if o) for k in METRICS.get(m).output_keys
            if direction(k) in (HIGHER, LOWER) and k not in METRICS.get(m).validation
            and any(k in c["eval"] for c in chosen.values())]  # fmt: skip
    head = ["arm", "round chosen", "chosen by", *keys]
    rows = []
    for name, c in chosen.items():
        last = arms[name]["final"]
        figures = [f"{_fmt(c['eval'].get(k))} ({_fmt(last.get(k))})" for k in keys]
        rows.append([name, f"{c['round']} of {arms[name]['rounds']}",
                     f"{c['key']} = {_fmt(c['value'])}", *figures])  # fmt: skip
    return head, rows


def _selected_table(arms: dict[str, Any]) -> list[str]:
    """Markdown lines of :func:`_selected` (none if no arm chose a round)."""
    table = _selected(arms)
    if table is None:
        return []
    head, rows = table
    return [
        "## The round chosen on validation images (`eval.select`)",
        "",
        "Each figure is the test half's at the chosen round; the last round's in brackets. "
        "The choice saw only the validation half.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]


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


def _audit_table(arms: dict[str, Any]) -> list[str]:
    """Markdown lines: each audited arm's membership-inference attacks beside its epsilon."""
    audited = {n: a["audit"] for n, a in arms.items() if a.get("audit")}
    if not audited:
        return []
    lines = [
        "## Membership inference (`fedgan audit`)",
        "",
        "Members: the hospitals' training images; non-members: held-out images with the same "
        "class mix. AUC 0.5 is a coin; the ε bound is a 95 % lower bound implied by the best "
        "attack's error rates, to read beside the accountant's ε.",
        "",
        "| arm | accounted ε | LOGAN AUC | GAN-Leaks AUC | DOMIAS AUC | TPR@1% (best) "
        "| empirical ε ≥ |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, audit in audited.items():
        attacks = {k: v for k, v in audit["attacks"].items() if "auc" in v}
        auc = {k: _fmt(attacks[k]["auc"]) if k in attacks else "–"
               for k in ("logan", "gan_leaks", "domias")}  # fmt: skip
        tpr = max((v["tpr_at_1pct"] for v in attacks.values()), default=float("nan"))
        bound = max((v["epsilon_lower_bound"] for v in attacks.values()), default=float("nan"))
        eps = audit.get("accounted_epsilon")
        lines.append(
            f"| {name} | {'∞ (no DP)' if eps is None else _fmt(eps)} | {auc['logan']} | "
            f"{auc['gan_leaks']} | {auc['domias']} | {_fmt(tpr)} | {_fmt(bound)} |"
        )
    return [*lines, ""]


def _html(comparison: dict, head: list[str], rows: list[list[str]], notes: list[str]) -> str:
    from html import escape

    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    chosen = _selected(comparison["arms"])
    selected = "" if chosen is None else (
        "<h2>The round chosen on validation images</h2><table><tr>"
        + "".join(f"<th>{escape(h)}</th>" for h in chosen[0]) + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>"
                  for r in chosen[1])
        + "</table><p>Test figures at the chosen round (the last round's in brackets); the "
        "choice saw only the validation half.</p>"
    )  # fmt: skip
    runs = "".join(
        f'<li><b>{escape(n)}</b> ({escape(a["mode"])}): <a href="{escape(a["run_dir"])}">'
        f'{escape(a["run_dir"])}</a>, <a href="{escape(a["config"])}">config</a></li>'
        for n, a in comparison["arms"].items()
    )
    settings = ", ".join(effective_settings(comparison["overrides"]))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{escape(comparison["study"])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child{{text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>{escape(comparison["study"])}</h1><p>{escape(comparison["description"])}</p>
<p>Base config: <code>{escape(str(comparison["base_config"] or "defaults"))}</code>;
settings: <code>{escape(settings or "none")}</code></p>
<h2>Final metrics</h2><table><tr>{cells}</tr>{body}</table>
<p>↓ lower is better, ↑ higher is better; (≈ real): closest to the real data's value is
best. ε is the largest any hospital spent.</p>
{"".join(f"<p>{escape(n)}</p>" for n in notes)}
{selected}
<h2>Curves</h2><img src="curves.png" alt="curves">
<p>Compute-matched: by sequential generator steps and by wall time.</p>
<img src="curves_steps.png" alt="curves by generator steps">
<img src="curves_wall.png" alt="curves by wall time">
<h2>Samples (last round)</h2><img src="samples.png" alt="samples">
<h2>Runs</h2><ul>{runs}</ul></body></html>
"""
