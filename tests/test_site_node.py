"""The site's SuperNode entry point (fedgan.federated.site_node): Flower's SuperNode loop with
its idle waits capped; the whole kit runs it in tests/test_deployment.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from flwr.supernode import start_client_internal as loop

from fedgan.federated.site_node import CappedTime, _split_poll, cap_idle_waits


def test_flowers_supernode_loop_sleeps_through_the_capped_time(monkeypatch) -> None:
    monkeypatch.setattr(loop, "time", time)  # restored after the test
    assert cap_idle_waits(loop, 0.05)
    assert isinstance(loop.time, CappedTime)
    start = time.perf_counter()
    loop.time.sleep(3)  # the loop's idle wait, as its code calls it
    assert time.perf_counter() - start < 1.0
    start = time.perf_counter()
    loop.time.sleep(0.01)  # a shorter wait is left as asked
    assert time.perf_counter() - start >= 0.009
    assert loop.time.time() == pytest.approx(time.time(), abs=1.0)  # the rest is time's
    assert cap_idle_waits(loop, 0.2) and loop.time.cap == 0.2  # applying twice updates it


def test_the_installed_loop_has_the_waits_it_caps() -> None:
    """The cap is written against this loop: a pull that finds nothing sleeps 3 s."""
    import inspect

    source = inspect.getsource(loop)
    assert "time.sleep(3)" in source


def test_a_loop_without_the_time_module_is_left_unchanged() -> None:
    other = types.ModuleType("other")
    other.time = object()  # type: ignore[attr-defined]
    before = other.time  # type: ignore[attr-defined]
    assert not cap_idle_waits(other, 0.5)
    assert other.time is before  # type: ignore[attr-defined]
    assert not cap_idle_waits(types.ModuleType("bare"), 0.5)


def test_poll_is_taken_out_of_flowers_arguments() -> None:
    assert _split_poll(["--superlink", "h:1", "--poll", "0.25", "--insecure"]) == (
        0.25,
        ["--superlink", "h:1", "--insecure"],
    )
    assert _split_poll(["--poll=1"]) == (1.0, [])
    assert _split_poll(["--insecure"])[0] == 0.5


@pytest.mark.parametrize("value", ["0", "-1", "4", "fast", ""])
def test_a_bad_poll_is_one_line_and_exit_2(value: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "fedgan.federated.site_node", "--poll", value, "--insecure"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "--poll" in res.stderr


def _start_kit(site: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """clients/start-supernode.sh on a site config of dummy credentials and ``settings``."""
    repo = Path(__file__).resolve().parent.parent
    for name in ("ca.crt", "site"):
        (site / name).write_text("x")
    env = site / "site.env"
    lines = {
        "SUPERLINK": "127.0.0.1:1",
        "CA_CERT": str(site / "ca.crt"),
        "PRIVATE_KEY": str(site / "site"),
        "DATA_PATH": str(site / "data"),
        **settings,
    }
    env.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    return subprocess.run(
        [str(repo / "clients" / "start-supernode.sh"), str(env)],
        env={**os.environ, "PYTHON_BIN": str(Path(sys.executable).parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("value", ["9", "0", "soon"])
def test_the_kit_refuses_a_bad_poll_before_starting(tmp_path: Path, value: str) -> None:
    (tmp_path / "data").mkdir()
    res = _start_kit(tmp_path, SUPERNODE_POLL_S=value)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip() == (
        f"start-supernode: SUPERNODE_POLL_S '{value}' must be a number of seconds in (0, 3]"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "data", "site", "site.env"]


def test_the_kit_refuses_a_site_without_images_before_starting(tmp_path: Path) -> None:
    """A DATA_PATH with no image of the format is one line and exit 2 from
    clients/start-supernode.sh, not an error in the first round's log; nothing is written."""
    (tmp_path / "data" / "normal").mkdir(parents=True)
    (tmp_path / "data" / "normal" / "notes.txt").write_text("not an image")
    res = _start_kit(tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert res.stderr.startswith(f"start-supernode: no images under '{tmp_path / 'data'}'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "data", "site", "site.env"]


@pytest.mark.parametrize(
    ("value", "says"),
    [("cuda:99", "DEVICE is 'cuda:99' but"), ("gpu", "DEVICE is 'gpu': use auto, cpu, cuda")],
)
def test_the_kit_refuses_a_device_the_site_lacks(tmp_path: Path, value: str, says: str) -> None:
    """A DEVICE the machine does not have (or no device at all) is one line and exit 2 from
    clients/start-supernode.sh, not a failed ClientApp in every round; nothing is written."""
    from PIL import Image

    (tmp_path / "data").mkdir()
    for i in range(3):
        Image.new("L", (16, 16), 40 * i).save(tmp_path / "data" / f"{i}.png")
    res = _start_kit(tmp_path, DEVICE=value)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert res.stderr.startswith(f"start-supernode: {says}"), res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "data", "site", "site.env"]
