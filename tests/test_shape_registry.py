"""The shape registry: a shape defined here, outside the package, becomes a ``--subspace`` value
by one ``register_shape`` call: the settings accept it, the files save and load it, and
``recipes/train.py`` trains it; names nobody registered keep today's one-line errors."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from torch import nn

import subspaces as ss
from subspaces import io
from subspaces.errors import CheckpointError, ConfigError
from subspaces.settings import SHAPE_NAMES, subspace_choices
from subspaces.shape_registry import ShapeParam, get_shape, register_shape, shape_names, unregister_shape
from subspaces.shapes import Curve

from helpers import REPO


class Cubic(ss.Bezier):
    """The toy shape: a Bezier curve of degree 3 with no flag of its own (K = 4 anchors)."""

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, degree=3, **kwargs)


class Wedge(ss.Simplex):
    """A second toy, not a curve, that reuses the built-in ``--vertices`` flag with its own default."""


@pytest.fixture
def toys():
    """Register the toys for one test, and remove them after it, so no other test sees them."""
    register_shape("cubic", Cubic, curve=True)
    register_shape("wedge", Wedge, curve=False,
                   params=(ShapeParam("vertices", default=4, minimum=3, why="a wedge has at least 3 vertices", help="wedge vertices"),),
                   save=lambda sub: {"vertices": sub.num_anchors})
    yield
    for name in ("cubic", "wedge"):   # a test that failed between its own unregister and register may have removed one
        if name in shape_names():
            unregister_shape(name)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))


SPEC = {"model": "test_resnet", "num_classes": 10, "in_chans": 1}


def test_the_built_in_shapes_are_registered_in_order():
    assert shape_names() == ("line", "bezier", "polychain", "simplex") and SHAPE_NAMES == ("none", *shape_names())
    assert shape_names(curve=True) == ("line", "bezier", "polychain") and shape_names(curve=False) == ("simplex",)
    assert dict(io.SHAPES) == {"line": ss.Line, "bezier": ss.Bezier, "polychain": ss.PolyChain, "simplex": ss.Simplex}
    assert all(get_shape(n).curve == issubclass(io.SHAPES[n], Curve) for n in shape_names())   # what --sampling arc_length checks
    assert ss.TrainRunConfig(subspace="polychain").shape_kwargs() == {"bends": 1}
    assert get_shape("simplex").kwargs_from(ss.TrainRunConfig(subspace="simplex", vertices=5)) == {"vertices": 5}


def test_a_registered_shape_is_a_settings_choice_with_its_own_validation(toys):
    assert subspace_choices()[-2:] == ("cubic", "wedge") and io.SHAPES["cubic"] is Cubic
    assert ss.TrainRunConfig(subspace="cubic", sampling="arc_length").shape_kwargs() == {}
    assert ss.TrainRunConfig(subspace="wedge").shape_kwargs() == {"vertices": 4}
    assert ss.TrainRunConfig(subspace="wedge", vertices=5, volume_lambda=1.0).shape_kwargs() == {"vertices": 5}
    refused = [({"subspace": "cubic", "degree": 3}, "--degree applies to --subspace bezier, not --subspace cubic"),
               ({"subspace": "line", "vertices": 3}, "--vertices applies to --subspace simplex or wedge, not --subspace line"),
               ({"subspace": "wedge", "vertices": 2}, "--vertices 2 is invalid: it must be >= 3 (a wedge has at least 3 vertices)"),
               ({"subspace": "wedge", "sampling": "arc_length"}, "--sampling arc_length is defined for curves: --subspace line, bezier, polychain or cubic"),
               ({"subspace": "cubic", "volume_lambda": 1.0}, "use it with --subspace simplex or wedge"),
               ({"layerwise": True}, "--layerwise needs a --subspace (line, bezier, polychain, simplex, cubic or wedge)")]
    for values, message in refused:
        with pytest.raises(ConfigError, match=re.escape(message)):
            ss.TrainRunConfig(**values)


def test_unregistered_names_are_refused_with_the_registered_ones_listed(toys):
    message = "--subspace 'torus': use one of none, line, bezier, polychain, simplex, cubic, wedge"
    with pytest.raises(ConfigError, match=re.escape(message)):
        ss.TrainRunConfig(subspace="torus")
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_shape("torus")
    unregister_shape("cubic")
    with pytest.raises(ConfigError, match=r"--subspace 'cubic': use one of none, line, bezier, polychain, simplex, wedge$"):
        ss.TrainRunConfig(subspace="cubic")
    register_shape("cubic", Cubic, curve=True)   # the fixture removes it again


def test_names_and_classes_are_one_to_one(toys):
    with pytest.raises(ValueError, match="a shape named 'cubic' is registered already"):
        register_shape("cubic", Wedge, curve=False)
    with pytest.raises(ValueError, match="Cubic is registered already as 'cubic'"):
        register_shape("cubic2", Cubic, curve=True)
    with pytest.raises(ValueError, match="'none' is a standard network"):
        register_shape("none", type("Plain", (ss.Line,), {}), curve=True)

    class Unregistered(ss.Line):
        pass

    with pytest.raises(ConfigError, match="Unregistered is not a registered shape"):   # it would load back as a Line
        io.subspace_spec(Unregistered(_mlp()))


def test_a_registered_shape_saves_and_loads_back(toys, tmp_path):
    import timm

    cubic = Cubic(timm.create_model("test_resnet", num_classes=10, in_chans=1), seed=0)
    cubic.freeze_anchor(0)
    io.save_subspace(cubic, tmp_path / "cubic" / "subspace", SPEC)
    spec = json.loads((tmp_path / "cubic" / "subspace.json").read_text())["subspace"]
    assert spec["shape"] == "cubic" and spec["shape_kwargs"] == {} and spec["frozen"] == [0]
    back = io.load_subspace(tmp_path / "cubic")
    assert type(back) is Cubic and back.num_anchors == 4 and not back.anchor_trainable(0)
    assert all(torch.equal(a, b) for a, b in zip(cubic.state_dict().values(), back.state_dict().values()))

    wedge = Wedge(timm.create_model("test_resnet", num_classes=10, in_chans=1), vertices=3, seed=0)
    wedge.append_centroid_anchor()   # grown after construction: the saved count is the current one
    io.save_subspace(wedge, tmp_path / "wedge" / "subspace", SPEC)
    back = io.load_subspace(tmp_path / "wedge")
    assert type(back) is Wedge and back.num_anchors == 4

    unregister_shape("cubic")   # a file of a shape this process has not registered is refused as before
    with pytest.raises(CheckpointError, match="'subspace' is not a shape this version knows"):
        io.load_subspace(tmp_path / "cubic")
    register_shape("cubic", Cubic, curve=True)


def _train_recipe():
    spec = importlib.util.spec_from_file_location("shape_registry_train", REPO / "recipes" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_registered_shape_trains_through_the_command_line(toys, tmp_path, monkeypatch, capsys):
    """``recipes/train.py --subspace cubic``, in this process (where the toy is registered):
    the flag is offered, the run trains, and its subspace.safetensors loads back as a Cubic."""
    monkeypatch.setenv("SUBSPACES_OFFLINE", "1")
    train = _train_recipe()
    assert "cubic" in train.build_parser().format_help()
    out = tmp_path / "run"
    argv = ["--model", "test_resnet", "--subspace", "cubic", "--epochs", "1", "--train-subset", "64", "--eval-subset", "32",
            "-b", "32", "--bn-batches", "1", "--log-interval", "1000", "--export-format", "safetensors", "--output", str(out)]
    assert train.main(argv) == 0
    spec = json.loads((out / "subspace.json").read_text())["subspace"]
    assert spec["shape"] == "cubic" and spec["shape_kwargs"] == {}
    back = io.load_subspace(out)
    assert type(back) is Cubic and back.num_anchors == 4
    assert (out / "exports" / "centre.safetensors").exists()
