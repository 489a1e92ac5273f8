"""The hospital's ClientApp: receive the global GAN, train it on local data, send it back."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import TensorDataset

from fedgan.config import Config, from_run_config
from fedgan.data import hospital_dataset, local_dataset
from fedgan.federated.records import from_arrays, to_arrays
from fedgan.training.hospital import local_round

app = ClientApp()

_STATE_KEY = "fedgan.hospital"


def site_data(cfg: Config, context: Context) -> tuple[TensorDataset, int]:
    """This site's data and hospital index.

    A deployed SuperNode names its data with ``--node-config "data-path=..."``; a simulated one
    gets ``partition-id``/``num-partitions`` and reads only its own share.
    """
    node = context.node_config
    if "data-path" in node:
        hospital = int(node.get("hospital-id", -1))
        return local_dataset(str(node["data-path"]), cfg.data), hospital
    if "partition-id" in node:
        pid, parts = int(node["partition-id"]), int(node["num-partitions"])
        return hospital_dataset(cfg.data, cfg.run.seed, pid, parts), pid
    raise ValueError(
        "this SuperNode has no data: start it with --node-config \"data-path='/path/to/data'\""
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One federated round at one hospital."""
    cfg = from_run_config(context.run_config)
    train_config = msg.content.config_records["config"]
    round_ = int(train_config["server-round"]) + int(train_config.get("round-offset", 0))  # type: ignore[arg-type]

    # 1. Load this hospital's data (cached in the process across rounds).
    dataset, hospital = site_data(cfg, context)

    # 2. Take the global networks; keep this hospital's optimizer state from earlier rounds.
    global_state = from_arrays(msg.content.array_records["arrays"])
    kept = context.state.config_records.get(_STATE_KEY)
    blob = kept.get("optimizers") if kept is not None else None
    optimizer_state = blob if isinstance(blob, bytes) else None

    # 3. Train locally.
    result = local_round(
        cfg, dataset, global_state, optimizer_state, round_=round_, hospital=max(hospital, 0)
    )
    context.state[_STATE_KEY] = ConfigRecord({"optimizers": result.optimizer_state})

    # 4. Reply with the trained networks and what the server needs to weigh and log them.
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "hospital": hospital,
            "steps": result.stats.steps,
            "examples-seen": result.stats.examples,
            "d-loss": result.stats.d_loss,
            "g-loss": result.stats.g_loss,
            "train-seconds": result.stats.seconds,
        }
    )
    content = RecordDict({"arrays": to_arrays(result.state), "metrics": metrics})
    return Message(content=content, reply_to=msg)
