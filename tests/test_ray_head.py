"""The local Ray head a simulation starts skips the autoscaler monitor and the dashboard API
server, still runs actors and forwards their output, and the opt-out restores the stock
head. Each case starts Ray in a fresh interpreter, as a run would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedrag_ray.federated.ray_head import FULL_HEAD_ENV

START_LOCAL_RAY = """
import json, os, time
import psutil, ray
from ray._private import node
from fedrag_ray.federated.ray_head import SKIPPED_METHODS
from fedrag_ray.federated.simulation import _init_ray

stock = {m: vars(node.Node)[m] for m in SKIPPED_METHODS}
assert _init_ray(None, 1)

@ray.remote(num_cpus=1)
class Echo:
    def hello(self):
        print("ECHO-FROM-ACTOR", flush=True)
        return os.getpid()

    def niceness(self):
        return os.nice(0)

echo = Echo.remote()
actor_pid = ray.get(echo.hello.remote())
actor_nice = ray.get(echo.niceness.remote())
time.sleep(2.0)  # the log monitor forwards actor output about once a second
tree = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
out = {
    "actor_pid": actor_pid,
    "actor_nice": actor_nice,
    "driver_nice": os.nice(0),
    "monitor": any("autoscaler/_private/monitor.py" in c for c in tree),
    "api_server": any("dashboard/dashboard.py" in c for c in tree),
    "log_monitor": any("_private/log_monitor.py" in c for c in tree),
    "restored": all(vars(node.Node)[m] is f for m, f in stock.items()),
}
ray.shutdown()
print("RESULT " + json.dumps(out), flush=True)
"""


def _start(full_head: bool, niceness: int = 0) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in (FULL_HEAD_ENV, "RAY_worker_niceness")}
    if full_head:
        env[FULL_HEAD_ENV] = "1"
    proc = subprocess.run(
        ["nice", "-n", str(niceness), sys.executable, "-c", START_LOCAL_RAY],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), proc.stdout + proc.stderr


@pytest.mark.parametrize("full_head", [False, True], ids=["lean", "stock"])
def test_local_head_daemons(full_head: bool) -> None:
    out, console = _start(full_head)
    assert out["actor_pid"] > 0
    assert out["restored"], "Ray's Node methods stay stubbed after ray.init"
    assert out["log_monitor"]
    assert "ECHO-FROM-ACTOR" in console, "actor output no longer reaches the driver"
    # The stock head is the control: it shows that the test sees both daemons.
    assert out["monitor"] is full_head
    assert out["api_server"] is full_head


def test_actors_run_at_the_drivers_niceness() -> None:
    """Ray starts workers at nice 15 by default, so any normal-priority load beside a run
    starves its client actors (they do all the compute). An embedded head must start them
    at the driver's own niceness: here the driver runs at nice 3, so the stock default (15)
    and a fixed 0 both fail."""
    out, _ = _start(full_head=False, niceness=3)
    assert out["driver_nice"] == 3
    assert out["actor_nice"] == 3
