"""`fedgan compare`: study plans, arms, and a tiny real comparison (centralized + federated)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedgan.cli import main
from fedgan.rundir import RunDir
from fedgan.studies import Arm, load_study, parse_variant, run_study, study_from_args

REPO = Path(__file__).resolve().parent.parent


def test_variants_parse_and_bad_ones_are_named() -> None:
    arm = parse_variant("iid:data.partition=iid,federation.num_hospitals=3")
    assert arm == Arm("iid", "federated", ("data.partition=iid", "federation.num_hospitals=3"))
    assert parse_variant("pooled@centralized:train.lr=0.001").mode == "centralized"
    with pytest.raises(ValueError, match="NAME:key=value"):
        parse_variant("iid:data.partition")
    for changes_nothing in ("iid", "iid:", "pooled@centralized"):  # a forgotten ':' or setting
        with pytest.raises(ValueError, match="NAME:key=value"):
            parse_variant(changes_nothing)
    with pytest.raises(ValueError, match="mode must be one of"):
        parse_variant("x@sideways:train.lr=0.1")
    with pytest.raises(ValueError, match="evaluated the same way"):
        parse_variant("cheat:eval.metrics=domain_fd_1k")


@pytest.mark.parametrize(
    "plan", sorted((REPO / "simulations").glob("*.yaml")), ids=lambda p: p.stem
)
def test_shipped_study_plans_resolve(plan: Path, tmp_path: Path) -> None:
    study = load_study(plan, ["data.path=/nowhere/pneumoniamnist.npz"])
    assert any(a.mode == "centralized" for a in study.arms)
    assert study.expected.keys() >= {"cpu", "gpu"}
    configs = [study.arm_config(a, tmp_path) for a in study.arms]  # every arm validates
    assert len({c.eval for c in configs}) == 1
    assert {c.run.seed for c in configs} == {configs[0].run.seed}


def test_no_centralized_and_arms_pick_a_part_of_a_plan(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "arms: {pooled: {mode: centralized}, fed: {}, dp: {set: {privacy.mode: dp-sgd}}}\n"
    )
    study = load_study(plan)
    assert [a.name for a in study.without_centralized().arms] == ["fed", "dp"]
    assert [a.name for a in study.arms] == ["pooled", "fed", "dp"]  # the plan itself is untouched
    part = study.only(["dp", "pooled"])  # the plan's order, whatever the order asked
    assert [a.name for a in part.arms] == ["pooled", "dp"]
    assert [a.name for a in part.without_centralized().arms] == ["dp"]
    with pytest.raises(ValueError, match=r"has no arm 'fedd'; name some of its arms: pooled, fed"):
        study.only(["fed", "fedd"])
    with pytest.raises(ValueError, match="names none"):
        study.only([])
    only = tmp_path / "only.yaml"
    only.write_text("arms: {pooled: {mode: centralized}}\n")
    with pytest.raises(ValueError, match="only centralized arms: drop --no-centralized"):
        load_study(only).without_centralized()


def test_an_arm_folder_trained_otherwise_is_refused_and_locators_are_not_settings(
    tmp_path: Path,
) -> None:
    from fedgan.config import dump_yaml
    from fedgan.rundir import RunDir
    from fedgan.studies import check_earlier_arm

    plan = tmp_path / "plan.yaml"
    plan.write_text("arms: {dp: {set: {privacy.mode: dp-sgd, privacy.target_epsilon: 10}}}\n")
    study = load_study(plan)
    cfg = study.arm_config(study.arms[0], tmp_path / "out")
    check_earlier_arm(cfg)  # nothing there yet
    RunDir(cfg.run_dir).write_config(dump_yaml(cfg))
    check_earlier_arm(cfg)  # the same arm
    for moved in ("eval.cache_dir=/elsewhere", "data.path=/data/moved", "train.device=cpu"):
        later = load_study(plan, [moved])
        check_earlier_arm(later.arm_config(later.arms[0], tmp_path / "out"))
    for changed, says in (
        ("run.seed=1", "run.seed 0 -> 1"),  # the arm's own settings win over the study's
        ("federation.num_rounds=40", "federation.num_rounds 10 -> 40"),
    ):
        later = load_study(plan, [changed])
        with pytest.raises(ValueError, match=f"{says}.*another --out"):
            check_earlier_arm(later.arm_config(later.arms[0], tmp_path / "out"))


def test_study_plan_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="simulations"):
        load_study(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms: {a: {}}\nrounds: 3\n")
    with pytest.raises(ValueError, match="unknown keys.*rounds"):
        load_study(bad)
    twice = tmp_path / "twice.yaml"
    twice.write_text("arms: {a: {set: {train.lr: -1}}}\n")
    with pytest.raises(ValueError, match="train.lr"):
        load_study(twice).arm_config(load_study(twice).arms[0], tmp_path)


@pytest.mark.slow
def test_tiny_comparison_report_holds_both_arms_with_matching_budgets(
    tmp_path: Path, toy_overrides: list[str]
) -> None:
    toy = [
        *toy_overrides,
        "data.num_images=96",
        "federation.num_hospitals=2",
        "eval.final_metrics=memorization_1k",
    ]
    study = study_from_args(
        None, toy, ["dp:privacy.mode=dp-sgd,privacy.target_epsilon=20"], centralized=True
    )
    out = tmp_path / "cmp"
    run_study(study, out, log=lambda _: None)
    comparison = json.loads((out / "comparison.json").read_text())
    arms = comparison["arms"]
    assert list(arms) == ["centralized", "federated", "dp"]
    assert arms["centralized"]["mode"] == "centralized" and arms["federated"]["mode"] == "federated"
    # The same evaluated metrics for every arm, and the same training budget.
    metric_sets = {frozenset(a["final"]) for a in arms.values()}
    assert len(metric_sets) == 1 and "domain_fd_1k" in comparison["metrics"]
    assert "memorization_nn_ratio" in comparison["metrics"]
    assert len({a["examples_seen"] for a in arms.values() if a["privacy"] == "none"}) == 1
    assert arms["federated"]["same_examples_as_baseline"] is True
    assert arms["federated"]["bytes_communicated"] > 0 == arms["centralized"]["bytes_communicated"]
    # Privacy: each DP hospital's epsilon is reported and within its budget.
    eps = arms["dp"]["epsilon_per_hospital"]
    assert len(eps) == 2 and all(0 < e <= 20 for e in eps.values())
    assert arms["federated"]["max_epsilon"] is None
    # Curves per arm against examples seen; everything traceable to a run directory.
    for name, arm in arms.items():
        curve = arm["curves"]["domain_fd_1k"]
        assert curve["round"] == [1, 2] and curve["examples_seen"][0] > 0
        assert (out / arm["config"]).is_file() and (out / arm["samples"]).is_file()
        assert f"**{name}**" in (out / "report.md").read_text()
    report = (out / "report.md").read_text()
    assert "| domain_fd_1k ↓ |" in report and "max ε per hospital" in report
    assert f"{arms['federated']['final']['domain_fd_1k']:.4g} (" in report  # final (recent)
    assert "## ε per hospital" in report and "| hospital | dp |" in report
    assert "<table>" in (out / "report.html").read_text()
    for picture in ("curves.png", "curves_steps.png", "curves_wall.png", "samples.png"):
        assert (out / picture).stat().st_size > 5000
    # The compute-matched axis: a federated round counts one hospital's steps (they train
    # side by side), the pooled baseline every step it took.
    cfg_steps = int(next(o for o in toy if o.startswith("train.local_steps=")).split("=")[1])
    fed_steps = arms["federated"]["curves"]["domain_fd_1k"]["generator_steps"]
    pooled_steps = arms["centralized"]["curves"]["domain_fd_1k"]["generator_steps"]
    assert fed_steps == [cfg_steps, 2 * cfg_steps]
    assert pooled_steps == [2 * cfg_steps, 4 * cfg_steps]  # two hospitals' worth a round
    assert arms["federated"]["generator_steps"] == 2 * cfg_steps
    assert arms["centralized"]["generator_steps"] == 4 * cfg_steps
    assert f"| generator steps in sequence | {4 * cfg_steps} | {2 * cfg_steps} |" in report
    assert (f"Generator steps in sequence: federated {2 * cfg_steps}" in report
            and f"against the centralized baseline's {4 * cfg_steps}." in report)  # fmt: skip
    fd = arms["federated"]["curves"]["domain_fd_1k"]["value"]
    assert arms["federated"]["recent"]["domain_fd_1k"] == pytest.approx(sum(fd) / 2)
    wall = arms["federated"]["curves"]["domain_fd_1k"]["wall_seconds"]
    assert 0 < wall[0] < wall[1]

    # Running the study again reuses every finished arm and rewrites the same table.
    messages: list[str] = []
    again = run_study(study, out, log=messages.append)
    assert sum("finished earlier" in m for m in messages) == 3
    assert again["arms"]["dp"]["final"] == arms["dp"]["final"]
    # Where things are on this machine is no other arm: a new cache folder still reuses them.
    moved = study_from_args(
        None,
        [*toy, f"eval.cache_dir={tmp_path / 'cache'}"],
        ["dp:privacy.mode=dp-sgd,privacy.target_epsilon=20"],
        centralized=True,
    )
    messages.clear()
    run_study(moved, out, log=messages.append)
    assert sum("finished earlier" in m for m in messages) == 3
    # A metric computed after training on the last round's checkpoint (the standard FID of a
    # study run with domain metrics) joins that arm's row when the study is collected again;
    # one of an earlier round does not, nor does a later reading of a metric training recorded.
    dp_run, pooled_run = out / arms["dp"]["run_dir"], out / arms["centralized"]["run_dir"]
    assert main(["evaluate", "--run", str(dp_run), str(pooled_run),
                 "--metrics", "domain_kd_2k"]) == 0  # fmt: skip
    assert main(["evaluate", "--run", str(dp_run), "--checkpoint", "1",
                 "--metrics", "domain_fd_2k"]) == 0  # fmt: skip
    RunDir(dp_run).append_metrics(
        {"round": 2, "mode": "evaluate", "eval": {"domain_fd_1k": 999.0}, "skipped": {}}
    )
    later = [r for r in RunDir(dp_run).read_metrics() if r.get("mode") == "evaluate"]
    # As if training had skipped both metrics (no weights on the training machine): the one
    # computed later on the last round leaves "not computed", the earlier round's stays.
    summary_path = RunDir(dp_run).summary_path
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    summary["metrics_skipped"] = {"domain_kd_2k": "no weights", "domain_fd_2k": "no weights"}
    summary_path.write_text(json.dumps(summary), encoding="utf-8")
    messages.clear()
    after = run_study(moved, out, log=messages.append)["arms"]
    assert sum("finished earlier" in m for m in messages) == 3
    assert after["dp"]["final"]["domain_kd_2k"] == later[0]["eval"]["domain_kd_2k"]
    assert after["dp"]["evaluated_after"] == ["domain_kd_2k", "domain_kd_2k_std"]
    assert "domain_fd_2k" not in after["dp"]["final"]
    assert after["dp"]["final"]["domain_fd_1k"] == arms["dp"]["final"]["domain_fd_1k"] != 999.0
    assert "domain_kd_2k" not in after["federated"]["final"]
    assert after["centralized"]["evaluated_after"] == ["domain_kd_2k", "domain_kd_2k_std"]
    assert after["dp"]["curves"].keys() == arms["dp"]["curves"].keys()
    assert after["dp"]["not_computed"] == {"domain_fd_2k": "no weights"}
    report = (out / "report.md").read_text()
    assert "| domain_kd_2k ↓ |" in report
    assert "by `fedgan evaluate` on dp's last-round checkpoint: domain_kd_2k" in report
    assert "Not computed for dp: domain_fd_2k (no weights)" in report
    # Another seed into the same folder is refused before anything trains: its arms would be
    # reported as the earlier seed's.
    seed_1 = study_from_args(
        None,
        [*toy, "run.seed=1"],
        ["dp:privacy.mode=dp-sgd,privacy.target_epsilon=20"],
        centralized=True,
    )
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file())
    with pytest.raises(ValueError, match=r"'centralized': .* other settings \(run.seed 0 -> 1\)"):
        run_study(seed_1, out, log=lambda _: None)
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()) == before


def test_real_data_values_are_a_line_on_their_metrics_panel() -> None:
    from fedgan.report.plots import comparison_panels

    def curve(*values: float) -> dict[str, list[float]]:
        return {"value": list(values), "examples_seen": [1.0, 2.0][: len(values)]}

    curves = {
        "a": {"ms_ssim_diversity": curve(0.8, 0.7), "ms_ssim_diversity_real": curve(0.5, 0.5),
              "domain_fd_1k": curve(3.0, 2.0), "memorization_nn_ratio": curve(1.1)},
        "b": {"ms_ssim_diversity": curve(0.6, 0.6), "ms_ssim_diversity_real": curve(0.5, 0.7)},
    }  # fmt: skip
    panels, lines = comparison_panels(curves, {"ms_ssim_diversity_real"})
    assert panels == ["domain_fd_1k", "ms_ssim_diversity"]  # no panel of its own, no final-only
    assert lines == {"ms_ssim_diversity": 0.5}
    panels, lines = comparison_panels(curves)
    assert "ms_ssim_diversity_real" in panels and not lines


def test_generator_steps_of_runs_recorded_without_them_come_from_their_examples() -> None:
    from fedgan.report.compare import _curves

    old_federated = [{"round": r, "aggregate": {"hospitals": 5, "examples_seen": 5 * 32 * 20},
                      "eval": {"domain_fd_1k": 3.0}} for r in (1, 2)]  # fmt: skip
    old_pooled = [{"round": r, "aggregate": {"hospitals": 0, "examples_seen": 32 * 100},
                   "eval": {"domain_fd_1k": 3.0}} for r in (1, 2)]  # fmt: skip
    assert _curves(old_federated, 32)["domain_fd_1k"]["generator_steps"] == [20, 40]
    assert _curves(old_pooled, 32)["domain_fd_1k"]["generator_steps"] == [100, 200]
    new = [{"round": 1, "aggregate": {"hospitals": 5, "examples_seen": 999,
                                      "generator_steps": 7}, "eval": {"x": 1.0}}]  # fmt: skip
    assert _curves(new, 32)["x"]["generator_steps"] == [7]  # recorded steps win


def test_the_report_shows_the_round_chosen_on_validation_beside_the_last() -> None:
    from fedgan.report.compare import _selected_table

    chosen_eval = {"anomaly_auc": 0.88, "anomaly_dice": 0.7, "anomaly_val_auc": 0.9,
                   "anomaly_threshold": 0.1}  # fmt: skip
    arms = {
        "pooled": {"selected": None, "final": {"anomaly_auc": 0.85}, "rounds": 10},
        "private": {"rounds": 10, "final": {"anomaly_auc": 0.58, "anomaly_dice": 0.6},
                    "selected": {"checkpoint": "round_0002.pt", "round": 2,
                                 "key": "anomaly_val_auc", "value": 0.9, "eval": chosen_eval}},
    }  # fmt: skip
    lines = _selected_table(arms)
    head = next(line for line in lines if line.startswith("| arm |"))
    columns = [c.strip() for c in head.strip("|").split("|")]
    assert columns[:3] == ["arm", "round chosen", "chosen by"]
    assert "anomaly_auc" in columns and "anomaly_dice" in columns
    # the choosing figure and reference values (a threshold) are not test figures
    assert "anomaly_val_auc" not in columns and "anomaly_threshold" not in columns
    assert "anomaly_iou" not in columns  # no arm has it (no masks): no empty column
    row = next(line for line in lines if line.startswith("| private |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2 of 10" and cells[2] == "anomaly_val_auc = 0.9"
    assert cells[columns.index("anomaly_auc")] == "0.88 (0.58)"  # chosen (last)
    assert not any(line.startswith("| pooled |") for line in lines)
    assert _selected_table({"pooled": arms["pooled"]}) == []


def test_the_report_names_each_setting_once_with_the_value_that_ran() -> None:
    from fedgan.config import load_config
    from fedgan.report.compare import effective_settings

    # a plan's set: (seed 0), then the command line's --set (seed 4)
    given = ["model.family=dcgan", "run.seed=0", "data.partition=iid", "run.seed=4"]
    shown = effective_settings(given)
    assert shown == ["model.family=dcgan", "run.seed=4", "data.partition=iid"]
    assert load_config(None, given).run.seed == 4  # what the loader ran is what is shown
    assert effective_settings([]) == []


def test_seeds_parse_and_every_arm_follows_them(tmp_path: Path) -> None:
    from fedgan.studies import parse_seeds, seed_folder

    assert parse_seeds("0-2,7") == (0, 1, 2, 7)
    assert parse_seeds(" 4 ") == (4,)
    for bad in ("", "a", "2-1", "-1", "0,0", "1-3,2"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "set: {run.seed: 0}\n"
        "arms: {pooled: {mode: centralized}, fed: {}, dp: {against: fed, set: {privacy.mode: "
        "dp-sgd, privacy.target_epsilon: 10}}}\n"
    )
    study = load_study(plan)
    assert study.references() == {"fed": "pooled", "dp": "fed"}  # a federated arm: the pooled
    # the seed comes after the plan's and the arms' settings; each seed in its own folder
    for s in (3, 5):
        configs = [study.with_seed(s).arm_config(a, seed_folder(tmp_path, s)) for a in study.arms]
        assert {c.run.seed for c in configs} == {s}
        assert {c.run_dir.parent for c in configs} == {tmp_path / f"seed-{s}"}
    assert study.arm_config(study.arms[0], tmp_path).run.seed == 0  # the plan itself untouched
    # a part of the plan keeps the references it still runs
    assert study.only(["dp"]).references() == {}
    assert study.without_centralized().references() == {"dp": "fed"}
    own = tmp_path / "own.yaml"
    own.write_text("arms: {a: {set: {run.seed: 3}}}\n")
    with pytest.raises(ValueError, match="arm 'a' of study 'own' sets its own run.seed"):
        load_study(own).with_seed(1)
    for against, says in (("me", "'me' is measured against 'me'"), ("x", "against 'x'")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"arms: {{a: {{}}, me: {{against: {against}}}}}\n")
        with pytest.raises(ValueError, match=says):
            load_study(bad)


def test_a_gap_is_read_seed_by_seed_with_the_metric_s_direction() -> None:
    from fedgan.evaluation.metrics import HIGHER, LOWER
    from fedgan.report.compare import gap

    # FD (lower is better) of a private arm against its non-private twin on three seeds
    g = gap([1.2, 1.5, None, 1.8], [3.0, 0.5, 2.0, 1.8], LOWER)
    assert g["seeds"] == 3  # the seed without the arm's figure is left out of both means
    assert g["arm_mean"] == pytest.approx(1.5) and g["reference_mean"] == pytest.approx(5.3 / 3)
    assert g["ratio_of_means"] == pytest.approx(1.5 / (5.3 / 3))
    assert g["ratios"] == pytest.approx([0.4, 3.0, 1.0])
    assert g["level_or_ahead"] == 2  # 1.2 < 3.0 and the tie 1.8 = 1.8; not 1.5 > 0.5
    up = gap([0.7, 0.9], [0.8, 0.8], HIGHER)
    assert up["level_or_ahead"] == 1 and up["ratio_of_means"] == pytest.approx(1.0)
    zero = gap([0.01, 0.0], [0.0, 0.0], LOWER)  # a ratio to nothing means nothing
    assert zero["ratios"] == [None, None] and zero["ratio_of_means"] is None
    assert zero["level_or_ahead"] == 1
    assert gap([None], [1.0], LOWER)["ratio_of_means"] is None


def _fake_arm(fd: float, recall: float, wall: float, against: str | None) -> dict:
    return {
        "mode": "federated", "partition": "iid", "privacy": "none", "against": against,
        "final": {"domain_fd_1k": fd, "domain_recall": recall},
        "recent": {"domain_fd_1k": fd + 0.1}, "wall_seconds": wall, "max_epsilon": None,
        "samples": "x/samples/round_0002.png", "audit": None,
    }  # fmt: skip


def test_the_summary_over_seeds_matches_an_independent_reading(tmp_path: Path) -> None:
    import statistics

    from fedgan.report.compare import gaps
    from fedgan.report.seeds import spread, summarize, write_seeds_report

    assert spread([2.0, None, 4.0, 9.0])["sd"] == pytest.approx(statistics.stdev([2, 4, 9]))
    assert spread([1.0])["sd"] is None and spread([None])["mean"] is None
    fd = {0: (1.2, 3.0), 1: (1.5, 0.5), 2: (1.8, 1.8)}  # seed: (dp, no-dp)
    comparisons = {
        s: {"study": "s", "metrics": ["domain_fd_1k", "domain_recall"],
            "arms": {"no-dp": _fake_arm(ref, 0.9, 100.0, None),
                     "dp": _fake_arm(arm, 0.8, 200.0 + s, "no-dp")}}
        for s, (arm, ref) in fd.items()
    }  # fmt: skip
    for c in comparisons.values():  # what collect adds to each comparison
        c["gaps"] = gaps([c["arms"]], c["metrics"])
    assert comparisons[1]["gaps"]["dp"]["metrics"]["domain_fd_1k"]["final"]["ratios"] == [3.0]
    summary = summarize(comparisons, {s: f"seed-{s}" for s in comparisons})
    fd_dp = summary["arms"]["dp"]["final"]["domain_fd_1k"]
    assert fd_dp["mean"] == pytest.approx(statistics.mean([1.2, 1.5, 1.8]))
    assert fd_dp["sd"] == pytest.approx(statistics.stdev([1.2, 1.5, 1.8]))
    assert list(summary["gaps"]) == ["dp"] and summary["gaps"]["dp"]["against"] == "no-dp"
    row = summary["gaps"]["dp"]["metrics"]
    assert row["domain_fd_1k"]["final"]["ratio_of_means"] == pytest.approx(1.5 / (5.3 / 3))
    assert row["domain_fd_1k"]["recent"]["ratio_of_means"] == pytest.approx(1.6 / (5.6 / 3))
    assert row["domain_recall"]["final"]["level_or_ahead"] == 0
    assert row["wall_seconds"]["final"]["ratio_of_means"] == pytest.approx(201 / 100)
    assert summary["arms"]["dp"]["samples"][2] == "seed-2/x/samples/round_0002.png"
    write_seeds_report(summary, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| | dp / no-dp |" in report
    assert "| domain_fd_1k ↓ | 0.85x (0.86x); 0.40-3.00x; 2/3 |" in report
    assert "| wall time (s) ↓ | 2.01x; 2.00-2.02x; 0/3 |" in report
    assert '<a href="seed-1/report.md">' in (tmp_path / "report.html").read_text()
    comparisons[2]["arms"].pop("dp")
    with pytest.raises(ValueError, match="seed 2's comparison holds other arms"):
        summarize(comparisons, {s: f"seed-{s}" for s in comparisons})


@pytest.mark.slow
def test_a_study_over_two_seeds_trains_each_and_reports_both(
    tmp_path: Path, toy_overrides: list[str]
) -> None:
    from fedgan.config import load_config
    from fedgan.studies import run_seeds

    toy = [*toy_overrides, "data.num_images=64", "federation.num_hospitals=2",
           "federation.num_rounds=1", "eval.final_metrics="]  # fmt: skip
    study = study_from_args(None, toy, [], centralized=True)
    out = tmp_path / "cmp"
    messages: list[str] = []
    summary = run_seeds(study, [0, 1], out, log=messages.append)
    assert json.loads((out / "seeds.json").read_text())["seeds"] == [0, 1]
    fds = []
    for s in (0, 1):
        comparison = json.loads((out / f"seed-{s}" / "comparison.json").read_text())
        for name, arm in comparison["arms"].items():
            assert load_config(out / f"seed-{s}" / arm["config"]).run.seed == s
            across = summary["arms"][name]["final"]["domain_fd_1k"]["values"]
            assert across[s] == arm["final"]["domain_fd_1k"]
        fds.append(comparison["arms"]["federated"]["final"]["domain_fd_1k"])
        assert comparison["gaps"]["federated"]["against"] == "centralized"
    assert fds[0] != fds[1]  # two seeds, two draws
    gap = summary["gaps"]["federated"]["metrics"]["domain_fd_1k"]["final"]
    assert gap["seeds"] == 2 and len(gap["ratios"]) == 2
    report = (out / "report.md").read_text()
    assert "over seeds 0, 1" in report and "| | federated / centralized |" in report
    assert "| partition | – | iid |" in report  # the pooled arm has no partition
    assert (out / "seed-1" / "samples.png").is_file() and (out / "report.html").is_file()
    # a second call trains nothing: every arm of every seed is reused
    messages.clear()
    again = run_seeds(study, [0, 1], out, log=messages.append)
    assert sum("finished earlier" in m for m in messages) == 4
    assert again["gaps"] == summary["gaps"]
