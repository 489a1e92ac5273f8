"""Studies: several arms trained from one config and compared in one report
(``fedgan compare``).

An arm is the base config plus overrides, trained centralized (pooled data) or federated. Arms
share the model, the data, the evaluation protocol (``eval.*`` may not differ) and, unless a
variant says otherwise, the number of training examples seen. Each arm is an ordinary run
directory under the study's directory, so every figure traces back to the run (and the
``config.yaml``) that made it. A study that stops half-way picks up where it left off: finished
arms are reused, a started one resumes from its latest checkpoint, and an arm folder trained with
other settings is refused (:func:`check_earlier_arm`). ``fedgan.report`` renders
what the arms' run directories hold.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from fedgan.config import Config, dump_yaml, load_config, read_yaml_mapping, with_changes
from fedgan.experiment import changed_settings, preflight, resolve, shown
from fedgan.progress import track
from fedgan.rundir import RunDir, atomic_write_text, dumps

MODES = ("centralized", "federated")


@dataclass(frozen=True)
class Arm:
    """One side of the comparison: a name, how it trains, and its config overrides."""

    name: str
    mode: str = "federated"
    overrides: tuple[str, ...] = ()
    #: The arm this one is measured against in the report's gaps (a private arm against its
    #: non-private twin); ``None``: the plan's pooled arm, for a federated arm.
    against: str | None = None

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
        audit: Run ``fedgan audit`` (membership inference) on every synthesis arm once it has
            trained; the report shows each arm's attacks beside its epsilon.
        seed: ``run.seed`` for every arm, set after the plan's and the arms' settings
            (``fedgan compare --seeds``); ``None``: the seed the settings give.
    """

    name: str
    config: str | None
    overrides: tuple[str, ...]
    arms: tuple[Arm, ...]
    description: str = ""
    expected: dict[str, str] = field(default_factory=dict)
    audit: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"study {self.name!r}: arm names repeat: {names}")
        if not self.arms:
            raise ValueError(f"study {self.name!r} has no arms")

    def references(self) -> dict[str, str]:
        """Each arm's reference for the report's gaps, among the arms this study runs: its
        ``against``, else (for a federated arm) the first pooled arm. An arm whose reference
        was left out (``--arms``) has none."""
        names = {a.name for a in self.arms}
        pooled = next((a.name for a in self.arms if a.mode == "centralized"), None)
        refs = {}
        for a in self.arms:
            ref = a.against if a.against is not None else pooled if a.mode == "federated" else None
            if ref is not None and ref in names and ref != a.name:
                refs[a.name] = ref
        return refs

    def with_seed(self, seed: int) -> Study:
        """The plan with every arm at ``run.seed=seed`` (``fedgan compare --seeds``).

        Raises:
            ValueError: If an arm sets its own seed (it would not follow ``--seeds``).
        """
        own = [a.name for a in self.arms if any(o.split("=", 1)[0].strip() == "run.seed"
                                                 for o in a.overrides)]  # fmt: skip
        if own:
            raise ValueError(
                f"arm {own[0]!r} of study {self.name!r} sets its own run.seed, which --seeds "
                "would override; remove it from the arm's set: (the plan's own set: is fine)"
            )
        return replace(self, seed=int(seed))

    def without_centralized(self) -> Study:
        """The plan less its centralized arms (``fedgan compare --no-centralized``)."""
        arms = tuple(a for a in self.arms if a.mode != "centralized")
        if not arms:
            raise ValueError(
                f"study {self.name!r} has only centralized arms: drop --no-centralized"
            )
        return replace(self, arms=arms)

    def only(self, names: Sequence[str]) -> Study:
        """The plan's arms named in ``names``, in the plan's order (``fedgan compare --study
        PLAN --arms a,b``: one part of a plan, e.g. its ε = 10 arms on another seed).

        Raises:
            ValueError: If a name is not one of the plan's arms.
        """
        known = [a.name for a in self.arms]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            problem = f"has no arm {', '.join(map(repr, unknown))}" if unknown else "names none"
            raise ValueError(
                f"--arms {','.join(names)!r}: study {self.name!r} {problem}; name some of its "
                f"arms: {', '.join(known)}"
            )
        return replace(self, arms=tuple(a for a in self.arms if a.name in names))

    def arm_config(self, arm: Arm, out: Path) -> Config:
        """The resolved config of ``arm``, writing into ``out/<arm.name>``."""
        seed = () if self.seed is None else (f"run.seed={self.seed}",)
        return resolve(load_config(
            self.config,
            [*self.overrides, *arm.overrides, *seed, f"run.output_dir={out}",
             f"run.name={arm.name}"],
        ))  # fmt: skip


