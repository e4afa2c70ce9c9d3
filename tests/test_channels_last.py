"""``--channels-last`` (timm's flag): convolutions in NHWC memory layout, values unchanged.

A subspace binds the 4-D weights of each point as a channels-last copy; its outputs and its
anchors' gradients equal the contiguous subspace's to float tolerance, and its anchors (so its
checkpoints) keep their storage. A channels-last run exports timm folders (safetensors holds
contiguous tensors only) and resumes bit-identically to a channels-last run without the stop.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import subspaces as ss
from helpers import TINY, recipe_cmd, run, tiny_resnet_as
from subspaces.models import channels_last_input, use_channels_last

CL = torch.channels_last


def _pair(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    return tiny_resnet_as(kind), use_channels_last(tiny_resnet_as(kind))


@pytest.mark.parametrize("kind", ["plain", "line", "layerwise", "simplex"])
def test_channels_last_gives_the_same_outputs_and_gradients(kind):
    ref, cl = _pair(kind)
    seen: list[bool] = []
    convs = [m for m in cl.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.is_contiguous(memory_format=CL))) for m in convs]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ref.train()
    cl.train()
    out_ref, out_cl = ref(x), cl(channels_last_input(x))
    torch.testing.assert_close(out_cl, out_ref, rtol=1e-4, atol=1e-5)
    out_ref.square().sum().backward()
    out_cl.square().sum().backward()
    for (name, p), (name_cl, q) in zip(ref.named_parameters(), cl.named_parameters()):
        assert name == name_cl
        scale = float(p.grad.abs().max())   # NHWC kernels sum in another order: float32 rounding, relative to the gradient's size
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")
    for h in hooks:
        h.remove()
    assert seen and all(seen), "every convolution ran on channels-last weights"
    if isinstance(cl, ss.Subspace):   # the anchors keep their storage: checkpoints are unchanged
        assert all(p.is_contiguous() for p in cl.anchors.parameters())
        assert cl.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("subspace", ["none", "line"])
def test_channels_last_run_exports_and_resumes_bit_identically(subspace, tmp_path):
    common = [*TINY, "--epochs", "2", "--subspace", subspace, "--channels-last"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    for cmd in (recipe_cmd("train.py", *common, "--output", full),
                recipe_cmd("train.py", *common, "--output", stopped, "--stop-after-epochs", "1"),
                recipe_cmd("train.py", *common, "--output", stopped, "--resume", stopped)):
        result = run(cmd)
        assert result.rc == 0, result.explain()
    if subspace == "none":
        weights = "model.safetensors"
        loaded = timm.create_model(f"local-dir:{full / 'model'}", pretrained=True)   # timm's own folder
        saved = load_file(str(full / weights))
        assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items() if k in saved)
    else:
        weights = "subspace.safetensors"
        assert (full / "exports" / "centre").exists()
    a, b = load_file(str(full / weights)), load_file(str(stopped / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((full / "results.json").read_text())["results"] == json.loads((stopped / "results.json").read_text())["results"]


@pytest.mark.parametrize("kind", ["plain", "line", "layerwise", "simplex"])
def test_compiled_channels_last_training_matches_eager_channels_last(kind, tmp_path):
    """``--torchcompile`` with ``--channels-last``: AOT autograd's functionalised backward takes
    the channels-last gradients of the mixed weights (a layerwise line writes them piece by piece)
    and trains to the eager channels-last weights, to float tolerance."""
    from torch.utils.data import TensorDataset

    from subspaces.data import DataBundle

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g))
    data = DataBundle(train=ds, eval=ds, holdout=None, bn=ds, num_classes=10, in_chans=3, img_size=16, mean=(0.0,) * 3, std=(1.0,) * 3)
    weights = {}
    try:
        for backend in (None, "aot_eager"):
            config = ss.TrainConfig(epochs=1, batch_size=32, lr=0.01, cpu=True, seed=0, bn_batches=1, channels_last=True,
                                    torchcompile=backend)
            trainer = ss.Trainer.create(config, tiny_resnet_as(kind), data, output=tmp_path / str(backend))
            assert trainer.fit()["finished"]
            weights[backend] = {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items() if v.is_floating_point()}
    finally:
        torch.compiler.reset()
    for name, value in weights[None].items():
        torch.testing.assert_close(weights["aot_eager"][name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
