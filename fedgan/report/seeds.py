"""One study over several seeds (``fedgan compare --seeds``): every arm's metrics across the
seeds, and each arm's gap to its reference seed by seed (``seeds.json``, ``report.md``,
``report.html``). One seed of a GAN is one draw: its last evaluation can move by half its
size from one round to the next, and a reference arm swings as much as the arm measured
against it, so a gap read on one seed says little. Each seed's own comparison, with its
curves and samples, stays in its folder."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedgan.report.compare import WALL, _direction, _fmt, gap_lines, gaps
from fedgan.rundir import atomic_write_text


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """The seeds' values of one figure (None where a seed lacks it), their mean, sample
    standard deviation (None below two values), minimum and maximum."""
    present = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(present)
    mean = sum(present) / n if n else None
    sd = (
        math.sqrt(sum((v - mean) ** 2 for v in present) / (n - 1))
        if n > 1 and mean is not None
        else None
    )
    return {
        "values": list(values),
        "n": n,
        "mean": mean,
        "sd": sd,
        "min": min(present) if present else None,
        "max": max(present) if present else None,
    }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarize(comparisons: dict[int, dict[str, Any]], folders: dict[int, str]) -> dict[str, Any]:
    """The summary of one study's comparisons, one per seed (``folders``: each seed's folder
    under the summary's, for the links).

    Raises:
        ValueError: If the seeds' comparisons do not hold the same arms.
    """
    seeds = list(comparisons)
    first = comparisons[seeds[0]]
    names = list(first["arms"])
    for s in seeds:
        if list(comparisons[s]["arms"]) != names:
            raise ValueError(f"seed {s}'s comparison holds other arms than seed {seeds[0]}'s")
    metrics = sorted({m for c in comparisons.values() for m in c["metrics"]})
    arms: dict[str, Any] = {}
    for name in names:
        runs = [comparisons[s]["arms"][name] for s in seeds]
        audits = [r.get("audit") or {} for r in runs]
        attacks = sorted({k for a in audits for k in a.get("attacks", {})})
        arms[name] = {
            "mode": runs[0]["mode"],
            "partition": runs[0]["partition"] if runs[0]["mode"] == "federated" else "–",
            "privacy": runs[0]["privacy"],
            "against": runs[0].get("against"),
            "final": {m: spread([_number(r["final"].get(m)) for r in runs]) for m in metrics},
            "recent": {
                m: spread([_number(r.get("recent", {}).get(m)) for r in runs]) for m in metrics
            },
            WALL: spread([_number(r.get(WALL)) for r in runs]),
            "max_epsilon": max(
                (e for r in runs if (e := _number(r.get("max_epsilon"))) is not None), default=None
            ),
            "audit_auc_max": {
                k: max(
                    (
                        a["attacks"][k]["auc"]
                        for a in audits
                        if "auc" in a.get("attacks", {}).get(k, {})
                    ),
                    default=None,
                )
                for k in attacks
            },
            "empirical_epsilon_max": max(
                (
                    row["epsilon_lower_bound"]
                    for a in audits
                    for row in a.get("attacks", {}).values()
                    if "epsilon_lower_bound" in row
                ),
                default=None,
            ),
            "samples": {
                s: f"{folders[s]}/{comparisons[s]['arms'][name]['samples']}" for s in seeds
            },
        }
    return {
        "study": first["study"],
        "description": first.get("description", ""),
        "base_config": first.get("base_config"),
        "seeds": seeds,
        "folders": {s: folders[s] for s in seeds},
        "metrics": metrics,
        "arms": arms,
        "gaps": gaps([comparisons[s]["arms"] for s in seeds], metrics),
    }


def _cell(figure: dict[str, Any]) -> str:
    """``mean ± sd (min-max)`` of one figure over the seeds."""
    if figure["mean"] is None:
        return "–"
    if figure["sd"] is None:
        return _fmt(figure["mean"])
    return (
        f"{_fmt(figure['mean'])} ± {_fmt(figure['sd'])} "
        f"({_fmt(figure['min'])}-{_fmt(figure['max'])})"
    )


def _lines(summary: dict[str, Any]) -> list[str]:
    arms = summary["arms"]
    seeds = ", ".join(map(str, summary["seeds"]))
    head = "| | " + " | ".join(arms) + " |"
    rows = [
        "| mode | " + " | ".join(a["mode"] for a in arms.values()) + " |",
        "| partition | " + " | ".join(a["partition"] for a in arms.values()) + " |",
        "| privacy | " + " | ".join(a["privacy"] for a in arms.values()) + " |",
        "| max ε per hospital | " + " | ".join(_fmt(a["max_epsilon"]) for a in arms.values())
        + " |",
        "| wall time (s) | " + " | ".join(_cell(a[WALL]) for a in arms.values()) + " |",
        *(f"| {m} {_direction(m)} | " + " | ".join(_cell(a["final"][m]) for a in arms.values())
          + " |" for m in summary["metrics"]),
    ]  # fmt: skip
    audited = {n: a for n, a in arms.items() if a["audit_auc_max"]}
    audit = []
    if audited:
        attacks = sorted({k for a in audited.values() for k in a["audit_auc_max"]})
        audit = [
            "## Membership inference, the worst seed",
            "",
            "Each attack's highest AUC over the seeds, and the highest empirical ε lower "
            "bound (`fedgan audit`; each seed's report has its own).",
            "",
            "| arm | max ε accounted | " + " | ".join(f"{k} AUC" for k in attacks)
            + " | empirical ε ≥ |",
            "|" + "---|" * (len(attacks) + 3),
            *(f"| {n} | {_fmt(a['max_epsilon']) if a['max_epsilon'] is not None else '∞ (no DP)'}"
              " | " + " | ".join(_fmt(a["audit_auc_max"].get(k)) for k in attacks)
              + f" | {_fmt(a['empirical_epsilon_max'])} |" for n, a in audited.items()),
            "",
        ]  # fmt: skip
    return [
        f"# {summary['study']}, over seeds {seeds}",
        "",
        *([summary["description"], ""] if summary["description"] else []),
        f"Base config: `{summary['base_config'] or 'defaults'}`; one comparison per seed, "
        "each in its folder with its report, curves and samples.",
        "",
        "## Each arm across the seeds",
        "",
        "Mean ± standard deviation over the seeds (lowest-highest) of each arm's last evaluation.",
        "",
        head,
        "|" + "---|" * (len(arms) + 1),
        *rows,
        "",
        *gap_lines(summary["gaps"], several=len(summary["seeds"]) > 1),
        *audit,
        "## The seeds",
        "",
        *(
            f"- seed {s}: [report]({f}/report.md), [samples]({f}/samples.png)"
            for s, f in summary["folders"].items()
        ),
        "",
    ]


def write_seeds_report(summary: dict[str, Any], out: Path) -> None:
    """``report.md`` and ``report.html`` of :func:`summarize` in ``out``."""
    from html import escape

    lines = _lines(summary)
    atomic_write_text(out / "report.md", "\n".join(lines))
    body = []
    table: list[str] = []
    for line in [*lines, ""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                tag = "th" if not table else "td"
                cells = [c.strip() for c in line.strip("|").split(" | ")]
                table.append("<tr>" + "".join(f"<{tag}>{escape(c)}</{tag}>" for c in cells)
                             + "</tr>")  # fmt: skip
            continue
        if table:
            body.append("<table>" + "".join(table) + "</table>")
            table = []
        if line.startswith("# "):
            body.append(f"<h1>{escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{escape(line[3:])}</h2>")
        elif line.startswith("- "):
            body.append("<p>" + re.sub(r"\[([^]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>',
                                       escape(line[2:])) + "</p>")  # fmt: skip
        elif line:
            body.append(f"<p>{escape(line)}</p>")
    atomic_write_text(
        out / "report.html",
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>{escape(summary['study'])}</title><style>body{{font-family:sans-serif;"
        "max-width:1200px;margin:2em auto}table{border-collapse:collapse}td,th{border:1px "
        "solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}</style>"
        "</head><body>" + "".join(body) + "</body></html>\n",
    )