def parse_variant(text: str) -> Arm:
    """``NAME:key=value,key=value`` (federated) or ``NAME@centralized:key=value`` as an arm.

    Raises:
        ValueError: If the text has no name, no setting (it would train an arm the comparison
            already has) or a setting without ``=``.
    """
    head, _, body = text.partition(":")
    name, _, mode = head.partition("@")
    settings = tuple(s.strip() for s in body.split(",") if s.strip())
    bad = [s for s in settings if "=" not in s]
    if not name or bad or not settings:
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
    raw = read_yaml_mapping(p, "study plan", "see simulations/", "the plan's keys")
    known = {"name", "description", "config", "set", "arms", "expected_runtime", "audit"}
    unknown = set(raw) - known
    if unknown and {"train", "model", "data", "federation"} & unknown:
        raise ValueError(
            f"{p} is a run config, not a study plan: compare it with fedgan compare --config "
            f"{p} (federated against pooled), or name it as a plan's config:"
        )
    if unknown:
        raise ValueError(f"{p}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    config = raw.get("config")
    if config:
        config = str((p.parent / config).resolve()) if not Path(config).is_absolute() else config
    arms = []
    plan_arms = _mapping(raw.get("arms"), f"{p}: arms", "each arm's name to its mode and set")
    for name, spec in plan_arms.items():
        spec = _mapping(spec, f"{p}: arm {name!r}", "mode and set")
        extra = set(spec) - {"mode", "set", "against"}
        if extra:
            raise ValueError(
                f"{p}: arm {name!r} has unknown keys {sorted(extra)}; allowed: ['against', "
                "'mode', 'set'] (its settings go under set)"
            )
        settings = _settings(spec.get("set"), f"{p}: arm {name!r}: set")
        against = spec.get("against")
        arms.append(Arm(str(name), str(spec.get("mode", "federated")), settings,
                        None if against is None else str(against)))  # fmt: skip
    names = [a.name for a in arms]
    for a in arms:  # checked on the whole plan: --arms may leave a reference out
        if a.against is not None and (a.against == a.name or a.against not in names):
            raise ValueError(
                f"{p}: arm {a.name!r} is measured against {a.against!r}, which is not another "
                f"of the plan's arms; name one of: {', '.join(n for n in names if n != a.name)}"
            )
    expected = _mapping(raw.get("expected_runtime"), f"{p}: expected_runtime", "cpu, gpu to text")
    return Study(
        name=str(raw.get("name") or p.stem),
        config=config,
        overrides=(*_settings(raw.get("set"), f"{p}: set"), *extra_overrides),
        arms=tuple(arms),
        description=str(raw.get("description", "")).strip(),
        expected={str(k): str(v) for k, v in expected.items()},
        audit=_flag(raw.get("audit", False), f"{p}: audit"),
    )


def _mapping(value: Any, where: str, maps: str) -> dict[Any, Any]:
    """``value`` where a plan needs a mapping (``{}`` for nothing), or one line saying so."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} must map {maps}, got {type(value).__name__} {value!r}")
    return value


def _settings(value: Any, where: str) -> tuple[str, ...]:
    """A plan's ``set:`` mapping as ``key=value`` overrides."""
    settings = _mapping(value, where, "config keys to values (section.key: value)")
    return tuple(f"{k}={_scalar(v)}" for k, v in settings.items())


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    return value


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- running -------------------------------------------------------------------------------


def check_earlier_arm(cfg: Config) -> None:
    """Refuses to reuse or resume an arm folder that an earlier ``fedgan compare`` trained
    with other settings (another seed, budget, partition, number of rounds...): its figures
    would be reported as this comparison's.

    Raises:
        ValueError: Naming the settings that differ and the fix.
    """
    from fedgan.training import settle  # imports torch: only when an arm is run

    changes = changed_settings(cfg, settle=settle)
    if changes:
        raise ValueError(
            f"arm {cfg.run.name!r}: {str(cfg.run_dir)!r} was trained with other settings "
            f"({shown(changes)}); choose another --out for this comparison, or delete that "
            "folder to train the arm again"
        )


def _run_arm(cfg: Config, mode: str, log: Callable[[str], None]) -> dict[str, Any]:
    rd = RunDir(cfg.run_dir)
    if rd.summary_path.exists():
        summary = json.loads(rd.summary_path.read_text(encoding="utf-8"))
        if summary.get("rounds") == cfg.federation.num_rounds:
            log(f"[compare] {cfg.run.name}: finished earlier, reusing {rd.path}")
            return summary
    if rd.latest_checkpoint_path() is not None:
        log(f"[compare] {cfg.run.name}: resuming from {rd.latest_checkpoint_path()}")
        cfg = with_changes(cfg, run={"resume": True})  # the same arm (check_earlier_arm)
    if mode == "centralized":
        from fedgan.runs.centralized import train_centralized

        return train_centralized(cfg, log=log)
    from fedgan.federated.simulation import simulate

    return simulate(cfg)


def _audit_arm(cfg: Config, log: Callable[[str], None]) -> None:
    """Membership-inference attacks on an arm's last checkpoint, into its ``audit.json``
    (kept when an earlier study run already audited that checkpoint)."""
    from fedgan.runs.audit import audit_run

    rd = RunDir(cfg.run_dir)
    path = rd.path / "audit.json"
    ckpt = rd.load_checkpoint()
    if path.exists() and json.loads(path.read_text(encoding="utf-8")).get("round") == int(
        ckpt["round"]
    ):
        return
    result = audit_run(cfg, ckpt["state"], rd.read_metrics())
    result["round"] = int(ckpt["round"])
    atomic_write_text(path, dumps(result, indent=2) + "\n")
    aucs = ", ".join(
        f"{name} {row['auc']:.3f}" for name, row in result["attacks"].items() if "auc" in row
    )
    log(f"[compare] {cfg.run.name}: audit AUC {aucs}")


def _prepare(study: Study, out: Path) -> dict[str, Config]:
    """Every arm's resolved config, checked before anything is written: one evaluation
    protocol, no arm folder trained otherwise, each arm's data and warm start."""
    configs = {arm.name: study.arm_config(arm, out) for arm in study.arms}  # validate all first
    protocol = {name: asdict(cfg.eval) for name, cfg in configs.items()}
    if len({json.dumps(p, sort_keys=True) for p in protocol.values()}) != 1:
        raise ValueError("the arms' eval settings differ; a comparison needs one protocol")
    from fedgan.runs.warm import check_warm_start

    for arm in study.arms:  # and every arm's data and warm start, before anything is written
        cfg = configs[arm.name]
        check_earlier_arm(cfg)
        preflight(cfg, pooled=arm.mode == "centralized")
        check_warm_start(cfg)
    return configs


def run_study(
    study: Study,
    out: Path,
    log: Callable[[str], None] = print,
    prepared: dict[str, Config] | None = None,
) -> dict[str, Any]:
    """Runs every arm (reusing finished ones) and writes ``comparison.json``, ``report.md``,
    ``report.html``, ``curves.png`` and ``samples.png`` in ``out``. ``prepared``: the arms'
    configs as :func:`_prepare` checked them for this ``out`` (:func:`run_seeds`).

    Returns:
        The comparison (what ``comparison.json`` holds).
    """
    out = out.resolve()
    configs = prepared if prepared is not None else _prepare(study, out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out / "study.yaml",
        yaml.safe_dump(
            {"name": study.name, "config": study.config, "set": list(study.overrides),
             "seed": study.seed,
             "arms": {a.name: {"mode": a.mode, "set": list(a.overrides),
                               **({"against": a.against} if a.against else {})}
                      for a in study.arms}},
            sort_keys=False,
        ),
    )  # fmt: skip
    started = time.time()
    for i, arm in enumerate(track(study.arms, f"study {study.name}: arms"), 1):
        log(f"[compare] arm {i}/{len(study.arms)}: {arm.name} ({arm.mode})")
        _run_arm(configs[arm.name], arm.mode, log)
        if study.audit and configs[arm.name].task.name == "synthesis":
            _audit_arm(configs[arm.name], log)
    from fedgan.report.compare import ArmRun, collect, write_report

    comparison = collect(
        [ArmRun(a.name, a.mode, a.overrides, configs[a.name].run_dir) for a in study.arms],
        out,
        study=study.name,
        description=study.description,
        base_config=study.config,
        overrides=study.overrides
        if study.seed is None
        else (*study.overrides, f"run.seed={study.seed}"),
        expected=study.expected,
        references=study.references(),
    )
    comparison["wall_seconds"] = time.time() - started
    atomic_write_text(out / "comparison.json", dumps(comparison, indent=2, default=str))
    write_report(comparison, out)
    log(f"[compare] report: {out / 'report.md'}")
    return comparison


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: ``0,1,2``, ``0-4`` or a mix (``0-2,7``), in the order given.

    Raises:
        ValueError: One line naming what does not read, or a seed given twice.
    """
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            first, dash, last = part.partition("-")
            lo, hi = int(first), int(last) if dash else int(first)
            if hi < lo or lo < 0:
                raise ValueError
            seeds += range(lo, hi + 1)
    except ValueError:
        raise ValueError(
            f"--seeds {text!r}: expected seeds such as 0,1,2 or a range 0-4 (non-negative)"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give at least one seed, each once")
    return tuple(seeds)


def seed_folder(out: Path, seed: int) -> Path:
    """Where one seed's comparison of ``fedgan compare --seeds`` goes."""
    return out / f"seed-{seed}"


def run_seeds(
    study: Study, seeds: Sequence[int], out: Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The whole study once per seed (``out/seed-<s>/``, each a comparison with its own
    report), then ``seeds.json``, ``report.md`` and ``report.html`` in ``out``: every arm's
    metrics across the seeds and each arm's gap to its reference, seed by seed. Every seed's
    arms are checked before any trains; a stopped run picks up where it left off (finished
    arms are reused, as in :func:`run_study`).

    Returns:
        The summary (what ``seeds.json`` holds).
    """
    out = out.resolve()
    plans = {s: study.with_seed(s) for s in seeds}
    prepared = {s: _prepare(plan, seed_folder(out, s)) for s, plan in plans.items()}
    comparisons = {}
    started = time.time()
    for i, (s, plan) in enumerate(plans.items(), 1):
        log(f"[compare] seed {s} ({i} of {len(plans)})")
        comparisons[s] = run_study(plan, seed_folder(out, s), log, prepared[s])
    from fedgan.report.seeds import summarize, write_seeds_report

    summary = summarize(comparisons, {s: seed_folder(out, s).name for s in seeds})
    summary["wall_seconds"] = time.time() - started
    atomic_write_text(out / "seeds.json", dumps(summary, indent=2, default=str))
    write_seeds_report(summary, out)
    log(f"[compare] report over {len(plans)} seeds: {out / 'report.md'}")
    return summary


def dump_study_configs(study: Study, out: Path) -> str:
    """Every arm's resolved config, for ``--dry-run`` (one seed's: see :func:`seed_folder`)."""
    return "".join(
        f"# --- arm {arm.name} ({arm.mode})\n{dump_yaml(study.arm_config(arm, out))}"
        for arm in study.arms
    )
