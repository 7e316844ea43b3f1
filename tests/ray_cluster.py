"""A real two-node Ray cluster on loopback addresses, started with `ray start` and stopped by its own process ids.

Why these details: Ray replaces localhost/127.0.0.1 with the machine's interface address, so the head
and the worker are pinned to 127.0.0.2 and 127.0.0.3 and every port is a free one (no traffic leaves
loopback, and a second cluster on the machine does not collide). Joining a second node needs token
authentication. `ray stop` would stop every Ray process of the user, so each `ray start` runs in its
own session and a node's processes are found, and stopped, by that session id only.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).parents[1]
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`: a node's processes (Ray gives each worker its own group)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


class LocalRayCluster:
    """A head on 127.0.0.2 and worker nodes on 127.0.0.3, each with `cpus` logical CPUs."""

    def __init__(self, cpus: int = 2, object_store_mb: int = 100) -> None:
        self.cpus, self.object_store_mb = cpus, object_store_mb
        self.temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
        self.port = free_port(HEAD_IP)
        self.address = f"{HEAD_IP}:{self.port}"
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            # notice a lost node within seconds (Ray's defaults take about half a minute)
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        self.sessions: dict[str, int] = {}  # node name -> session id (= its `ray start` pid)

    def _start(self, name: str, args: list[str]) -> None:
        ray = str(Path(sys.executable).with_name("ray"))
        common = ["--temp-dir", str(self.temp), "--num-cpus", str(self.cpus), "--object-store-memory",
                  str(self.object_store_mb * 2**20), "--disable-usage-stats", "--metrics-export-port", str(free_port()),
                  "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port())]
        log = (self.temp / f"{name}.log").open("w")
        proc = subprocess.Popen([ray, "start", *args, *common], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.sessions[name] = proc.pid
        if proc.wait(timeout=180) != 0:
            raise RuntimeError(f"ray start {name} failed:\n{(self.temp / f'{name}.log').read_text()[-3000:]}")

    def start(self) -> LocalRayCluster:
        self._start("head", ["--head", "--node-ip-address", HEAD_IP, "--port", str(self.port), "--include-dashboard=false",
                             "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port())])
        self.start_worker()
        return self

    def start_worker(self) -> None:
        self._start(f"worker{len(self.sessions)}", ["--address", self.address, "--node-ip-address", WORKER_IP])

    def worker_sessions(self) -> list[int]:
        return [sid for name, sid in self.sessions.items() if name != "head"]

    def kill_session(self, sid: int, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to every process of one node (its `ray start` session)."""
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """SIGTERM every node's processes, SIGKILL what is left after 5 s, remove the temporary folder."""
        for sid in self.sessions.values():
            self.kill_session(sid, signal.SIGTERM)
        deadline = time.time() + 5
        while time.time() < deadline and any(session_pids(s) for s in self.sessions.values()):
            time.sleep(0.2)
        for sid in self.sessions.values():
            self.kill_session(sid, signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)
