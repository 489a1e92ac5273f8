"""End to end: `fedgan simulate` through a real SuperLink and Flower's simulation engine."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedgan.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

TOY = [
    "data.image_size=16",
    "data.num_images=120",
    "model.base_channels=8",
    "model.latent_dim=16",
    "train.batch_size=8",
    "train.local_steps=2",
    "eval.grid_size=16",
]


def simulate(tmp_path: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "fedgan.cli", "simulate"]
    for o in (f"run.output_dir={tmp_path}", "run.name=e2e", *TOY, *overrides):
        args += ["--set", o]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def _tracked_digest() -> str:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout
    h = hashlib.sha256()
    for name in sorted(files.split()):
        p = REPO / name
        if p.is_file():
            h.update(name.encode() + p.read_bytes())
    return h.hexdigest()


def _superlinks_of(path: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-fa", "flower-superlink"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if str(path) in line]


def test_three_hospitals_two_rounds_then_resume(tmp_path: Path) -> None:
    before = _tracked_digest()
    res = simulate(tmp_path, "federation.num_hospitals=3", "federation.num_rounds=2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "round 2/2" in res.stdout and "results in" in res.stdout
    rd = RunDir(tmp_path / "e2e")
    records = rd.read_metrics()
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert set(r["hospitals"]) == {"hospital_0", "hospital_1", "hospital_2"}
        assert r["aggregate"]["num_examples"] == sum(
            h["num_examples"] for h in r["hospitals"].values()
        )
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    assert rd.load_checkpoint()["round"] == 2
    assert (rd.samples / "round_0002.png").stat().st_size > 0
    assert json.loads(rd.summary_path.read_text())["rounds"] == 2
    assert (rd.path / "config.yaml").exists()
    assert _tracked_digest() == before, "a simulation modified a tracked file"
    assert not _superlinks_of(tmp_path), "the SuperLink was left running"

    # The same name again is refused (nothing is overwritten) ...
    again = simulate(tmp_path, "federation.num_hospitals=3", "federation.num_rounds=2")
    assert again.returncode == 2 and "run.resume=true" in again.stderr
    # ... and resuming continues from the latest checkpoint, here keeping only the two
    # newest rounds' checkpoints (and round 0) while the evaluation process reads them.
    more = simulate(tmp_path, "federation.num_hospitals=3", "federation.num_rounds=5",
                    "run.resume=true", "run.keep_checkpoints=2")  # fmt: skip
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert [r["round"] for r in rd.read_metrics()] == [1, 2, 3, 4, 5]
    assert all("domain_fd_1k" in r["eval"] for r in rd.read_metrics())  # none lost
    kept = sorted(p.name for p in rd.checkpoints.glob("round_*.pt"))
    assert kept == ["round_0000.pt", "round_0004.pt", "round_0005.pt"]
    # Each hospital's optimizer continued across the resume (kept on its side of the disk):
    # 2 local steps a round, one discriminator step each, five rounds.
    last = rd.read_metrics()[-1]["hospitals"]
    assert {h["optimizer_steps"] for h in last.values()} == {5 * 2}


BROKEN_CLIENT = """
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg, context):
    raise RuntimeError("this hospital's training crashed")
