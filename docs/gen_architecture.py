"""Regenerates the package graph in ``docs/architecture.md`` from the source (``python docs/gen_architecture.py``).

The graph is read by :mod:`facescale.import_graph` (the same graph ``tests/test_architecture.py`` checks for cycles),
written as a Mermaid block between two markers; ``--check`` exits 1 when the file's block differs (the test runs it),
so the picture cannot drift from the code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from facescale.import_graph import import_graph, module_files, package_graph, package_of  # noqa: E402

DOC = ROOT / "docs" / "architecture.md"
BEGIN = "<!-- BEGIN GENERATED: package graph (docs/gen_architecture.py) -->"
END = "<!-- END GENERATED -->"
_SKIP = {"facescale", "__main__", "import_graph"}  # the package root, ``python -m``, and this tooling


def generated_block(root: Path = ROOT / "platform") -> str:
    """The Mermaid graph of sub-package imports and the modules of each package, as Markdown."""
    graph = package_graph(import_graph(root))
    lines = [BEGIN, "", "```mermaid", "graph TD"]
    for source in sorted(graph):
        if source in _SKIP:
            continue
        for target in sorted(graph[source] - _SKIP):
            lines.append(f"  {source} --> {target}")
    # Module names, not line counts: the block changes when the package's shape does, not with every edit.
    lines += ["```", "", "| package | modules |", "|---|---|"]
    members: dict[str, list[str]] = {}
    for module in module_files(root):
        members.setdefault(package_of(module), []).append(module.rsplit(".", 1)[-1])
    for package in sorted(set(members) - _SKIP):
        names = sorted(n for n in members[package] if n != package) or [package]
        lines.append(f"| `{package}` | {', '.join(names)} |")
    return "\n".join([*lines, "", END])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/architecture.md is out of date")
    args = parser.parse_args(argv)
    text = DOC.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    fresh = text[:start] + generated_block() + text[end:]
    if args.check:
        if fresh != text:
            print(f"{DOC} is out of date: run python docs/gen_architecture.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(fresh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
