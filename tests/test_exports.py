"""Exports in timm's own layout: ``save_for_timm`` writes what ``timm.create_model("local-dir:PATH",
pretrained=True)`` loads, for three timm families; ``load_model`` reads it too."""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch

import subspaces as ss
from subspaces.errors import CheckpointError, ConfigError
from subspaces.io import load_model, load_model_with_spec, save_for_timm

FAMILIES = {
    "test_resnet": {},
    "test_vit": {"img_size": 32},   # a model kwarg that must survive local-dir loading
    "test_convnext": {},
}


def _spec(name: str, kwargs: dict, point: str) -> dict:
    return {"model": name, "num_classes": 7, "in_chans": 1, "model_kwargs": kwargs, "img_size": 32,
            "mean": [0.2860], "std": [0.3530], "dataset": "fashion-mnist", "point": point}


def _exported(name: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=7, in_chans=1, **kwargs)
    line = ss.Line(net, seed=0)
    return line.export(0.3).eval()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_local_dir_loads_the_exported_point(name, tmp_path):
    kwargs = FAMILIES[name]
    point = _exported(name, kwargs)
    folder = save_for_timm(point, tmp_path / "centre", _spec(name, kwargs, "t=0.3"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert type(loaded) is type(point)
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), point(x))
        assert torch.equal(load_model(folder).eval()(x), point(x))
    cfg = loaded.pretrained_cfg
    assert tuple(cfg["input_size"]) == (1, 32, 32)
    assert list(cfg["mean"]) == [0.2860] and list(cfg["std"]) == [0.3530]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == 7
    assert config["subspaces"]["model"] == name and config["subspaces"]["point"] == "t=0.3"
    assert config["subspaces"]["model_kwargs"] == kwargs


def test_vit_img_size_survives_local_dir(tmp_path):
    # timm reads config.json's model_args and passes them to the model: img_size 32, not its default
    point = _exported("test_vit", {"img_size": 32})
    folder = save_for_timm(point, tmp_path / "vit", _spec("test_vit", {"img_size": 32}, "centre"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_args"]["img_size"] in (32, [32, 32]) and config["model_args"]["in_chans"] == 1
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert tuple(loaded.patch_embed.img_size) == (32, 32)
    assert timm.create_model("test_vit").patch_embed.img_size != (32, 32)
    assert loaded.pos_embed.shape == point.pos_embed.shape
    assert tuple(load_model(folder).patch_embed.img_size) == (32, 32)


def test_run_folder_resolves_to_a_timm_centre_export(tmp_path):
    point = _exported("test_resnet", {})
    save_for_timm(point, tmp_path / "run" / "exports" / "centre", _spec("test_resnet", {}, "centre"))
    model, spec = load_model_with_spec(tmp_path / "run")
    assert spec["point"] == "centre" and isinstance(model, torch.nn.Module)


def test_a_folder_timm_itself_wrote_loads(tmp_path):
    point = _exported("test_resnet", {})
    timm.models.save_for_hf(point, str(tmp_path / "hf"), model_args={"num_classes": 7, "in_chans": 1}, safe_serialization=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "hf").eval()(x), point(x))


def test_bad_spec_and_damaged_weights(tmp_path):
    point = _exported("test_resnet", {})
    with pytest.raises(ConfigError, match="in_chans"):
        save_for_timm(point, tmp_path / "a", {"model": "test_resnet", "num_classes": 7})
    with pytest.raises(ConfigError, match="classes"):
        save_for_timm(point, tmp_path / "a", {**_spec("test_resnet", {}, "centre"), "num_classes": 3})
    folder = save_for_timm(point, tmp_path / "b", _spec("test_resnet", {}, "centre"))
    torch.manual_seed(5)
    other = save_for_timm(timm.create_model("test_resnet", num_classes=7, in_chans=1), tmp_path / "c", _spec("test_resnet", {}, "centre"))
    shutil.copy(other / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model(folder)


def test_recipe_exports_timm_folders_and_trains_with_layer_decay(tmp_path):
    from helpers import TINY, recipe_cmd, run

    out = tmp_path / "line"
    res = run(recipe_cmd("train.py", "--subspace", "line", *TINY, "--epochs", "1", "--opt", "lamb", "--lr", "0.01",
                         "--layer-decay", "0.75", "--output", out))
    assert res.rc == 0, res.explain()
    info = json.loads((out / "subspace.json").read_text())
    assert info["subspace"]["layout"] == "per_parameter", info
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    for point in ("centre", "anchor0", "anchor1"):
        folder = out / "exports" / point
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        plain = load_model(folder.with_suffix(".safetensors")).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), plain(x)), point
    bad = run(recipe_cmd("train.py", *TINY, "--epochs", "1", "--layer-decay", "1.5", "--output", tmp_path / "bad"))
    assert bad.rc == 2 and "--layer-decay must be in (0, 1]" in bad.stderr, bad.explain()
