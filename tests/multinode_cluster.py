"""A real 2-node Ray cluster on this machine whose nodes share no local disk, inside a network namespace of its own.

- A fresh network namespace (``unshare -n``, held open by a ``sleep`` process) with only ``lo``, brought up: no
  traffic can leave loopback, and Ray, moto and MLflow bind 127.0.0.1 there. Every process of the cluster and
  every command of the tests runs inside it (``nsenter -t <holder> -n``).
- The head node (``ray start --head``) sees the machine's files. The second node's raylet is started in a mount
  namespace of its own (``unshare -m``) with a tmpfs mounted over ``<work>/local``: the directory where the tests
  keep node-local data, runs and caches, so that node sees an empty directory where the head sees files, as a
  second machine would.
- Each node offers one ``facescale_slot``; with ``scaling.resources_per_worker: {facescale_slot: 1}`` Ray Train
  places one worker on each node.
- A moto S3 server (real boto3 underneath) and an ``mlflow server`` (sqlite, served artifacts), on 127.0.0.1 of
  the namespace, play the cluster's object store and tracking server.

Teardown kills every process whose network namespace is the cluster's, so nothing outlives the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
RAY_PORT, S3_PORT, MLFLOW_PORT = 6379, 5555, 5000
SLOT = "facescale_slot"


def unshare_available() -> str | None:
    """Why this machine cannot make the namespaces (None when it can)."""
    for tool in ("unshare", "nsenter", "ip", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n -m is not permitted here: {probe.stderr.strip()}"
    return None


class TwoNodeCluster:
    """The cluster described in the module docstring; ``start()`` brings it up, ``stop()`` removes it.

    Args:
        work: A directory for the cluster's own files; ``work/local`` is node-local (masked on the second node).
    """

    def __init__(self, work: Path) -> None:
        self.work = work
        self.local = work / "local"
        self.local.mkdir(parents=True, exist_ok=True)
        self.holder: subprocess.Popen | None = None
        # Ray's own directory for this cluster: its sockets, logs, and the ray_current_cluster file that a plain
        # ray.init() elsewhere would otherwise find and try to join. Short, because Unix socket paths are limited.
        self.ray_tmp = tempfile.mkdtemp(prefix="fsmn-", dir="/tmp")
        self.env = self._env()

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))}
        env.update({
            "PATH": f"{BIN}:{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
            # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (set for the single-node tests) forbids a second node: left out.
            "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": f"127.0.0.1:{RAY_PORT}",
            "RAY_TMPDIR": self.ray_tmp,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{MLFLOW_PORT}",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        })
        return env

    # --- running things inside the namespace -------------------------------------------------------------------

    def _ns(self, *argv: str) -> list[str]:
        assert self.holder is not None, "cluster not started"
        return ["nsenter", "-t", str(self.holder.pid), "-n", *argv]

    def run(self, *argv: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
        """Runs a command inside the cluster's network namespace (on the head node's filesystem)."""
        done = subprocess.run(self._ns(*argv), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{argv[:3]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def popen(self, *argv: str, log: Path) -> subprocess.Popen:
        return subprocess.Popen(self._ns(*argv), env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def python(self, code: str, timeout: float = 300) -> Any:
        """Runs Python code in the namespace; it must print one JSON value last, which is returned."""
        done = self.run(str(BIN / "python"), "-c", code, timeout=timeout, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.holder = subprocess.Popen(["unshare", "-n", "--", "sleep", "86400"])
        time.sleep(0.2)
        subprocess.run(["nsenter", "-t", str(self.holder.pid), "-n", "ip", "link", "set", "lo", "up"], check=True)
        self.moto = self.popen(str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(S3_PORT),
                               log=self.work / "moto.log")
        self.mlflow = self.popen(str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(MLFLOW_PORT),
                                 "--backend-store-uri", f"sqlite:///{self.work / 'mlflow.db'}", "--serve-artifacts",
                                 "--artifacts-destination", str(self.work / "mlartifacts"), "--workers", "1",
                                 log=self.work / "mlflow.log")
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--object-store-memory", str(300 << 20),
                  "--disable-usage-stats"]
        self.run(str(BIN / "ray"), "start", "--head", "--port", str(RAY_PORT), "--include-dashboard=false",
                 "--resources", json.dumps({SLOT: 1, "head_node": 1}), *common, timeout=180, check=True)
        # The second node: its own mount namespace, the node-local directory replaced by an empty tmpfs.
        script = (f"mount --make-rprivate / && mount -t tmpfs -o size=1g tmpfs {self.local} && "
                  f"exec {BIN / 'ray'} start --address 127.0.0.1:{RAY_PORT} --resources "
                  f"'{json.dumps({SLOT: 1, 'second_node': 1})}' {' '.join(common)}")
        self.run("unshare", "-m", "bash", "-c", script, timeout=180, check=True)
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        code = ("import json, urllib.request, boto3, ray\n"
                f"urllib.request.urlopen('http://127.0.0.1:{MLFLOW_PORT}/health', timeout=2)\n"
                "boto3.client('s3').list_buckets()\n"
                "ray.init(log_to_driver=False)\n"
                "print(json.dumps(sum(n['Alive'] for n in ray.nodes())))\n")
        while True:
            try:
                if self.python(code, timeout=60) == 2:
                    return
            except (RuntimeError, subprocess.TimeoutExpired, ValueError):
                pass
            if time.time() > deadline:
                raise TimeoutError(f"the 2-node cluster did not come up within {timeout_s} s; see {self.work}/*.log")
            time.sleep(1)

    def node_ids(self) -> dict[str, str]:
        """``{"head": node id, "second": node id}``."""
        code = ("import json, ray\nray.init(log_to_driver=False)\n"
                "print(json.dumps({('head' if 'head_node' in n['Resources'] else 'second'): n['NodeID'] "
                "for n in ray.nodes() if n['Alive']}))")
        return self.python(code)

    def second_node_mount_ns(self) -> str:
        """The mount namespace of the second node's processes (``mnt:[inode]``)."""
        assert self.holder is not None, "cluster not started"
        head = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")
        ns = {os.readlink(f"/proc/{pid}/ns/mnt") for pid in self.pids() if "raylet" in _cmdline(pid)} - {head}
        assert len(ns) == 1, f"expected one raylet in its own mount namespace, found {ns}"
        return ns.pop()

    def pids(self) -> list[int]:
        """Every process in the cluster's network namespace."""
        if self.holder is None:
            return []
        netns = os.readlink(f"/proc/{self.holder.pid}/ns/net")
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/ns/net") == netns:
                        out.append(int(entry))
                except OSError:
                    continue
        return out

    def stop(self) -> None:
        if self.holder is None:
            return
        for _ in range(3):
            for pid in self.pids():
                if pid != self.holder.pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.5)
        self.holder.kill()
        self.holder.wait(10)
        self.holder = None
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
