"""Anchors learned from scratch are drawn with the network's own initialisation, through timm's
public API only: a model that initialises in ``__init__`` (ConvNeXt) is built again, with the
kwargs it was built with when the recipe knows them."""

from __future__ import annotations

import ast
from pathlib import Path

import timm
import torch

import subspaces as ss
from subspaces.init import reinitialize
from subspaces.models import create_timm_model, wrap_subspace

PACKAGE = Path(__file__).resolve().parents[1] / "subspaces"


def _head_std(model: torch.nn.Module) -> float:
    return float(model.head.fc.weight.detach().std())


def test_a_convnext_anchor_keeps_its_own_head_init_scale():
    """ConvNeXt scales its head's initial weights by ``head_init_scale``; a from-scratch anchor of
    a run built with head_init_scale 0.01 has a head 100x smaller than a default ConvNeXt's."""
    args = ss.TrainRunConfig(model="test_convnext", model_kwargs={"head_init_scale": 0.01}, subspace="line")
    torch.manual_seed(0)
    model, kwargs = create_timm_model(args, num_classes=10, in_chans=3)
    assert kwargs == {"head_init_scale": 0.01}
    sub = wrap_subspace(args, model)
    own = _head_std(model)
    for k in range(sub.num_anchors):
        anchor = sub.anchor(k)
        assert not torch.equal(anchor.head.fc.weight, model.head.fc.weight)
        assert 1 / 1.5 < _head_std(anchor) / own < 1.5, f"anchor {k}: head std {_head_std(anchor)} vs the model's {own}"
    default = timm.create_model("test_convnext", num_classes=10)
    assert _head_std(default) > 20 * own


def test_reinitialize_rebuilds_a_convnext_as_told():
    torch.manual_seed(0)
    model = timm.create_model("test_convnext", num_classes=10, head_init_scale=0.01)
    before = model.head.fc.weight.detach().clone()
    reinitialize(model, rebuild=lambda: timm.create_model("test_convnext", num_classes=10, head_init_scale=0.01))
    assert not torch.equal(model.head.fc.weight, before)
    assert 1 / 1.5 < _head_std(model) / float(before.std()) < 1.5
    reinitialize(model)   # no rebuild given: timm's own architecture with its default head_init_scale 1
    assert _head_std(model) > 20 * float(before.std())


def test_no_module_imports_a_private_timm_module():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names] if isinstance(node, ast.Import) else []
            private = [n for n in names if n.startswith("timm") and any(part.startswith("_") for part in n.split("."))]
            assert not private, f"{path.name} imports timm's private module(s) {private}"
