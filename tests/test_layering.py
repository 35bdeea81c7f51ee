"""The package's layers point one way (docs/DESIGN.md, "Layers"): every import of one top-level part of osserve
by another, module-level or inside a function, goes down this list, so no two parts import each other."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "osserve"

# Bottom first. A part may import the parts of lower layers (and its own), never those of its layer or above.
LAYERS = [
    {"paths", "config", "harmony"},
    {"structured", "parallel", "kernels", "flags"},
    {"sampling_params"},
    {"layers"},
    {"model"},
    {"engine"},
    {"distributed"},
    {"server", "llm"},
    {"disagg"},
    {"serve", "bench", "cli", "__init__"},
    {"__main__"},
]


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports() -> dict[tuple[str, str], set[str]]:
    """(importing part, imported part) -> the files where that import stands."""
    found: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _part(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = (
                    [node.module] if node.module != "osserve" else [f"osserve.{a.name}" for a in node.names]
                )
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "osserve" and len(parts) > 1 and parts[1] != "__version__" and parts[1] != src:
                    found[(src, parts[1])].add(str(path.relative_to(PACKAGE.parent)))
    return found


def test_every_part_has_a_layer():
    parts = {_part(p) for p in PACKAGE.rglob("*.py")}
    placed = set().union(*LAYERS)
    assert parts <= placed, f"parts of osserve in no layer of LAYERS: {sorted(parts - placed)}"


def test_imports_point_down():
    level = {part: i for i, layer in enumerate(LAYERS) for part in layer}
    upward = [
        f"{a} (layer {level[a]}) imports {b} (layer {level[b]}) in {', '.join(sorted(files))}"
        for (a, b), files in sorted(_imports().items())
        if a in level and b in level and level[b] >= level[a]
    ]
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_no_import_cycle_between_parts():
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in _imports():
        graph[a].add(b)

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = {" -> ".join(c) for part in list(graph) if (c := cycle_from(part))}
    assert not cycles, "import cycles between parts of osserve:\n" + "\n".join(sorted(cycles))
