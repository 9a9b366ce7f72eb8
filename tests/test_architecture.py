"""The house's shape, read from the source: imports point one way between the rooms of
``src/devicediff`` (docs/architecture.md), and nothing but ``__main__`` imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "src" / "devicediff"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every devicediff module ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("devicediff")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.startswith("devicediff"):
                out.add(base)
                out |= {f"{base}.{a.name}" for a in node.names}
    return out


def _room(module: str) -> str:
    """The room a module lives in: ``devicediff.frameworks.torch.backend`` -> ``frameworks``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "devicediff"


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p) for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for p in PKG.rglob("*.py"):
        src = _module_name(p)
        graph[src] = {m for m in _imports(p) if m in modules and m != src}
    return graph


def room_graph() -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for src, dsts in import_graph().items():
        if src == "devicediff":  # the package's own lazy re-exports (open_store, run_study) are its API
            continue
        rooms.setdefault(_room(src), set()).update(_room(d) for d in dsts if _room(d) not in (_room(src), "devicediff"))
    return rooms


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_circle_between_rooms():
    cycle = find_cycle(room_graph())
    assert cycle is None, "import circle between packages: " + " -> ".join(cycle)


def test_nobody_imports_the_cli():
    offenders = sorted(src for src, dsts in import_graph().items()
                       if "devicediff.cli" in dsts and src != "devicediff.__main__")
    assert offenders == []


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_worker_side_stays_light():
    """What a Chainer environment imports (worker, job, protocol, the registry, the driver, the
    Chainer backend) never imports torch, pandas or the CLI at module level."""
    light = ["worker", "job", "protocol", "errors", "frameworks/__init__", "frameworks/_driver", "workloads/__init__",
             "frameworks/chainer/backend", "frameworks/chainer/lockstep", "frameworks/chainer/common",
             "workloads/prednet/data", "spec", "fingerprint", "frameworks/threads"]
    for name in light:
        tree = ast.parse((PKG / f"{name}.py").read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
        heavy = {m for m in names if m.split(".")[0] in ("torch", "pandas", "matplotlib", "rich", "scipy")}
        assert not heavy, f"{name}.py imports {heavy} at module level"
