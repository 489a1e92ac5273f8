"""The fedgan command line: train GANs across simulated hospitals or pooled, compare the
two, and evaluate, audit, sample from and apply a trained run. Bad input is one line and exit
code 2; a failed run exits 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedgan.config import Config, dump_yaml, load_config
from fedgan.experiment import resolve

if TYPE_CHECKING:
    from pathlib import Path

    from fedgan.studies import Study


def _overrides_arg(p: argparse.ArgumentParser, help_: str) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_
    )


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML experiment (see configs/); defaults if omitted")
    _overrides_arg(p, "override one key, e.g. --set federation.num_rounds=5 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


CHECKPOINT_HELP = "a round number, latest, best, or a checkpoint file (default: the run's latest)"


def _load_run(run: str, overrides: list[str], checkpoint: str | None):
    """A run directory's resolved config (with ``overrides``) and one of its checkpoints.

    Raises:
        FileNotFoundError: If ``run`` is not a run directory or has no such checkpoint.
    """
    from fedgan.rundir import RunDir

    rd = RunDir(run)
    if not rd.config_path.exists():
        raise FileNotFoundError(f"{rd.config_path} not found: is {run!r} a run directory?")
    return rd, resolve(load_config(rd.config_path, overrides)), rd.load_checkpoint(checkpoint)


def _resolve(args: argparse.Namespace) -> Config:
    return resolve(load_config(args.config, args.overrides))


#: A private synthesis plan at or below this epsilon per hospital, and shorter than
#: :data:`LONG_PRIVATE_PLAN` rounds, gets a line of advice: at epsilon 1 the generator was
#: still learning at round 20, and 40 rounds at the same budget lifted recall from 0.06-0.21
#: to 0.24-0.39 on three seeds (simulations/README.md, studies 35 and 38). A run warm-started
#: from public data (``model.init_from``) starts past that slow start and is not told.
SMALL_EPSILON = 1.0
LONG_PRIVATE_PLAN = 40


def short_plan_advice(cfg: Config) -> str | None:
    """The line of advice for a federated private synthesis plan too short for its budget
    (:data:`SMALL_EPSILON`, :data:`LONG_PRIVATE_PLAN`) on IID hospitals, or None. Under label
    skew the longer plan was measured both ways (study 39: better on one seed of three,
    diverged on another), so it is not advised there."""
    rounds = cfg.federation.num_rounds
    small = cfg.privacy.mode == "dp-sgd" and cfg.privacy.target_epsilon <= SMALL_EPSILON
    cold = not cfg.model.init_from  # a public warm start skips the slow start (study 12)
    iid = cfg.data.partition == "iid"
    if not (small and cold and iid and cfg.task.name == "synthesis" and rounds < LONG_PRIVATE_PLAN):
        return None
    return (
        f"a private generator at epsilon {cfg.privacy.target_epsilon:g} learns slowly, and "
        f"{rounds} rounds may leave it short: on PneumoniaMNIST at epsilon 1 with IID hospitals, "
        "40 rounds on the same budget lifted recall from 0.06-0.21 to 0.24-0.39 over 20 on "
        "three seeds (simulations/README.md, studies 35 and 38); raise federation.num_rounds "
        "if the time allows"
    )


def plan_advice(study: Study, out: Path) -> list[str]:
    """:func:`short_plan_advice` for each federated arm of a comparison that it concerns."""
    lines = []
    for arm in study.arms:
        if arm.mode == "federated":
            advice = short_plan_advice(study.arm_config(arm, out))
            if advice:
                lines.append(f"arm {arm.name}: {advice}")
    return lines


def _print_privacy(cfg: Config, *, pooled: bool = False) -> None:
    """Under DP-SGD, one line with the budget and what the defaults resolved to (the
    embedding term's weight follows the budget, so the config's -1 alone does not say), and
    for a short synthesis plan at a small budget one line of advice.
    ``pooled``: the centralized baseline, which keeps the recipe but trains without DP."""
    if cfg.privacy.mode != "dp-sgd":
        return
    from fedgan.training.embedding import embedding_noise, smallest_release
    from fedgan.training.objectives import make_objective

    weight = float(getattr(make_objective(cfg), "embedding_weight", 0.0))
    if pooled:
        print(
            "fedgan: the pooled baseline trains without DP (privacy.mode is the hospitals'); "
            f"it keeps the private recipe, with the embedding term at weight {weight:.2f} "
            "on the pooled data's exact mean",
            flush=True,
        )
        return
    term = (
        f"the generator's embedding term at weight {weight:.2f} (train.embedding_weight), "
        f"released once at sigma {embedding_noise(cfg):g} (privacy.embedding_noise) by each "
        f"hospital of {smallest_release(cfg)} images or more"
        if weight
        else "no embedding term (train.embedding_weight)"
    )
    delta = f"{cfg.privacy.delta:g}" if cfg.privacy.delta else "1/(10 n) up to 1e-05"
    print(
        f"fedgan: DP-SGD within epsilon {cfg.privacy.target_epsilon:g} per hospital "
        f"(delta {delta}); {term}",
        flush=True,
    )
    advice = short_plan_advice(cfg)
    if advice:
        print(f"fedgan: {advice}", flush=True)


def cmd_simulate(args: argparse.Namespace) -> int:
    cfg = _resolve(args)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    from fedgan.experiment import preflight
    from fedgan.federated.simulation import check_run_dir, simulate
    from fedgan.runs.warm import check_warm_start

    check_run_dir(cfg)  # before reading any data: a name already taken is the first thing to say
    preflight(cfg)
    check_warm_start(cfg)
    print(
        f"fedgan: simulating {cfg.federation.num_hospitals} hospitals, "
        f"{cfg.federation.num_rounds} rounds -> {cfg.run_dir.resolve()}",
        flush=True,
    )
    _print_privacy(cfg)
    summary = simulate(cfg)
    print(f"fedgan: done in {summary['wall_seconds']:.0f}s; results in {summary['run_dir']}")
    return 0


def cmd_centralized(args: argparse.Namespace) -> int:
    cfg = _resolve(args)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    from fedgan.experiment import preflight
    from fedgan.runs.centralized import train_centralized
    from fedgan.runs.warm import check_warm_start

    preflight(cfg, pooled=True)
    check_warm_start(cfg)
    _print_privacy(cfg, pooled=True)
    summary = train_centralized(cfg, log=lambda line: print(line, flush=True))
    print(f"fedgan: done in {summary['wall_seconds']:.0f}s; results in {summary['run_dir']}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Centralized, non-private training on public data, for ``model.init_from`` warm starts."""
    named = any(o.startswith("run.name=") for o in args.overrides)
    args.overrides = [*(() if named else ("run.name=pretrain",)), *args.overrides,
                      "privacy.mode=none", "privacy.target_epsilon=0"]  # fmt: skip
    cfg = _resolve(args)
    if cfg.task.name != "synthesis":
        raise ValueError(f"fedgan pretrain warm-starts synthesis GANs; task is {cfg.task.name!r}")
    code = cmd_centralized(args)
    if code == 0 and not args.dry_run:
        print(
            "fedgan: warm-start a run from these networks with "
            f"--set model.init_from={cfg.run_dir.resolve()} (same model settings and image size)"
        )
    return code


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluates each run's checkpoint with the named metrics and appends the result to its
    ``metrics.jsonl``. Every run, checkpoint and metric name is read before any evaluates, so
    a typo in the last costs nothing; where none of a run's metrics could be computed, one line
    says why and nothing is appended."""

    from fedgan.evaluation.metrics import parse_metric_list
    from fedgan.rundir import dumps
    from fedgan.runs import make_evaluator

    runs = []
    for run in args.run:
        rd, cfg, ckpt = _load_run(run, args.overrides, args.checkpoint)
        runs.append(
            (rd, cfg, ckpt, parse_metric_list(args.metrics or cfg.eval.metrics, "--metrics"))
        )
    for rd, cfg, ckpt, names in runs:
        evaluator = make_evaluator(cfg, rd.samples)
        result = evaluator.metrics(int(ckpt["round"]), ckpt["state"], names)
        if not result and evaluator.skipped:  # nothing to record: say why, write nothing
            why = "; ".join(f"{name}: {reason}" for name, reason in evaluator.skipped.items())
            where = f" for {rd.path}" if len(runs) > 1 else ""
            raise ValueError(f"no metric computed{where} ({why})")
        record = {
            "round": int(ckpt["round"]),
            "mode": "evaluate",
            "checkpoint": str(rd.checkpoint_path(args.checkpoint)),
            "eval": result,
            "skipped": evaluator.skipped,
        }
        rd.append_metrics(record)
        print(dumps({"run": str(rd.path), **record}, indent=2) if len(runs) > 1
              else dumps(record, indent=2))  # fmt: skip
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Writes synthetic images (PNG + MedMNIST-layout .npz) from a run's generator."""
    from pathlib import Path

    from fedgan.runs.apply import check_out_folder, check_trained, export_samples

    _, cfg, ckpt = _load_run(args.run, [], args.checkpoint)
    check_trained(ckpt)
    check_out_folder(Path(args.out), args.force)
    counts = export_samples(
        cfg, ckpt["state"], args.n, Path(args.out), label=args.label, seed=args.seed
    )
    classes = {k: v for k, v in counts.items() if str(k) != "-1"}
    per_class = f" ({', '.join(f'class {k}: {v}' for k, v in classes.items())})" if classes else ""
    print(f"fedgan: wrote {sum(counts.values())} images{per_class} and synthetic.npz to {args.out}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Membership-inference attacks against a run's released networks; writes audit.json."""
    from fedgan.rundir import atomic_write_text, dumps
    from fedgan.runs.apply import check_trained
    from fedgan.runs.audit import audit_run, audit_table

    if args.max_images < 20 or args.num_generated < 20:
        raise ValueError("--max-images and --num-generated must be at least 20")
    rd, cfg, ckpt = _load_run(args.run, args.overrides, args.checkpoint)
    check_trained(ckpt)
    result = audit_run(cfg, ckpt["state"], rd.read_metrics(), max_images=args.max_images,
                       num_generated=args.num_generated, nonmembers=args.nonmembers)  # fmt: skip
    result["round"] = int(ckpt["round"])
    atomic_write_text(rd.path / "audit.json", dumps(result, indent=2) + "\n")
    print(audit_table(result))
    print(f"fedgan: audit of round {result['round']} written to {rd.path / 'audit.json'}")
    return 0


def cmd_data_describe(args: argparse.Namespace) -> int:
    """Per hospital: images, class histogram and intensity statistics; pictures of the split."""
    from pathlib import Path

    from fedgan.report.describe import describe, format_table

    cfg = _resolve(args)
    out = Path(args.out) if args.out else cfg.run_dir.with_name(cfg.run_dir.name + "-data")
    rows = describe(cfg, out)
    print(
        f"{cfg.data.source} data, {cfg.data.partition} partition over "
        f"{cfg.federation.num_hospitals} hospitals (images in [0, 1] after preprocessing)"
    )
    print(format_table(rows))
    from fedgan.rundir import atomic_write_text, dumps

    atomic_write_text(out / "describe.json", dumps(rows, indent=2))
    print(f"fedgan: wrote {out / 'partition.png'}, {out / 'samples.png'}, {out / 'describe.json'}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """A hospital's data folder or ``.npz``, checked as its SuperNode will read it."""
    from fedgan.data import check_site_data

    print(f"fedgan: {check_site_data(args.path, args.format or '')}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Centralized baseline and federated run(s) from one config, compared in one report."""
    from pathlib import Path

    from fedgan.studies import (
        dump_study_configs,
        load_study,
        parse_seeds,
        run_seeds,
        run_study,
        seed_folder,
        study_from_args,
    )

    if args.study:
        if args.config or args.variants:
            raise ValueError("--study is a whole plan: give --set, but not --config or --variant")
        study = load_study(args.study, args.overrides)
        if args.arms is not None:
            study = study.only([n.strip() for n in args.arms.split(",") if n.strip()])
        if args.no_centralized:
            study = study.without_centralized()
    else:
        if args.arms is not None:
            raise ValueError("--arms picks arms of a --study plan; with --config, give --variant")
        study = study_from_args(
            args.config, args.overrides, args.variants, centralized=not args.no_centralized
        )
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    if seeds is not None and any(o.split("=", 1)[0].strip() == "run.seed" for o in args.overrides):
        raise ValueError("--seeds sets run.seed for every arm: drop --set run.seed")
    if seeds is not None:
        study.with_seed(seeds[0])  # an arm with its own seed: refused before anything prints
    base = resolve(load_config(study.config, list(study.overrides)))
    out = Path(args.out) if args.out else Path(base.run.output_dir) / study.name
    if args.dry_run:
        for s in seeds or ():
            print(f"# ===== seed {s}: {seed_folder(out, s)}")
            print(dump_study_configs(study.with_seed(s), seed_folder(out, s)), end="")
        if seeds is None:
            print(dump_study_configs(study, out), end="")
        return 0
    over = f" over seeds {', '.join(map(str, seeds))}" if seeds else ""
    print(f"fedgan: comparing {', '.join(a.name for a in study.arms)}{over} -> {out.resolve()}")
    for line in plan_advice(study, out):
        print(f"fedgan: {line}", flush=True)
    log = lambda line: print(line, flush=True)  # noqa: E731
    if seeds is not None:
        result = run_seeds(study, seeds, out, log=log)
    else:
        result = run_study(study, out, log=log)
    print(f"fedgan: done in {result['wall_seconds']:.0f}s; report in {out / 'report.md'}")
    return 0


def cmd_enhance(args: argparse.Namespace) -> int:
    """Applies a trained image-to-image generator to new images (PNG/JPEG/TIFF, DICOM, NIfTI
    slices) and writes one PNG per image or slice."""
    from pathlib import Path

    from fedgan.runs.apply import check_out_folder, check_trained, enhance_files

    _, cfg, ckpt = _load_run(args.run, [], args.checkpoint)
    check_trained(ckpt)
    check_out_folder(Path(args.out), args.force)
    written = enhance_files(cfg, ckpt["state"], Path(args.input), Path(args.out),
                            native=args.native,
                            mask=Path(args.mask) if args.mask else None)  # fmt: skip
    print(f"fedgan: wrote {len(written)} image(s) to {args.out}")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    """Scores new images with a trained anomaly detector: one heat-map overlay PNG per image or
    slice, and ``scores.csv``."""
    from dataclasses import replace
    from pathlib import Path

    from fedgan.evaluation.anomaly import load_stats, stats_path
    from fedgan.rundir import RunDir
    from fedgan.runs.apply import check_out_folder, check_trained, detect_files

    chosen = args.checkpoint
    best = RunDir(args.run).read_best() if chosen in (None, "best") else None
    if best is not None:  # the round the run's eval.select chose on validation images
        chosen = str(RunDir(args.run).checkpoints / best["checkpoint"])
    rd, cfg, ckpt = _load_run(args.run, [], chosen)
    check_trained(ckpt)
    check_out_folder(Path(args.out), args.force)
    # the pixel threshold and image score the run's evaluation chose on validation images,
    # for its checkpoint (by round: a later `fedgan evaluate` of an earlier round never
    # stands for this one)
    records = sorted(rd.read_metrics(), key=lambda r: int(r["round"]))
    evals = [r.get("eval", {}) for r in records if r["round"] <= ckpt["round"]]
    threshold = [e["anomaly_threshold"] for e in evals if "anomaly_threshold" in e]
    rule = [int(e["anomaly_score_rule"]) for e in evals if "anomaly_score_rule" in e]
    # the map those were chosen for: a `fedgan evaluate --set task.map_shift=K` measures (and
    # keeps healthy statistics for) another map than the run's config draws
    shift = [int(e["anomaly_map_shift"]) for e in evals if "anomaly_map_shift" in e]
    if shift and shift[-1] != cfg.task.map_shift:
        cfg = replace(cfg, task=replace(cfg.task, map_shift=shift[-1]))
    stats_file = stats_path(rd.samples, int(ckpt["round"]))
    stats = load_stats(stats_file) if stats_file.is_file() else None
    rows = detect_files(cfg, ckpt["state"], Path(args.input), Path(args.out),
                        threshold=threshold[-1] if threshold else None,
                        rule=rule[-1] if rule else 0, stats=stats)  # fmt: skip
    why = f", chosen by {best['key']} = {best['value']:.3f}" if best is not None else ""
    window = ckpt.get("meta", {}).get("average_of_rounds") or []
    if len(window) > 1:  # eval.average_rounds: the round released its last rounds' mean
        why = f" (the mean of rounds {window[0]}-{window[-1]}'s weights){why}"
    print(f"fedgan: scored {len(rows)} image(s) with round {ckpt['round']}'s detector{why}; "
          f"overlays and scores.csv in {args.out}")  # fmt: skip
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(dump_yaml(_resolve(args)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedgan", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_ in (
        ("simulate", cmd_simulate, "federated training of N simulated hospitals (Flower)"),
        ("centralized", cmd_centralized, "the same model and loop on the pooled data"),
        (
            "pretrain",
            cmd_pretrain,
            "train on public data (no DP) for a warm start: model.init_from=<its run>",
        ),
        ("config", cmd_config, "print the resolved config"),
    ):
        p = sub.add_parser(name, help=help_)
        _config_args(p)
        p.set_defaults(func=func)
    p = sub.add_parser("enhance", help="apply a trained image-to-image generator to images")
    p.add_argument("--run", required=True,
                   help="a run of task enhance/super-resolution/translate/inpaint")  # fmt: skip
    p.add_argument("--input", required=True, help="an image, DICOM or NIfTI file, or a folder")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--native", action="store_true",
                   help="apply the generator at each image's own size instead of resizing it "
                        "to the model's input size")  # fmt: skip
    p.add_argument(
        "--mask",
        help="inpaint runs: an image of the hole (non-zero = missing), applied to every input; "
        "default: each image's zero pixels",
    )
    p.add_argument("--force", action="store_true", help="write into a folder that holds files")
    p.set_defaults(func=cmd_enhance)
    p = sub.add_parser("detect", help="score images with a trained anomaly detector")
    p.add_argument("--run", required=True, help="a run of task anomaly")
    p.add_argument("--input", required=True, help="an image, DICOM or NIfTI file, or a folder")
    p.add_argument("--out", required=True, help="output folder for the overlays and scores.csv")
    p.add_argument("--checkpoint", help="a round number, latest, best, or a checkpoint file "
                   "(default: best, the round the run's eval.select chose on validation images, "
                   "else the latest)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="write into a folder that holds files")
    p.set_defaults(func=cmd_detect)
    p = sub.add_parser("compare", help="centralized vs federated (and variants), one report")
    _config_args(p)
    p.add_argument(
        "--variant",
        dest="variants",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="one more federated arm, e.g. iid:data.partition=iid (repeatable); "
        "NAME@centralized:... for a centralized one",
    )
    p.add_argument("--study", help="a study plan (simulations/*.yaml) instead of --config")
    p.add_argument(
        "--no-centralized",
        action="store_true",
        help="skip the pooled baseline (with --study: the plan's centralized arms)",
    )
    p.add_argument("--arms", help="with --study: only these arms of the plan (comma-separated)")
    p.add_argument("--seeds", help="the whole comparison once per seed, e.g. 0-4 or 0,1,2: each "
                   "in OUT/seed-<s>, and a report of every arm across the seeds and of each "
                   "arm's gap to its reference, seed by seed")  # fmt: skip
    p.add_argument("--out", help="the comparison's folder (default: <run.output_dir>/<study>)")
    p.set_defaults(func=cmd_compare)
    data = sub.add_parser("data", help="inspect data sets and partitions").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("describe", help="per hospital: counts, classes, statistics, pictures")
    _config_args(p)
    p.add_argument("--out", help="where the pictures go (default: <run dir>-data)")
    p.set_defaults(func=cmd_data_describe)
    p = data.add_parser("check", help="a hospital's data-path, read as its SuperNode will read it")
    p.add_argument("--path", required=True, help="the site's image folder or MedMNIST .npz")
    p.add_argument("--format", choices=["folder", "dicom", "nifti"],
                   help="the files' format (default: detected from the files)")  # fmt: skip
    p.set_defaults(func=cmd_data_check)
    p = sub.add_parser("evaluate", help="evaluate a run's checkpoint with registered metrics")
    p.add_argument("--run", required=True, nargs="+",
                   help="the run directory, e.g. runs/default, or several (a study's arms: "
                        "OUT/seed-*/*/)")  # fmt: skip
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--metrics", help="comma-separated metrics (default: the run's eval.metrics)")
    _overrides_arg(p, "override a key of the run's config, e.g. eval.inception_weights=PATH")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("audit", help="membership-inference attacks on a run's networks")
    p.add_argument("--run", required=True, help="the run directory, e.g. runs/default")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--max-images", type=int, default=1000,
                   help="members (and non-members) attacked, at most (default 1000)")  # fmt: skip
    p.add_argument("--num-generated", type=int, default=2000,
                   help="images drawn from the generator for the black-box attacks")  # fmt: skip
    p.add_argument("--nonmembers", choices=["auto", "eval", "val"], default="auto",
                   help="held-out images: a MedMNIST validation split (val, auto's choice for "
                        "MedMNIST) or the run's evaluation split (eval)")  # fmt: skip
    _overrides_arg(p, "override a key of the run's config, e.g. data.path=PATH")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("sample", help="write synthetic images from a run's generator")
    p.add_argument("--run", required=True, help="the run directory, e.g. runs/default")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--label", type=int, help="class of every image (conditional families)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a folder that holds files")
    p.set_defaults(func=cmd_sample)
    return parser


def _one_line(err: Exception) -> str:
    """The error as one line; a system error (a path that is a file, no permission, a full
    disk) names the path, what the system said, and what to check."""
    if isinstance(err, OSError) and err.errno is not None and err.strerror:
        where = f"{err.filename}: " if err.filename is not None else ""
        return (
            f"{where}{err.strerror} (errno {err.errno}); check that the path is right, that "
            "its folder exists and is writable, and that the disk has space"
        )
    return " ".join(str(err).split())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt as stop:  # SIGINT, or SIGTERM during a simulation
        name = str(stop) or "SIGINT"
        print(
            f"fedgan: stopped by {name}; every process this run started was stopped, and its "
            "completed rounds are kept: continue with --set run.resume=true",
            file=sys.stderr,
        )
        return 128 + int(getattr(stop, "signum", 2))
    except (ValueError, OSError) as err:  # OSError: fedgan's own (a message) or the system's
        print(f"fedgan: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # RunFailed and SuperLink start-up problems
        print(f"fedgan: run failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
