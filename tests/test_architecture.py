"""The package's shape, read from the source: no import cycle, boto3 behind facescale.storage, the picture fresh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from facescale.import_graph import cycles, external_imports, import_graph, package_graph

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ROOT / "platform"


def test_cycle_finder_finds_a_planted_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "facescale"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from facescale.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from facescale.sub.a import x\n")
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\n"
                                      "if TYPE_CHECKING:\n    from facescale.sub import a\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["facescale.sub.a", "facescale.sub.b"]]
    assert graph["facescale.sub.c"] == set(), "annotation-only imports never run"


def test_no_import_cycle_anywhere_in_the_package() -> None:
    found = cycles(import_graph(PLATFORM))
    assert found == [], f"import cycles (function-level imports count): {found}"


def test_only_the_s3_backend_imports_boto3_and_models_heads_eval_stay_light() -> None:
    external = external_imports(PLATFORM)
    boto = sorted(m for m, names in external.items() if names & {"boto3", "botocore", "s3transfer"})
    assert boto == ["facescale.storage.s3"]
    heavy = sorted(m for m, names in external.items() if names & {"ray", "mlflow", "boto3"}
                   and m.split(".")[1] in ("models", "heads", "eval", "storage") and m != "facescale.storage.s3")
    assert heavy == [], f"models/, heads/, eval/ import Ray, MLflow or boto3: {heavy}"
    inward = sorted(m for m, targets in import_graph(PLATFORM).items() if m.startswith("facescale.storage")
                    for t in targets if not t.startswith("facescale.storage"))
    assert inward == [], f"facescale.storage depends on nothing else of the package: {inward}"


# docs/architecture.md, "Packages and what each may import": sub-package -> the sub-packages it may import.
MAY_IMPORT = {
    "storage": set(), "trees": set(), "console": set(), "models": set(), "heads": set(),
    "parallel": {"heads"},
    "data": {"storage", "facescale"},  # facescale: the package version in manifests
    "eval": {"data"},
    "checkpoint": {"storage", "parallel"},
    "tracking": {"checkpoint", "console", "models"},
    "train": {"checkpoint", "config", "console", "data", "eval", "heads", "models", "parallel", "storage", "tracking",
              "trees"},
}


def test_packages_import_only_what_the_architecture_allows() -> None:
    graph = package_graph(import_graph(PLATFORM))
    outside = {pkg: sorted(graph.get(pkg, set()) - allowed) for pkg, allowed in MAY_IMPORT.items()}
    assert {pkg: extra for pkg, extra in outside.items() if extra} == {}, "see docs/architecture.md"


def test_architecture_doc_graph_is_generated_from_this_code() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_architecture.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
