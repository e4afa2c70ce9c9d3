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


def test_a_new_default_keeps_the_help_and_flag_declared_once():
    from dataclasses import dataclass, fields

    import subspaces as ss
    from subspaces.cli_flags import OPTIM, build_flags
    from subspaces.settings_base import flag_of, new_default

    @dataclass(kw_only=True)
    class Slow(ss.TrainConfig):
        lr: float = new_default(0.001, why="slow")
        opt: str = new_default("adamw", why="as the paper")

    by_name = {f.name: f for f in fields(Slow)}
    base = {f.name: f for f in fields(ss.TrainConfig)}
    assert Slow().lr == 0.001 and ss.TrainConfig().lr == 0.05
    assert flag_of(by_name["lr"]).help == flag_of(base["lr"]).help
    text = build_flags(Slow, None, OPTIM).format_help()
    assert "(default: adamw, as the paper)" in " ".join(text.split())
    assert build_flags(Slow, None, OPTIM).parse_args(["-b", "8"]).batch_size == 8


def test_a_new_default_needs_the_annotation_and_a_base_that_declares_it():
    from dataclasses import dataclass

    import subspaces as ss
    from subspaces.settings_base import new_default

    with pytest.raises(TypeError, match="annotate"):
        class Bare(ss.TrainConfig):
            lr = new_default(0.1)
    with pytest.raises(TypeError, match="a base class that declares nothing_like_this"):
        @dataclass(kw_only=True)
        class Unknown(ss.TrainConfig):
            nothing_like_this: int = new_default(1)


def test_every_setting_of_every_recipe_has_a_flag_with_help():
    from dataclasses import fields

    import subspaces as ss
    from subspaces.settings_base import flag_of

    for cls in (ss.TrainRunConfig, ss.ConnectConfig, ss.SPROConfig, ss.ComplexConfig, ss.FGEConfig, ss.SSEConfig, ss.CompareConfig):
        for f in fields(cls):
            assert flag_of(f) is not None and flag_of(f).help_text(), f"{cls.__name__}.{f.name} has no flag or no help"


def test_a_layout_naming_an_unknown_or_repeated_setting_is_refused():
    import subspaces as ss
    from subspaces.cli_flags import OPTIM, build_flags, group

    with pytest.raises(ValueError, match="no setting 'model'"):
        build_flags(ss.TrainConfig, None, group("x", "model"))
    with pytest.raises(ValueError, match="'lr' is in two groups"):
        build_flags(ss.TrainConfig, None, OPTIM, group("again", "lr"))
