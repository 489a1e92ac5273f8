"""The hospital's ClientApp: receive the global GAN, train it on local data, send it back."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import psutil
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import TensorDataset

from fedgan.config import Config, from_run_config, with_changes
from fedgan.data import hospital_dataset, local_dataset, local_pool, to_signed
from fedgan.experiment import resolve
from fedgan.federated.central_dp import UNIT_WEIGHT, client_clipping_mod
from fedgan.federated.records import PACKED_KEY, from_arrays, pack, to_arrays, unpack
from fedgan.federated.sharing import sharing_plan
from fedgan.federated.site_cache import cached_pool
from fedgan.privacy import BudgetExhausted
from fedgan.rundir import atomic_write_bytes, atomic_write_text
from fedgan.runs.records import HospitalReport, PrivacySpent
from fedgan.training.hospital import deserialize_state, local_round, serialize_state

app = ClientApp(mods=[client_clipping_mod])

_STATE_KEY = "fedgan.hospital"
BUDGET_ERROR_CODE = 4031  # a hospital that has spent its privacy budget
SITE_POLICY_ERROR_CODE = 4032  # the run breaks a site's own rules (e.g. its privacy budget)


def _longer_history(a: str | None, b: str | None) -> str | None:
    """Of two accountant histories, the one that has counted more steps (spent more)."""
    steps = [(sum(h[2] for h in json.loads(x)["history"]), x) for x in (a, b) if x]
    return max(steps)[1] if steps else None


def state_file(cfg: Config, node: Mapping[str, object], hospital: int) -> Path | None:
    """Where this hospital keeps its optimizer state and accountant between runs, so that a
    resumed study continues them: ``<state-dir>/<run.name>/hospital_<i>.pt`` on a deployed site
    that names a ``state-dir`` in its node config, ``<run dir>/.hospitals/`` in a simulation
    (its hospitals share the coordinator's disk); None for a site that keeps nothing on disk."""
    name = f"hospital_{hospital}.pt"
    if "state-dir" in node:
        return Path(str(node["state-dir"])) / cfg.run.name / name
    if "partition-id" in node:
        return cfg.run_dir / ".hospitals" / name
    return None


def _weights_file(path: Path) -> Path:
    return path.with_name(path.stem + ".weights.pt")


def load_site_state(path: Path | None) -> tuple[bytes | None, str | None]:
    """``(optimizer state, accountant history)`` saved by :func:`save_site_state`, or Nones
    (also for an unreadable file: optimizer state is worth keeping, never worth failing for)."""
    if path is None or not path.exists():
        return None, None
    try:
        meta = path.with_suffix(".json")
        saved = json.loads(meta.read_text()) if meta.exists() else {}
        return path.read_bytes() or None, saved.get("accountant") or None
    except (OSError, ValueError):
        return None, None


def load_site_weights(path: Path | None) -> bytes | None:
    """The weights this hospital kept (a local discriminator, FedBN's layers), or None."""
    if path is None or not _weights_file(path).exists():
        return None
    try:
        return _weights_file(path).read_bytes() or None
    except OSError:
        return None


def save_site_state(
    path: Path | None, optimizers: bytes, accountant: str, round_: int, weights: bytes = b""
) -> None:
    """Writes this hospital's optimizer state, accountant and kept weights atomically (the
    weights first: a state file never points past the weights it was trained with)."""
    if path is None:
        return
    if weights:
        atomic_write_bytes(_weights_file(path), weights)
    atomic_write_bytes(path, optimizers)
    atomic_write_text(path.with_suffix(".json"),
                      json.dumps({"round": round_, "accountant": accountant}))  # fmt: skip


def site_data(cfg: Config, context: Context) -> tuple[TensorDataset, int]:
    """This site's data and hospital index.

    A deployed SuperNode names its data with ``--node-config "data-path=..."`` (and, with
    ``cache-dir``, keeps the decoded images there between rounds, whose ClientApp processes
    are fresh each time); a simulated one gets ``partition-id``/``num-partitions`` and reads
    only its own share.
    """
    node = context.node_config
    if "data-path" in node:
        hospital = int(node.get("hospital-id", context.node_id % 1_000_000))
        fmt = str(node.get("data-format", ""))
        path = Path(str(node["data-path"])).expanduser()
        if "cache-dir" in node and path.exists():
            cache = Path(str(node["cache-dir"])).expanduser()
            pool = cached_pool(path, cfg.data, fmt, cache,
                               lambda: local_pool(str(path), cfg.data, fmt))  # fmt: skip
            return TensorDataset(to_signed(pool.images), pool.labels), hospital
        return local_dataset(str(path), cfg.data, fmt), hospital
    if "partition-id" in node:
        pid, parts = int(node["partition-id"]), int(node["num-partitions"])
        return hospital_dataset(cfg.data, cfg.run.seed, pid, parts), pid
    raise ValueError(
        "this SuperNode has no data: start it with --node-config \"data-path='/path/to/data'\""
    )


#: Set by the site's warm-process launcher (``fedgan.federated.site_exec``) when it hands a
#: process its task: start-up is then counted from there, not from the idle process's start.
TASK_RECEIVED_ENV = "FEDGAN_TASK_RECEIVED_AT"


def _process_age() -> float:
    """Seconds since this process started (a deployed round's ClientApp is a fresh one), or,
    in a process the site's launcher kept warm, since it was handed its task."""
    received = os.environ.get(TASK_RECEIVED_ENV)
    try:
        start = float(received) if received else psutil.Process().create_time()
    except (ValueError, psutil.Error):
        return 0.0
    return max(0.0, time.time() - start)


class SitePolicyError(ValueError):
    """The run asks for something this site's SuperNode config does not allow."""


def site_config(cfg: Config, node: Mapping[str, object]) -> Config:
    """The run's config under this site's own settings (its SuperNode's node config):
    ``device`` picks where it trains; ``max-epsilon`` is the site's privacy budget, which
    the site never lets a run exceed (and which requires DP-SGD).

    Raises:
        SitePolicyError: If the site requires DP-SGD and the run does not use it.
    """
    if "device" in node:
        cfg = with_changes(cfg, train={"device": str(node["device"])})
    if "max-epsilon" in node:
        cap = float(node["max-epsilon"])  # type: ignore[arg-type]
        if cfg.privacy.mode != "dp-sgd":
            raise SitePolicyError(
                f"this site trains only under DP-SGD with epsilon <= {cap:g} (its max-epsilon), "
                f"but the run has privacy.mode={cfg.privacy.mode}; run with privacy.mode=dp-sgd"
            )
        if cfg.privacy.target_epsilon > cap:
            cfg = with_changes(cfg, privacy={"target_epsilon": cap})
    return cfg


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One federated round at one hospital."""
    startup = _process_age() if "data-path" in context.node_config else 0.0
    try:
        cfg = resolve(site_config(from_run_config(context.run_config), context.node_config))
    except SitePolicyError as refused:
        return Message(Error(code=SITE_POLICY_ERROR_CODE, reason=str(refused)), reply_to=msg)
    train_config = msg.content.config_records["config"]
    round_ = int(train_config["server-round"]) + int(train_config.get("round-offset", 0))  # type: ignore[arg-type]

    # 1. Load this hospital's data (cached in the process, and on a site's disk, across rounds).
    t0 = time.perf_counter()
    dataset, hospital = site_data(cfg, context)
    data_seconds = time.perf_counter() - t0

    # 2. Take the global networks; keep this hospital's optimizer state from earlier rounds.
    received = msg.content.array_records["arrays"]
    global_state = from_arrays(unpack(received), cfg.federation.message_dtype)
    #    Its privacy accountant persists here too; a resumed run's server sends the history it
    #    checkpointed, and the longer of the two is used, so nothing spent is ever forgotten.
    #    A process that has not trained this run yet (a resumed study) reads the state the
    #    hospital kept on disk.
    #    The optimizer state (as large as the networks) stays on the hospital's disk where it
    #    has a state file, so it never travels with the context (which a simulation pickles
    #    to and from its worker processes every round, and holds for every hospital).
    #    Weights that never travel (a local discriminator, FedBN's layers) are kept the same way.
    kept = context.state.config_records.get(_STATE_KEY, ConfigRecord())
    path = state_file(cfg, context.node_config, hospital)
    plan = sharing_plan(cfg) if cfg.federation.keeps_local else None
    if path is not None:
        optimizer_state, disk_accountant = load_site_state(path)
        weights = load_site_weights(path) if plan is not None else None
    else:
        blob = kept.get("optimizers")
        optimizer_state, disk_accountant = (blob if isinstance(blob, bytes) else None), None
        blob = kept.get("weights")
        weights = blob if isinstance(blob, bytes) and plan is not None else None
    from_server = train_config.get(f"accountant.{hospital}")
    accountant = _longer_history(
        _longer_history(kept.get("accountant") or None, disk_accountant),  # type: ignore[arg-type]
        from_server if isinstance(from_server, str) else None,
    )

    # 3. Train locally (under DP-SGD, only if the budget allows the whole round).
    try:
        result = local_round(
            cfg,
            dataset,
            global_state,
            optimizer_state,
            round_=round_,
            hospital=max(hospital, 0),
            accountant=accountant,
            proximal_mu=float(train_config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
            kept_state=deserialize_state(weights) if weights else None,
            reset_optimizers=cfg.federation.optimizer_state == "reset",
        )
    except BudgetExhausted as exhausted:
        return Message(Error(code=BUDGET_ERROR_CODE, reason=str(exhausted)), reply_to=msg)
    kept_weights = serialize_state(result.state) if plan is not None else b""
    save_site_state(path, result.optimizer_state, result.accountant, round_, kept_weights)
    kept_here = ConfigRecord({"accountant": result.accountant})
    if path is None:  # no disk to keep it on: the context keeps it
        kept_here["optimizers"] = result.optimizer_state
        if kept_weights:
            kept_here["weights"] = kept_weights
    context.state[_STATE_KEY] = kept_here

    # 4. Reply with the trained networks and what the server needs to weigh and log them.
    report = HospitalReport(
        hospital=hospital,
        num_examples=result.num_examples,
        examples_seen=result.stats.examples,
        steps=result.stats.steps,
        d_loss=result.stats.d_loss,
        g_loss=result.stats.g_loss,
        train_seconds=result.stats.seconds,
        optimizer_steps=result.optimizer_steps,
        privacy=PrivacySpent(**result.privacy) if result.privacy else None,  # type: ignore[arg-type]
        startup_seconds=startup,
        data_seconds=data_seconds,
        d_steps=result.stats.d_steps,
        critic_steps=int(result.stats.critic.get("n_d", 0)),
        critic_accuracy=float(result.stats.critic.get("accuracy", float("nan"))),
    )
    metrics = MetricRecord({**report.to_metrics(), UNIT_WEIGHT: 1})
    state = result.state
    if plan is not None:  # only the round's shared weights leave the site
        returned = plan.returned(round_)
        state = {k: v for k, v in state.items() if k in returned}
    arrays = to_arrays(state, cfg.federation.message_dtype)
    if PACKED_KEY in received:  # answer in the layout the server sent
        arrays = pack(arrays)
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    if result.accountant:
        content["privacy"] = ConfigRecord({"accountant": result.accountant})
    return Message(content=content, reply_to=msg)
