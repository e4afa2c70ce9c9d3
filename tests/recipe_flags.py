"""The recipes' command lines as data: every argument of every recipe's parser, in the order
``--help`` shows it, with its group, option strings, default, help, choices, nargs, metavar,
const and value type. ``python tests/recipe_flags.py`` writes them to tests/data/recipe_flags.json,
which test_cli_flags.py compares the parsers with."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("train", "connect", "simplex", "complex", "fge", "sse", "compare")
SNAPSHOT = REPO / "tests" / "data" / "recipe_flags.json"


def recipe(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"flags_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def describe(parser: Any) -> list[dict[str, Any]]:
    """One record per argument, grouped and ordered as ``--help`` lists them."""
    out = []
    for group in parser._action_groups:   # noqa: SLF001 - argparse keeps the groups nowhere public
        for action in group._group_actions:   # noqa: SLF001
            kind = type(action).__name__
            value_type = getattr(action.type, "__name__", None) if action.type is not None else None
            out.append({"group": group.title, "option_strings": list(action.option_strings), "dest": action.dest,
                        "action": kind, "default": action.default, "help": action.help,
                        "choices": list(action.choices) if action.choices is not None else None, "nargs": action.nargs,
                        "metavar": list(action.metavar) if isinstance(action.metavar, tuple) else action.metavar,
                        "const": action.const, "type": value_type or ("str" if kind in ("_StoreAction",) else None),
                        "required": action.required})
    return json.loads(json.dumps(out))


def flags_of_every_recipe() -> dict[str, Any]:
    return {name: {"description": recipe(name).build_parser().description,
                   "arguments": describe(recipe(name).build_parser())} for name in RECIPES}


if __name__ == "__main__":
    lines = []
    for name, record in flags_of_every_recipe().items():
        args = ",\n".join("   " + json.dumps(a, ensure_ascii=False) for a in record["arguments"])
        lines.append(f' {json.dumps(name)}: {{"description": {json.dumps(record["description"], ensure_ascii=False)},\n  "arguments": [\n{args}]}}')
    SNAPSHOT.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {SNAPSHOT}", file=sys.stderr)
