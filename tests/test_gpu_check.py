"""benchmarks/gpu_check.py in its CPU mode, where the GPU machine's bare image would run it: without Ray, MLflow,
DeepSpeed, DALI and the other packages that image lacks (made unimportable here by a ``sitecustomize`` first on
``PYTHONPATH``). The GPU numbers themselves need a GPU; this proves the script's code runs and checks what it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Not on the bare GPU image (torch, numpy, Pillow, OpenCV, onnxruntime + the small wheels BENCHMARKS.md brings).
ABSENT = ("ray", "mlflow", "deepspeed", "nvidia", "matplotlib", "boto3", "botocore", "moto", "sklearn", "scipy",
          "pandas", "psutil")


def _bare_env(tmp_path: Path) -> dict[str, str]:
    blocker = tmp_path / "bare"
    blocker.mkdir()
    # None in sys.modules: `import x` raises ImportError and importlib.util.find_spec("x") is None, exactly as where
    # x is not installed (torch probes optional packages with find_spec).
    (blocker / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({ABSENT!r}))\n")
    return {**os.environ, "PYTHONPATH": str(blocker), "CUDA_VISIBLE_DEVICES": ""}


def test_gpu_check_runs_its_checks_on_cpu_without_the_cluster_packages(tmp_path: Path):
    env = _bare_env(tmp_path)
    for name in ("ray", "mlflow", "deepspeed", "nvidia.dali", "matplotlib"):  # the block itself works
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr, (name, probe.stderr[-500:])
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--results", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "gpu_check_cpu_tiny.json").read_text())
    checks = {r["check"].split(":")[0].split(" (")[0]: r for r in result["checks"]}
    assert result["all_checks_ok"] and all(r["ok"] for r in result["checks"]), result["checks"]
    step = checks["real step"]
    assert len(step["losses"]) == 8 and step["losses"][-1] < step["losses"][0]
    assert checks["collective helpers on the group's devices"]["groups"]["default"]["host_values_on"] == "cpu"
    assert checks["host syncs per step"]["syncs_per_step"] is None  # counted with CUDA's sync debug mode only
    assert "checkpoint_00000002" in checks["checkpoint save -> load round trip"]["summary"]
    rows = result["throughput"]["backbones"] + result["throughput"]["partial_fc"]
    assert rows and all("error" not in r for r in rows), rows
    assert not (REPO / "benchmarks" / "results" / "gpu_check_cpu_tiny.json").exists()  # --results kept it out
