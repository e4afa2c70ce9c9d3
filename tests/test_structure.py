"""The package's shape: module imports read top to bottom (no cycles), function-level imports
only for heavy optional dependencies, and analysis scripts that use the public API alone."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "subspaces"
#: third-party imports that stay inside functions: torchmetrics costs seconds at import
LAZY_ALLOWED = {"torchmetrics", "torchvision", "PIL", "timm", "rich", "accelerate", "fcntl", "yaml", "matplotlib", "scipy"}


def _module_name(path: Path) -> str:
    """``align.spec`` for ``subspaces/align/spec.py``; a package is named by its folder."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> list[Path]:
    """Every module of the package, subpackages included (not the package's own ``__init__``)."""
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def _package_imports(path: Path) -> tuple[set[str], list[str]]:
    """(subspaces modules imported at module level, relative imports found inside functions);
    ``from .x import y`` in ``align/spec.py`` is ``align.x``, ``from ..x import y`` is ``x``, and a
    name imported from a package (``from . import spec``) counts as its module when it is one."""
    tree = ast.parse(path.read_text())
    here = _module_name(path).split(".")
    base = here if path.name == "__init__.py" else here[:-1]
    known = {_module_name(p) for p in _modules()}
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            if node.module:
                names = [".".join([*anchor, node.module])]
            else:
                names = [".".join([*anchor, a.name]) for a in node.names]
            names = [n if n in known else n.rsplit(".", 1)[0] if "." in n and n.rsplit(".", 1)[0] in known else n for n in names]
            for name in names:
                (top.add(name) if node in tree.body else nested.append(name))
    return top, nested


def test_no_import_cycles_and_no_function_level_package_imports():
    graph, nested = {}, {}
    for path in _modules():
        top, inner = _package_imports(path)
        name = _module_name(path)
        graph[name] = top - {name}
        if inner:
            nested[name] = inner
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


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses(text: str) -> list[str]:
    """Private names a script imports from subspaces, or reads / writes as attributes (``x._y``,
    ``getattr(x, "_y")``): on the library's objects, its modules, or a sibling script's."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("subspaces"):
            found += [f"line {node.lineno}: imports {a.name} from {node.module}" for a in node.names if _private(a.name)]
        if isinstance(node, ast.Attribute) and _private(node.attr):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in {"getattr", "setattr", "hasattr", "delattr"}
                and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and _private(str(node.args[1].value))):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_analysis_scripts_use_the_public_api():
    for path in sorted((REPO / "analysis").glob("*.py")):
        text = path.read_text()
        assert "sys.path" not in text, f"{path.name} edits sys.path: the installed package is what it imports"
        assert not _private_uses(text), f"{path.name} uses private names: {_private_uses(text)}"


def test_the_public_api_check_catches_private_uses():
    for source in ("t.setup()\nt._train_epoch(0)\n", "core._POOLING = False\n", "n = getattr(line, '_steps')\n",
                   "from subspaces.subspace import _Pool\n"):
        assert _private_uses(source), source
    assert not _private_uses("t.setup()\nt.train_epoch(0)\nsuper().__init__()\nfrom subspaces import Line\n")


def test_analysis_scripts_run_as_scripts_from_any_folder(tmp_path):
    """`python analysis/X.py` finds its sibling `common` and the installed package, wherever it starts."""
    import subprocess
    import sys

    from helpers import recipe_env

    for name in ("curve", "plane", "line", "ensembles"):
        res = subprocess.run([sys.executable, str(REPO / "analysis" / f"{name}.py"), "--help"], cwd=tmp_path, env=recipe_env(),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "usage:" in res.stdout, f"{name}.py: {res.stderr[-2000:]}"


#: the application layer: command-line parsing, YAML flags, the process entry points
APP_MODULES = {"cli", "cli_flags", "compare_worker"}


def _imports_argparse(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names)
               or isinstance(node, ast.ImportFrom) and node.module == "argparse" for node in ast.walk(tree))


def test_the_library_knows_nothing_of_the_command_line():
    """Only the application layer parses flags; no library module imports it or argparse."""
    for path in _modules():
        if _module_name(path) in APP_MODULES:
            continue
        top, _ = _package_imports(path)
        assert not top & APP_MODULES, f"{path.name} imports the command-line layer {sorted(top & APP_MODULES)}"
        assert not _imports_argparse(path), f"{path.name} imports argparse: take a settings class of subspaces.settings instead"


def _recipe(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"structure_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: the regularisers of the training loop, which only the recipes that learn a subspace from scratch offer
REGULARISERS = {"beta", "beta_params", "volume_lambda", "volume_form", "samples_per_step"}
RECIPE_SETTINGS = {   # recipe: its settings class, the fewest flags it runs with, the same as fields, fields it does not offer
    "train": ("TrainRunConfig", [], {}, set()),
    "connect": ("ConnectConfig", ["a", "b"], {"model_a": "a", "model_b": "b"}, REGULARISERS),
    "simplex": ("SPROConfig", ["a"], {"checkpoints": ["a"]}, {"beta", "beta_params"}),
    "complex": ("ComplexConfig", ["a", "b"], {"checkpoints": ["a", "b"]}, {"beta", "beta_params"}),
    "fge": ("FGEConfig", ["a", "--cycle", "2"], {"checkpoint": "a", "cycle": 2.0}, REGULARISERS),
    "sse": ("SSEConfig", ["--cycle", "2"], {"cycle": 2.0}, REGULARISERS),
    "compare": ("CompareConfig", [], {}, REGULARISERS),
}


def test_every_flag_is_a_settings_field_with_the_same_default():
    """A recipe's flags are its settings class's fields, one for one, with equal defaults: what
    the command line runs is what the same settings run from Python."""
    import subspaces as ss
    from subspaces import cli

    for name, (cls_name, argv, fields, not_offered) in RECIPE_SETTINGS.items():
        cls = getattr(ss, cls_name)
        parser = _recipe(name).build_parser()
        flags = set(vars(parser.parse_args(argv)))
        assert flags == cls.field_names() - not_offered, (f"{name}: flags without a field {sorted(flags - cls.field_names())}, "
                                                          f"fields without a flag {sorted(cls.field_names() - not_offered - flags)}")
        assert cli.parse(parser, argv, cls) == cls(**fields), f"{name}: the flags' defaults differ from {cls_name}'s"


def test_no_module_imports_a_private_name_of_another():
    """A name another module needs is public: ``from .x import _y`` is refused inside the package,
    and so is any import of another library's private module (``timm.models._x``)."""
    found = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level >= 1:
                    found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names if _private(a.name)]
                elif node.module and any(_private(part) for part in node.module.split(".")):
                    found.append(f"{path.name}:{node.lineno} imports from {node.module}")
                elif node.module:
                    found += [f"{path.name}:{node.lineno} imports {a.name} from {node.module}" for a in node.names if _private(a.name)]
            if isinstance(node, ast.Import):
                found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names if any(_private(p) for p in a.name.split("."))]
    assert not found, found
