"""The package's shape: module imports read top to bottom (no cycles), function-level imports
only for heavy optional dependencies, and analysis scripts that use the public API alone."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "subspaces"
#: third-party imports that stay inside functions: torchmetrics costs seconds at import
LAZY_ALLOWED = {"torchmetrics", "torchvision", "PIL", "timm", "rich", "accelerate", "fcntl", "yaml", "matplotlib", "scipy"}


def _package_imports(path: Path) -> tuple[set[str], list[str]]:
    """(subspaces modules imported at module level, relative imports found inside functions)."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            target = "top" if node in tree.body else "nested"
            for name in names:
                (top.add(name.split(".")[0]) if target == "top" else nested.append(name))
    return top, nested


def test_no_import_cycles_and_no_function_level_package_imports():
    graph, nested = {}, {}
    for path in PACKAGE.glob("*.py"):
        top, inner = _package_imports(path)
        graph[path.stem] = top
        if inner:
            nested[path.stem] = inner
    assert not nested, f"package modules imported inside functions (import them at the top): {nested}"
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt in graph and state.get(nxt) is None:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in graph:
        if state.get(module) is None:
            visit(module, [module])


def test_analysis_scripts_use_the_public_api():
    for path in sorted((REPO / "analysis").glob("*.py")):
        text = path.read_text()
        assert "sys.path" not in text, f"{path.name} edits sys.path: the installed package is what it imports"
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("subspaces"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private names {private} from {node.module}"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                assert node.attr not in {"_groups", "_fixed", "_mix", "_materialize"}, f"{path.name} reads the private {node.attr}"


def test_analysis_scripts_run_as_scripts_from_any_folder(tmp_path):
    """`python analysis/X.py` finds its sibling `common` and the installed package, wherever it starts."""
    import subprocess
    import sys

    from helpers import recipe_env

    for name in ("curve", "plane", "line", "ensembles"):
        res = subprocess.run([sys.executable, str(REPO / "analysis" / f"{name}.py"), "--help"], cwd=tmp_path, env=recipe_env(),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "usage:" in res.stdout, f"{name}.py: {res.stderr[-2000:]}"
