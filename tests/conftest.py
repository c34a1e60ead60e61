"""Shared fixtures: environment that keeps Ray and MLflow on this machine, a local Ray head, tiny synthetic shards,
a real S3 API server (moto) and a real `mlflow server`, both on 127.0.0.1."""

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# Keep a local Ray head on the loopback interface, and MLflow servers light.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 identities x 16 images in 4 shards, plus a held-out verification.bin of 60 pairs."""
    from facescale.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, identities=12, images_per_identity=16, seed=0, difficulty=0.2, held_out_identities=10,
               num_pairs=60, samples_per_shard=48, progress=False)
    return root


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray head with 2 CPUs on the loopback interface, for the tests of one module."""
    import ray

    # address="local": a new Ray of its own, even where a ray_current_cluster file names another (or a dead) one.
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with served artifacts (as the cluster's tracking server runs)."""
    from facescale.parallel.dist import free_loopback_port

    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_loopback_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    with (root / "server.log").open("w") as log:
        proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
                                 "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--serve-artifacts",
                                 "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not answer /health within 120 s"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh bucket; endpoint and dummy credentials in the standard AWS variables (subprocesses inherit them)."""
    from facescale import storage

    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    name = "fs-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:50]
    storage.s3_client().create_bucket(Bucket=name)
    return name
