"""The recipes' command lines are what users know: every flag, alias, default, choice, help
text and group of every recipe equals the snapshot in tests/data/recipe_flags.json (rewrite it
with ``python tests/recipe_flags.py`` only for a change meant to reach users)."""

from __future__ import annotations

import json

import pytest

from recipe_flags import RECIPES, SNAPSHOT, describe, recipe


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_offers_the_flags_of_the_snapshot(name):
    want = json.loads(SNAPSHOT.read_text())[name]
    parser = recipe(name).build_parser()
    assert parser.description == want["description"]
    got = describe(parser)
    assert [a["dest"] for a in got] == [a["dest"] for a in want["arguments"]], f"{name}: the arguments or their order differ"
    for have, expected in zip(got, want["arguments"]):
        assert have == expected, f"{name}: {expected['dest']} differs"
