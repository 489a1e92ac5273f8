"""Deployment against simulation: the steady-state round time of the same study run once as a
Flower simulation and once as a real deployment on this machine (the kits in server/ and
clients/: TLS SuperLink with node authentication, one SuperNode per hospital, `flwr run`).

    python benchmarks/deployment.py [--rounds 4] [--steps 20,300] [--set key=value ...]

Run at two round lengths (20 local steps: about 2 s of training here; 300: about 30 s). Where
the time goes is read from metrics.jsonl: each hospital's own training time against the
round's wall time (the rest, ``deployment_fixed_s``, is the SuperNode's polling, the ClientApp
process start-up, transfer and aggregation). The deployment runs twice: as shipped (the kit's
ClientApp fork server, the SuperNode's 0.5 s idle poll, packed messages) and as before them
(``WARM_CLIENTAPP=0``: Flower's own launcher, a new process per round; ``SUPERNODE_POLL_S=3``:
Flower's own idle wait; ``federation.pack_messages=false``: one array per tensor),
``warm_over_cold_round_ratio`` comparing them; the ClientApp's import time and a site's data
read (decoded, then from the site cache) are measured on their own. Prints one JSON line per
round length, then one with ``deployment_round_ratio_<steps>_steps`` (deployment / simulation
round time, steady state: round 1 is dropped) for each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedgan.config import load_config, to_run_config
from fedgan.federated.launcher import free_port, write_run_config
from fedgan.federated.simulation import simulate
from fedgan.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHON_BIN": str(BIN), "PATH": f"{BIN}:{os.environ['PATH']}"}


def kit(script: str, *args: str, **env: str) -> None:
    subprocess.run([str(REPO / script), *args], env={**ENV, **env}, check=True,
                   capture_output=True, text=True)  # fmt: skip


def steady(records: list[dict]) -> dict[str, float]:
    later = records[1:] or records

    def slowest(key: str) -> float:
        return statistics.median(
            max(h.get(key, 0.0) for h in r["hospitals"].values()) for r in later
        )

    return {
        "round_s": statistics.median(r["round_seconds"] for r in later),
        "train_s": slowest("train_seconds"),
        "startup_s": slowest("startup_seconds"),
        "data_s": slowest("data_seconds"),
    }


def deploy(cfg, root: Path, data: list[Path], warm: bool = True) -> list[dict]:
    root.mkdir(parents=True, exist_ok=True)
    coord = root / "coordinator"
    kit("server/make-certs.sh", str(coord / "certs"))
    port = free_port()
    kit("server/start-superlink.sh", str(coord), PORT=str(port), HOST="127.0.0.1")
    envs = []
    try:
        for i, folder in enumerate(data):
            site = root / f"site{i}"
            kit("clients/make-site-key.sh", str(site / "keys"))
            kit("server/register-site.sh", str(coord), str(site / "keys" / "site.pub"))
            env = site / "site.env"
            env.write_text(
                f"SUPERLINK=127.0.0.1:{port}\nCA_CERT={coord / 'certs' / 'ca.crt'}\n"
                f"PRIVATE_KEY={site / 'keys' / 'site'}\nDATA_PATH={folder}\nDATA_FORMAT=folder\n"
                f"DEVICE=cpu\nHOSPITAL_ID={i}\nCPU_THREADS=1\nCLIENTAPP_PORT={free_port()}\n"
                f"WARM_CLIENTAPP={int(warm)}\nSUPERNODE_POLL_S={0.5 if warm else 3}\n"
            )
            kit("clients/start-supernode.sh", str(env))
            envs.append(env)
        run_toml = write_run_config(root / "run.toml", to_run_config(cfg))
        subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "fedgan", "--run-config", str(run_toml),
             "--stream"],
            env={**ENV, "FLWR_HOME": str(coord / "flwr")}, check=True, capture_output=True,
        )  # fmt: skip
    finally:
        for env in envs:
            kit("clients/stop-supernode.sh", str(env))
        kit("server/stop-superlink.sh", str(coord))
    return RunDir(cfg.run_dir).read_metrics()


def export_folders(cfg, root: Path) -> list[Path]:
    """Each simulated hospital's share written as a PNG folder, so both arms train on the
    same images."""
    import numpy as np
    from PIL import Image

    from fedgan.data import hospital_pool

    folders = []
    n = cfg.federation.num_hospitals
    for h in range(n):
        pool = hospital_pool(cfg.data, cfg.run.seed, h, n)
        folder = root / f"data{h}"
        for k, (image, label) in enumerate(zip(pool.images, pool.labels, strict=True)):
            sub = folder / f"class{int(label)}"
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(
                sub / f"{k}.png"
            )
        folders.append(folder)
    return folders


def import_seconds() -> float:
    """Wall time of a fresh process importing the ClientApp (what each deployed round pays
    before it trains, besides the interpreter itself)."""
    code = (
        "import time; t = time.perf_counter(); import fedgan.federated.client_app; "
        "print(time.perf_counter() - t)"
    )
    times = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env=ENV)  # fmt: skip
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def data_seconds(cfg, folder: Path, cache: Path) -> tuple[float, float]:
    """``(decode, cached)``: seconds to read a site's folder, first decoding its files, then
    from the site cache a later round finds."""
    from fedgan.data import local_pool
    from fedgan.federated.site_cache import cached_pool

    def read():
        local_pool.cache_clear()
        return local_pool(str(folder), cfg.data, "folder")

    t0 = time.perf_counter()
    cached_pool(folder, cfg.data, "folder", cache, read)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached_pool(folder, cfg.data, "folder", cache, read)
    return cold, time.perf_counter() - t0


def compare(args: argparse.Namespace, steps: int, root: Path) -> dict[str, float]:
    """Simulation and deployment of the same plan with ``steps`` local steps per round."""
    base = [
        "federation.num_hospitals=2",
        f"federation.num_rounds={args.rounds}",
        f"train.local_steps={steps}",
        "eval.every=1000",
        "eval.metrics=",
        "eval.final_metrics=",
        "train.device=cpu",
        *args.overrides,
    ]
    sim_cfg = load_config(None, [f"run.output_dir={root}", f"run.name=sim{steps}", *base])
    t0 = time.perf_counter()
    simulate(sim_cfg)
    sim_wall = time.perf_counter() - t0
    sim = steady(RunDir(sim_cfg.run_dir).read_metrics())
    dep_cfg = load_config(None, [f"run.output_dir={root}", f"run.name=dep{steps}", *base])
    t0 = time.perf_counter()
    folders = export_folders(sim_cfg, root / f"data{steps}")
    dep = steady(deploy(dep_cfg, root / f"deploy{steps}", folders))
    dep_wall = time.perf_counter() - t0
    # The same deployment as before the warm launcher, the prompt poll and packed messages:
    # Flower's own launcher (a new ClientApp process per round) and waits, one array per tensor.
    cold_cfg = load_config(None, [f"run.output_dir={root}", f"run.name=cold{steps}", *base,
                                  "federation.pack_messages=false"])  # fmt: skip
    cold = steady(deploy(cold_cfg, root / f"cold{steps}", folders, warm=False))
    return {
        "local_steps": steps,
        "simulation_round_s": round(sim["round_s"], 3),
        "simulation_train_s": round(sim["train_s"], 3),
        "simulation_wall_s": round(sim_wall, 1),
        "deployment_round_s": round(dep["round_s"], 3),
        "deployment_train_s": round(dep["train_s"], 3),
        "deployment_wall_s": round(dep_wall, 1),
        "deployment_fixed_s": round(dep["round_s"] - dep["train_s"], 3),
        # of which: the ClientApp process's start (interpreter, imports, app install, message
        # transfer) and the site's data read; the rest is the SuperNode's idle wait for the
        # next round, its wait for the reply, the reply's transfer and the server's part
        "deployment_startup_s": round(dep["startup_s"], 3),
        "deployment_data_s": round(dep["data_s"], 3),
        "deployment_round_ratio": round(dep["round_s"] / sim["round_s"], 3),
        # Flower's own launcher (WARM_CLIENTAPP=0), its 3 s idle wait and unpacked messages
        "cold_deployment_round_s": round(cold["round_s"], 3),
        "cold_deployment_fixed_s": round(cold["round_s"] - cold["train_s"], 3),
        "cold_deployment_startup_s": round(cold["startup_s"], 3),
        "cold_deployment_round_ratio": round(cold["round_s"] / sim["round_s"], 3),
        "warm_over_cold_round_ratio": round(dep["round_s"] / cold["round_s"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--steps", default="20,300", help="local steps per round (about 2 s and 30 s here)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = []
        for steps in (int(x) for x in args.steps.split(",")):
            rows.append(compare(args, steps, root))
            print(json.dumps(rows[-1]), flush=True)
        cfg = load_config(None, ["federation.num_hospitals=2", *args.overrides])
        folder = root / f"data{rows[0]['local_steps']}" / "data0"
        cold, cached = data_seconds(cfg, folder, root / "cache-check")
    out["clientapp_import_s"] = round(import_seconds(), 3)
    out["site_data_decode_s"] = round(cold, 3)
    out["site_data_cached_s"] = round(cached, 3)
    out["rows"] = rows
    for row in rows:
        out[f"deployment_round_ratio_{row['local_steps']}_steps"] = row["deployment_round_ratio"]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
