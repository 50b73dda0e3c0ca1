"""The library's import graph has no cycle, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "l2vg_ray"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the l2vg_ray modules it imports anywhere in its body. ``from pkg import x``
    counts as an import of ``pkg.x`` when that is a module, else of ``pkg``."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in mods:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                found = [s for s in subs if s in mods]
                deps.update(found)
                if len(found) < len(subs):
                    deps.add(node.module)
        deps.discard(name)
        graph[name] = {d for d in deps if not name.startswith(d + ".")}  # a package's own init
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, stack + [dep])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_l2vg_ray():
    graph = import_graph()
    assert {"l2vg_ray.method", "l2vg_ray.text_encoders"} <= graph["l2vg_ray.loading"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# docs/architecture.md's floors: a module imports only from its own floor or below.
FLOORS = {
    1: ["config", "registry", "schema", "storage", "dataset", "torch_utils", "models",
        "packaged_data", "tracking", "ray_utils", "testing", "text_encoders", "local_cluster"],
    2: ["method"],
    3: ["generate", "train", "eval", "serve", "embed", "export", "loading", "llm2vec"],
    4: ["pipeline", "submit", "cli", "sources"],
}


def floor_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for floor, names in FLOORS.items():
        if top in names:
            return floor
    raise AssertionError(f"{module} is on no floor: add it to FLOORS and docs/architecture.md")


def test_no_import_points_up_the_floors():
    graph = import_graph()
    up = sorted(
        f"{mod} (floor {floor_of(mod)}) -> {dep} (floor {floor_of(dep)})"
        for mod, deps in graph.items() if mod != "l2vg_ray"
        for dep in deps if dep != "l2vg_ray" and floor_of(dep) > floor_of(mod)
    )
    assert not up, "imports that point up the floors:\n" + "\n".join(up)


def test_the_floor_check_sees_an_upward_import():
    assert floor_of("l2vg_ray.text_encoders.baselines") < floor_of("l2vg_ray.generate.backends")
