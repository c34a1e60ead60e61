"""The Dockerfile, checked offline (no Docker engine here): pins, CUDA consistency, contents, user, context."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from k8s_validate import CREDENTIAL_NAME, IMAGE_WORKDIR

REPO = Path(__file__).resolve().parents[1]
# What the jobs need inside the image (DESIGN.md layout; pyproject.toml reads requirements.txt and README.md).
NEEDED = ["platform", "jobs", "pipelines", "configs", "pyproject.toml", "requirements.txt", "README.md"]
# Must never be in the build context.
EXCLUDED = [".venv/bin/python", ".git/HEAD", "data/synth/manifest.json", "mlruns.db", "mlartifacts/0/x", "runs/x",
            ".env", "id_rsa", "platform/facescale/__pycache__/cli.cpython-311.pyc"]


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs; joins ``\\`` continuations and drops comments."""
    instructions, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        current += (" " if current else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            word, _, rest = current.partition(" ")
            instructions.append((word.upper(), rest.strip()))
            current = ""
    return instructions


def requirement_pins(path: Path = REPO / "requirements.txt") -> dict[str, str]:
    """``{normalized name: version}`` of the ``name[extras]==version`` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", line.strip())
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(3)
    return pins


def pinned_in(text: str) -> dict[str, str]:
    """``name==version`` tokens written literally in a Dockerfile (a second list of versions)."""
    return {re.sub(r"[-_.]+", "-", m.group(1)).lower(): m.group(2)
            for m in re.finditer(r"\b([A-Za-z0-9][A-Za-z0-9_.-]*)(?:\[[^\]]*\])?==([0-9][^\s\"'\\]*)", text)}


def version_conflicts(dockerfile_text: str, pins: dict[str, str]) -> list[str]:
    """Packages of requirements.txt that the Dockerfile pins itself, with both versions."""
    return [f"{name}: Dockerfile {ver} vs requirements.txt {pins[name]}"
            for name, ver in pinned_in(dockerfile_text).items() if name in pins]


def build_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """Default values of every ``ARG NAME=value``."""
    return dict(a.split("=", 1) for word, a in instructions if word == "ARG" and "=" in a)


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore semantics: the last matching pattern wins, ``!`` re-includes, a pattern matching a
    parent folder matches everything below it, ``*`` stays within one path element and ``**`` spans several."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip().strip("/")
        if pattern and any(regex(pattern).match(p) for p in prefixes):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def instructions(dockerfile: str) -> list[tuple[str, str]]:
    return parse_dockerfile(dockerfile)


def test_no_second_list_of_versions(dockerfile: str) -> None:
    assert version_conflicts(dockerfile, requirement_pins()) == []


def test_version_check_catches_a_disagreeing_pin() -> None:
    pins = requirement_pins()
    bad = 'RUN pip install "torch==2.1.0" nvidia-dali-cuda130==1.0.0 tqdm'
    conflicts = version_conflicts(bad, pins)
    assert [c.split(":")[0] for c in conflicts] == ["torch", "nvidia-dali-cuda130"]


def test_installs_from_requirements_like_make_setup(instructions: list[tuple[str, str]]) -> None:
    runs = " && ".join(a for w, a in instructions if w == "RUN")
    # torch alone first, its pin read from requirements.txt; then the file; then the project without deps.
    assert "grep -E '^torch==' requirements.txt" in runs
    assert runs.index("^torch==") < runs.index("-r requirements.txt")
    assert "DS_BUILD_OPS=0 pip install -r requirements.txt" in runs
    assert re.search(r"pip install --no-deps \.", runs)


def test_cuda_major_agrees_across_base_torch_and_dali(instructions: list[tuple[str, str]]) -> None:
    args = build_args(instructions)
    base = next(a for w, a in instructions if w == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+(?:\.\d+)?-(?:cudnn-)?runtime-ubuntu[\d.]+", base)
    assert m, f"expected a CUDA runtime base image, got {base}"
    torch_cuda = re.search(r"/whl/cu(\d+)$", args["TORCH_INDEX_URL"])
    dali = [name for name in requirement_pins() if name.startswith("nvidia-dali-cuda")]
    assert torch_cuda and len(dali) == 1
    assert m.group(1) == torch_cuda.group(1)[:-1] == dali[0].removeprefix("nvidia-dali-cuda")[:-1]


def test_deepspeed_ops_need_no_compiler_in_the_runtime_base(dockerfile: str,
                                                            instructions: list[tuple[str, str]]) -> None:
    # A -runtime CUDA base has no nvcc (and no C++ compiler), and DS_BUILD_OPS=0 prebuilds nothing: the image works
    # only because FaceScale's DeepSpeed paths load no op (tests/test_engine.py::test_deepspeed_paths_build_no_op).
    # The comment must say so, not that ops are built just in time.
    args = build_args(instructions)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], next(a for w, a in instructions if w == "FROM"))
    runs = " && ".join(a for w, a in instructions if w == "RUN")
    assert "-runtime-" in base and "DS_BUILD_OPS=0" in runs
    comments = " ".join(line.lstrip("# ") for line in dockerfile.splitlines() if line.startswith("#"))
    assert "just in time" not in comments
    assert "none is compiled at run time" in comments


def test_python_matches_pyproject(instructions: list[tuple[str, str]]) -> None:
    requires = re.search(r'requires-python = ">=(\d+\.\d+)', (REPO / "pyproject.toml").read_text())
    assert build_args(instructions)["PYTHON"] == f"python{requires.group(1)}"


def test_copies_what_the_jobs_need(instructions: list[tuple[str, str]]) -> None:
    copied = set()
    for word, args in instructions:
        if word == "COPY":
            copied |= {s.strip("./").rstrip("/") for s in args.split()[:-1] if not s.startswith("--")}
    missing = [p for p in NEEDED if p not in copied]
    assert missing == [], f"Dockerfile does not COPY {missing}"


def test_workdir_is_the_manifests_working_dir(instructions: list[tuple[str, str]]) -> None:
    assert [a for w, a in instructions if w == "WORKDIR"][-1] == IMAGE_WORKDIR


def test_runs_as_numeric_non_root_user(instructions: list[tuple[str, str]]) -> None:
    user = [a for w, a in instructions if w == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER lets Kubernetes verify runAsNonRoot"
    assert "CMD" in [w for w, _ in instructions]


def test_no_credentials_baked_in(instructions: list[tuple[str, str]]) -> None:
    for word, args in instructions:
        if word in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", args) or [args.split()[0]]
            assert not [n for n in names if CREDENTIAL_NAME.search(n)], f"{word} {args}"


def test_dockerignore_keeps_needed_files_and_drops_the_rest() -> None:
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    tracked = subprocess.run(["git", "ls-files", *NEEDED], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert any(f.startswith("platform/facescale/") for f in tracked)
    dropped = [f for f in tracked if dockerignore_excludes(patterns, f)]
    assert dropped == [], f".dockerignore drops files the image needs: {dropped}"
    leaked = [p for p in EXCLUDED if not dockerignore_excludes(patterns, p)]
    assert leaked == [], f".dockerignore lets these into the build context: {leaked}"


def test_dockerignore_matcher_follows_docker_rules() -> None:
    assert dockerignore_excludes(["*", "!jobs/"], "jobs/train.py") is False
    assert dockerignore_excludes(["*", "!jobs/", "**/*.pyc"], "jobs/a/b.pyc") is True
    assert dockerignore_excludes(["data"], "data/synth/x.tar") is True
    assert dockerignore_excludes(["*.md"], "docs/a.md") is False  # `*` does not cross a folder


def test_postgres_driver_for_the_mlflow_server_is_installed() -> None:
    # The gpu-cluster MLflow server stores runs in Postgres: `postgresql://` must resolve to an installed driver
    # (the same requirements.txt goes into the image). No connection is made.
    import sqlalchemy

    engine = sqlalchemy.create_engine("postgresql://mlflow@db.invalid:5432/mlflow")
    assert engine.dialect.driver == "psycopg"
    engine.dispose()