"""


def test_failed_run_exits_non_zero(tmp_path: Path) -> None:
    # Bad input never reaches Flower: one line, exit 2, no run folder.
    res = simulate(
        tmp_path,
        "federation.num_hospitals=2",
        "federation.num_rounds=1",
        "data.source=medmnist",
        f"data.path={tmp_path / 'no-such.npz'}",
    )
    assert res.returncode == 2 and "no-such.npz" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "e2e").exists()
    # A run that fails inside Flower (every hospital's ClientApp crashes) ends as failed, says
    # where to look, and leaves no SuperLink behind.
    from fedgan.config import load_config
    from fedgan.experiment import resolve
    from fedgan.federated.launcher import RunFailed
    from fedgan.federated.simulation import simulate as run_simulation

    app = tmp_path / "broken_app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        (REPO / "pyproject.toml")
        .read_text()
        .replace('"fedgan.federated.client_app:app"', '"broken:app"')
    )
    (app / "broken.py").write_text(BROKEN_CLIENT)
    (app / "README.md").write_text((REPO / "README.md").read_text())
    cfg = resolve(
        load_config(
            None,
            [
                f"run.output_dir={tmp_path}",
                "run.name=broken",
                *TOY,
                "federation.num_hospitals=2",
                "federation.num_rounds=1",
            ],
        )
    )
    with pytest.raises(RunFailed, match="finished:failed") as failed:
        run_simulation(cfg, timeout=300, app=app)
    assert not _superlinks_of(tmp_path)
    # the one line carries the ServerApp's reason (Flower's status details) and the way on
    message = str(failed.value)
    assert "\n" not in message and "run.resume=true" in message, message
    assert (
        "(round 1: no hospital trained (2 x RuntimeError: this hospital's training crashed))"
        in message
    )


def test_dp_federation_skips_exhausted_hospitals_and_stops_when_all_are(tmp_path: Path) -> None:
    from fedgan.config import load_config
    from fedgan.data import hospital_dataset
    from fedgan.privacy import HospitalAccountant, plan_privacy

    dp = [
        "data.partition=dirichlet",
        "data.dirichlet_alpha=1.0",
        "data.num_images=400",
        "federation.num_hospitals=3",
        "federation.num_rounds=8",
        "train.local_steps=4",
        "privacy.mode=dp-sgd",
        "privacy.target_epsilon=3",
        "privacy.noise_multiplier=0.8",  # under PRV (the default): 0, 1 and 3 rounds affordable
        "train.n_critic=1",  # one D step per local step: the budgets below count on it
        # the budgets count DP-SGD steps alone: no embedding release (tests/test_embedding.py)
        "train.embedding_weight=0",
    ]
    cfg = load_config(None, [*TOY, *dp])
    # What each hospital's own accountant allows: the rounds it can afford.
    affordable = {}
    for h in range(3):
        n = len(hospital_dataset(cfg.data, cfg.run.seed, h, 3))
        plan = plan_privacy(cfg.privacy, num_examples=n, batch_size=8, planned_steps=32)
        acc, r = HospitalAccountant(cfg.privacy.accountant), 0
        while acc.epsilon_after(plan, 4) <= 3.0:
            acc.record(plan, 4)
            r += 1
        affordable[f"hospital_{h}"] = r
    assert sorted(affordable.values()) == [0, 1, 3], affordable  # the scenario this test needs

    res = simulate(tmp_path, *dp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = RunDir(tmp_path / "e2e").read_metrics()
    assert [r["round"] for r in records] == [1, 2, 3]  # stopped when no budget was left
    for rec in records:
        trained = {h for h, n in affordable.items() if n >= rec["round"]}
        assert set(rec["hospitals"]) == trained
        assert all(0 < h["epsilon"] <= 3.0 for h in rec["hospitals"].values())
        assert len(rec["failures"]) == 3 - len(trained)
        assert all(f["budget_exhausted"] for f in rec["failures"])
    summary = json.loads((tmp_path / "e2e" / "summary.json").read_text())
    assert "privacy budget" in summary["stopped_early"]
    table = summary["privacy"]
    assert set(table) == {h for h, n in affordable.items() if n > 0}
    assert all(row["epsilon"] <= row["budget"] == 3.0 for row in table.values())
    assert all(row["dp_steps"] == 4 * affordable[h] for h, row in table.items())


def test_dp_accountants_survive_a_resumed_run(tmp_path: Path) -> None:
    dp = [
        "federation.num_hospitals=2",
        "train.local_steps=3",
        "privacy.mode=dp-sgd",
        "privacy.target_epsilon=50",
        "privacy.noise_multiplier=1.0",
        "train.n_critic=1",
    ]
    first = simulate(tmp_path, *dp, "federation.num_rounds=2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rd = RunDir(tmp_path / "e2e")
    eps2 = {h: v["epsilon"] for h, v in rd.read_metrics()[-1]["hospitals"].items()}
    more = simulate(tmp_path, *dp, "federation.num_rounds=3", "run.resume=true")
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    last = rd.read_metrics()[-1]
    assert last["round"] == 3
    for name, h in last["hospitals"].items():
        assert h["dp_steps"] == 9  # 3 rounds x 3 steps: the resumed run kept counting
        assert h["epsilon"] > eps2[name]


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_central_dp_reports_epsilon_and_stops_at_the_budget(tmp_path: Path, clipping: str) -> None:
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    from fedgan.config import load_config
    from fedgan.federated.central_dp import central_accountant

    central = [
        "federation.num_hospitals=2",
        "federation.num_rounds=5",
        "privacy.mode=central-dp",
        "privacy.target_epsilon=12",
        "privacy.noise_multiplier=0.8",
        f"privacy.central_clipping={clipping}",
        "privacy.max_grad_norm=5",
    ]
    cfg = load_config(None, central).privacy
    acc, affordable = central_accountant(cfg, 2), 0
    while not acc.would_exceed(GaussianPrivacyEvent(0.8, 2, 2)):
        acc.compose(GaussianPrivacyEvent(0.8, 2, 2))
        affordable += 1
    assert 0 < affordable < 5  # the budget must end the run early for this test to mean much

    res = simulate(tmp_path, *central)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = RunDir(tmp_path / "e2e").read_metrics()
    assert [r["round"] for r in records] == list(range(1, affordable + 1))
    eps = [r["aggregate"]["central_epsilon"] for r in records]
    assert eps == sorted(eps) and eps[-1] <= 12.0
    summary = json.loads((tmp_path / "e2e" / "summary.json").read_text())
    assert summary["privacy"]["central"]["releases"] == affordable
    assert "central privacy budget" in summary["stopped_early"]


def test_a_resumed_central_dp_run_never_passes_the_budget(tmp_path: Path) -> None:
    """The budget affords 3 releases. A run of 2 rounds resumed for 5 in all must stop after
    the third: the resumed accountant counts the first two (a fresh one would allow 3 more)."""
    central = [
        "federation.num_hospitals=2",
        "privacy.mode=central-dp",
        "privacy.target_epsilon=12",
        "privacy.noise_multiplier=0.8",
        "privacy.max_grad_norm=5",
    ]
    first = simulate(tmp_path, *central, "federation.num_rounds=2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    more = simulate(tmp_path, *central, "federation.num_rounds=5", "run.resume=true")
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    records = RunDir(tmp_path / "e2e").read_metrics()
    assert [r["round"] for r in records] == [1, 2, 3]
    eps = [r["aggregate"]["central_epsilon"] for r in records]
    assert eps == sorted(eps) and eps[-1] <= 12.0
    summary = json.loads((tmp_path / "e2e" / "summary.json").read_text())
    assert summary["privacy"]["central"]["releases"] == 3
    assert "central privacy budget" in summary["stopped_early"]


def test_a_resumed_fedavgm_run_keeps_its_server_momentum(tmp_path: Path) -> None:
    momentum = ["federation.num_hospitals=2", "federation.strategy=fedavgm",
                "federation.avgm_momentum=0.9"]  # fmt: skip
    first = simulate(tmp_path, *momentum, "federation.num_rounds=2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rd = RunDir(tmp_path / "e2e")
    saved = rd.load_checkpoint()["meta"]["server"]["server_optimizer"]
    assert saved["kind"] == "momentum" and set(saved["t"].values()) == {2}
    more = simulate(tmp_path, *momentum, "federation.num_rounds=3", "run.resume=true")
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    state = rd.load_checkpoint()["meta"]["server"]["server_optimizer"]
    assert set(state["t"].values()) == {3}  # the resumed run went on from round 2's moments
    assert set(state["m"]) == set(saved["m"]) and len(state["m"]) > 0


def test_pneumoniamnist_five_hospitals_dirichlet(tmp_path: Path, pneumonia_npz: Path) -> None:
    """Issue 5's acceptance run: real MedMNIST data, 5 hospitals, label skew alpha = 0.5."""
    res = simulate(
        tmp_path,
        "data.source=medmnist",
        f"data.path={pneumonia_npz}",
        "data.partition=dirichlet",
        "data.dirichlet_alpha=0.5",
        "data.augment=true",
        "federation.num_hospitals=5",
        "federation.num_rounds=2",
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = RunDir(tmp_path / "e2e").read_metrics()
    assert [r["round"] for r in records] == [1, 2]
    sizes = {h: v["num_examples"] for h, v in records[-1]["hospitals"].items()}
    assert len(sizes) == 5 and all(n > 0 for n in sizes.values())
    from fedgan.config import load_config
    from fedgan.data import hospital_pool

    cfg = load_config(
        None,
        [
            "data.source=medmnist",
            f"data.path={pneumonia_npz}",
            "data.partition=dirichlet",
            "data.image_size=16",
        ],
    )
    shares = [len(hospital_pool(cfg.data, 0, h, 5).labels) for h in range(5)]
    assert sum(shares) == 4708 and max(shares) > 2 * min(shares)  # skewed, complete
    assert sorted(sizes.values()) == sorted(shares)  # each hospital trained on its own share


def test_half_precision_messages_in_a_real_federation(tmp_path: Path) -> None:
    """Weights travel in float16 (half the bytes, as recorded); the global model stays float32;
    each hospital's optimizer state stays on its disk and continues round after round."""
    from fedgan.config import load_config
    from fedgan.federated.records import nbytes, pack, to_arrays
    from fedgan.models import pack_state
    from fedgan.training import networks_for

    res = simulate(tmp_path, "federation.num_hospitals=2", "federation.num_rounds=2",
                   "federation.message_dtype=float16")  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rd = RunDir(tmp_path / "e2e")
    cfg = load_config(rd.path / "config.yaml")
    state = pack_state(networks_for(cfg))
    # the messages travel packed (one array per message, the default)
    half, full = nbytes(pack(to_arrays(state, "float16"))), nbytes(pack(to_arrays(state)))
    assert half < 0.55 * full
    records = rd.read_metrics()
    for r in records:
        # two hospitals a round; the .npy header may differ by a few bytes
        assert abs(r["bytes_down"] - 2 * half) <= 64 and abs(r["bytes_up"] - 2 * half) <= 64
    assert {h["optimizer_steps"] for h in records[-1]["hospitals"].values()} == {2 * 2}
    assert all(v.dtype != torch.float16 for v in rd.load_checkpoint()["state"].values())
    assert sorted(p.name for p in (rd.path / ".hospitals").glob("*.pt")) == [
        "hospital_0.pt",
        "hospital_1.pt",
    ]


def test_local_discriminators_and_fedbn_in_a_real_federation(tmp_path: Path) -> None:
    """With a local discriminator and FedBN, neither ever leaves a hospital: the messages
    carry only the rest, the global model keeps its initial D and norm layers, and each
    hospital trains its own across rounds (kept on its disk)."""
    from fedgan.config import load_config
    from fedgan.federated.records import nbytes, pack, to_arrays
    from fedgan.federated.sharing import sharing_plan
    from fedgan.models import pack_state
    from fedgan.training import networks_for

    res = simulate(tmp_path, "federation.num_hospitals=2", "federation.num_rounds=2",
                   "federation.share_discriminator=0", "federation.local_norm=true",
                   "federation.strategy=fedavgm", "federation.avgm_momentum=0.5",
                   "federation.optimizer_state=reset")  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rd = RunDir(tmp_path / "e2e")
    cfg = load_config(rd.path / "config.yaml")
    plan = sharing_plan(cfg)
    initial = pack_state(networks_for(cfg))
    local = plan.never_shared
    assert local == plan.keys.networks["discriminator"]  # its norm layers included
    sent = nbytes(pack(to_arrays({k: v for k, v in initial.items() if k not in local})))
    for r in rd.read_metrics():
        assert abs(r["bytes_down"] - 2 * sent) <= 64 and abs(r["bytes_up"] - 2 * sent) <= 64
    final = rd.load_checkpoint()["state"]
    assert all(torch.equal(final[k], initial[k]) for k in local)
    assert any(not torch.equal(final[k], initial[k]) for k in initial if k not in local)
    kept = [torch.load(rd.path / ".hospitals" / f"hospital_{h}.weights.pt") for h in (0, 1)]
    d_keys = [k for k in plan.keys.networks["discriminator"] if k in plan.keys.parameters]
    assert any(not torch.equal(kept[0][k], initial[k]) for k in d_keys)
    assert any(not torch.equal(kept[0][k], kept[1][k]) for k in d_keys)  # each its own


def test_a_seeded_federation_repeats_bit_for_bit(tmp_path: Path) -> None:
    """Two runs of one seed end with the same weights: the hospitals' replies arrive in any
    order, and the server averages them in hospital order (a float sum depends on its order,
    and a GAN turns the last bits into different figures within rounds)."""
    states = []
    for name in ("first", "second"):
        res = simulate(tmp_path, "federation.num_hospitals=3", "federation.num_rounds=2",
                       "train.local_steps=4", f"run.name={name}")  # fmt: skip
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        states.append(RunDir(tmp_path / name).load_checkpoint()["state"])
    first, second = states
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
