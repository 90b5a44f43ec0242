"""The code's shape, as the design asks for it: no function over 100 lines, no import cycle in the library (lazy
imports inside functions count), and nothing outside sdxl/ that names a model family's class or module."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sdxl", "training", "sampling")


def library() -> dict[str, ast.Module]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): ast.parse(p.read_text())
            for p in files}


def imports(name: str, tree: ast.Module, modules: set[str]) -> set[str]:
    """The library modules `name` imports anywhere in its body."""
    package = name if name in PACKAGES else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                base = ".".join([package, *([node.module] if node.module else [])])
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in modules and m != name}


def test_no_function_over_100_lines():
    long = [(name, node.name, node.end_lineno - node.lineno + 1) for name, tree in library().items()
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 100]
    assert not long


def test_no_import_cycles():
    mods = library()
    graph = {name: imports(name, tree, set(mods)) for name, tree in mods.items()}
    assert graph["sdxl.model"] >= {"sdxl.pixel", "sdxl.unet"}  # the walk sees real edges
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*path, d])}"
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_only_sdxl_knows_the_families():
    """The loop and generate() go through the bundle's surface: they never import a family's module or class."""
    family_names = {"PixelSDXL", "SDXL", "PixelUNet", "PixelConfig", "DDPMObjective", "JiTObjective"}
    for name, tree in library().items():
        if name.startswith("sdxl"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "sdxl.pixel", name
                assert not family_names & {a.name for a in node.names}, name
            if isinstance(node, ast.Name | ast.Attribute):
                assert getattr(node, "id", getattr(node, "attr", None)) not in family_names, name
