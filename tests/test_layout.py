"""The house's layout rules, checked from the source: wings import only downward, no import circle, no file over 400 lines.

``detector_core`` has three wings over shared root leaves (``schema``, ``storage``,
``devices``, ``demo``): ``sources`` (what a scan reads) < ``method`` (the detector) <
``tables`` (the output tables and their lifecycle). A module may import the root and its own
wing and the wings below it, never one above. Every import counts, lazy ones and those under
``TYPE_CHECKING`` included: a circle is a circle for a reader even where Python tolerates it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WINGS = ("sources", "method", "tables")  # lowest first
PACKAGES = ("detector_core", "jobs")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports, anywhere in the file (``from pkg import mod`` counts as ``pkg.mod``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    # a package's __init__ importing its own modules is how a package exports them, not a circle
    return {m: {d for d in _imports(p, modules) if d != m and not (m + ".").startswith(d + ".")} for m, p in modules.items()}


def _wing(module: str) -> int | None:
    parts = module.split(".")
    return WINGS.index(parts[1]) if parts[0] == "detector_core" and len(parts) > 2 and parts[1] in WINGS else None


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_wings_import_downward_only():
    graph = _graph()
    assert len([m for m in graph if _wing(m) is not None]) >= 30  # the wings hold the library (a moved file fails here)
    upward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps
              if m.startswith("detector_core") and (d.startswith("jobs") or (_wing(m) or -1) < (_wing(d) or -1))]
    assert not upward, "imports that run upward: " + ", ".join(sorted(upward))


def test_the_wings_are_where_the_docs_say():
    graph = _graph()
    root = sorted(m.split(".")[1] for m in graph if m.count(".") == 1 and m.startswith("detector_core."))
    assert root == ["demo", "devices", "method", "schema", "sources", "storage", "tables"]
    assert not [m for m in graph if m.startswith(("detector_core.schema", "detector_core.storage", "detector_core.devices"))
                and any(d.startswith("detector_core.") for d in graph[m])]  # the shared leaves import nothing of ours


def test_no_file_over_400_lines():
    files = [p for folder in (*PACKAGES, "tests", "bench") for p in (ROOT / folder).rglob("*.py")]
    assert len(files) > 100
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split by responsibility): {long}"


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The rules above are only as good as the import reader: it must see a lazy import and a TYPE_CHECKING one."""
    pkg = tmp_path / "detector_core"
    for wing in WINGS:
        (pkg / wing).mkdir(parents=True)
        (pkg / wing / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "sources" / "a.py").write_text("def f():\n    from detector_core.tables import b\n")
    (pkg / "tables" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from detector_core.sources.a import f\n")
    (tmp_path / "jobs").mkdir()
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    graph = _graph()
    assert graph["detector_core.sources.a"] == {"detector_core.tables.b"}
    assert graph["detector_core.tables.b"] == {"detector_core.sources.a"}
