"""The package layering (docs/architecture.md), checked on the source: every import of ours, function-level
ones included, goes to the same layer or a lower one, and no chain of imports between our modules comes
back to where it started.

    engine  <  backbones  <  segmentation  <  detection  <  tools

`engine` is infrastructure and imports nothing of ours; `segmentation` holds the instance-mask parts that
need no detector, and `detection` composes them into Mask R-CNN, so the two import in one direction only.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"engine": 0, "backbones": 1, "segmentation": 2, "detection": 3, "tools": 4}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path, modules: Set[str]) -> List[Tuple[str, int]]:
    """(module of ours, line) for each import in the file, at any depth: `import a.b`, `from a.b import c`
    (to a.b.c where c is a module, else to a.b) and relative imports resolved against the file's package."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in LAYERS:
                found.append((target, node.lineno))
    return found


def import_graph(root: Path) -> Dict[str, List[Tuple[str, int]]]:
    files = [p for top in LAYERS if (root / top).is_dir() for p in sorted((root / top).rglob("*.py"))]
    modules = {module_name(p, root) for p in files}
    graph = {}
    for path in files:
        edges = []
        for target, line in imports_of(path, root, modules):
            # `import a.b.c` of a name that is not a module of ours: the nearest enclosing module
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules:
                edges.append((target, line))
        graph[module_name(path, root)] = edges
    return graph


def layering_violations(graph) -> List[str]:
    out = []
    for source, edges in graph.items():
        for target, line in edges:
            if LAYERS[target.split(".")[0]] > LAYERS[source.split(".")[0]]:
                out.append(f"{source}:{line} imports {target}, a higher layer")
    return out


def cycles(graph) -> List[List[str]]:
    """Strongly connected components of more than one module (or a module importing itself): Tarjan."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or any(t == v for t, _ in graph.get(v, ())):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(component: List[str], graph) -> str:
    inside = set(component)
    return "; ".join(f"{s}:{line} -> {t}" for s in component for t, line in graph[s] if t in inside)


def test_every_import_goes_to_the_same_layer_or_below():
    assert layering_violations(import_graph(REPO)) == []


def test_no_import_cycles():
    graph = import_graph(REPO)
    assert [describe(c, graph) for c in cycles(graph)] == []


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph(REPO)
    assert any(t == "segmentation.mask_head" for t, _ in graph["detection.mask_rcnn"])
    assert any(t == "detection.rcnn" for t, _ in graph["detection.mask_rcnn"])  # `from .rcnn import`
    assert sum(len(e) for e in graph.values()) > 200


def write(root: Path, files: Dict[str, str]):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize("files, violation", [
    # a lower layer importing a higher one inside a function
    ({"engine/__init__.py": "", "engine/a.py": "def f():\n    from backbones import b\n",
      "backbones/__init__.py": "", "backbones/b.py": ""}, "engine.a:2 imports backbones.b"),
    ({"segmentation/__init__.py": "", "segmentation/m.py": "import detection.rcnn\n",
      "detection/__init__.py": "", "detection/rcnn.py": ""}, "segmentation.m:1 imports detection.rcnn"),
])
def test_checker_finds_a_layering_violation(tmp_path, files, violation):
    write(tmp_path, files)
    assert [v for v in layering_violations(import_graph(tmp_path)) if v.startswith(violation)]


def test_checker_finds_a_cycle_closed_by_a_function_level_relative_import(tmp_path):
    write(tmp_path, {"detection/__init__.py": "", "detection/build.py": "from .weights import load\n",
                     "detection/weights.py": "from .conv import table\n",
                     "detection/conv.py": "def f():\n    from .build import build\n",
                     "detection/other.py": "from detection import build\n"})
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["detection.build", "detection.conv", "detection.weights"]]
    assert "detection.conv:2 -> detection.build" in describe(cycles(graph)[0], graph)
