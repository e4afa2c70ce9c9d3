"""Compiled training: ``--torchcompile`` / ``accelerate launch --dynamo_backend``.

The Trainer's loop runs a compiled model with no recompile for plain networks, lines, simplexes,
layerwise points and mixup; a compiled run stopped and resumed ends bit-identical to one that
was not stopped; the run exports plain timm networks (unwrapped, not the compiled wrapper).

Dynamo's ``eager`` / ``aot_eager`` backends keep these tests short on the CPU: guards and
recompiles are dynamo's, whatever backend runs the graphs (inductor's C++ compile of even
test_resnet takes tens of seconds here; ``analysis/loop_bench.py --compile`` times it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.utils import is_compiled_module
from safetensors import safe_open
from torch.utils.data import TensorDataset

import subspaces as ss
from helpers import TINY, recipe_cmd, run, tiny_resnet_as
from subspaces.checkpoint import latest_checkpoint
from subspaces.compare_run import worker_environment
from subspaces.data import DataBundle
from subspaces.errors import ConfigError

N, BATCH, IMG = 128, 32, 16


def _data() -> DataBundle:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(N, 3, IMG, IMG, generator=g), torch.randint(0, 10, (N,), generator=g))
    return DataBundle(train=ds, eval=ds, holdout=None, bn=ds, num_classes=10, in_chans=3, img_size=IMG, mean=(0.0,) * 3, std=(1.0,) * 3)


def _config(kind: str, backend: str, **extra: Any) -> ss.TrainConfig:
    mix = {"mixup": 0.8, "cutmix": 1.0} if kind == "mixup" else {}
    return ss.TrainConfig(epochs=2, batch_size=BATCH, lr=0.01, cpu=True, seed=0, bn_batches=1, log_interval=2,
                          torchcompile=backend, **mix, **extra)


@pytest.mark.parametrize("kind", ["plain", "line", "simplex", "layerwise", "mixup"])
def test_no_recompile_over_the_trainers_loop(kind, tmp_path):
    """Two epochs of the Trainer, compiled: the first step compiles, no later step recompiles
    (``fail_on_recompile`` raises at any cache miss: a guard on the moving point, grad mode,
    the mixing's constants, the evaluation between the epochs), and evaluation / export see the subspace itself, not the compiled wrapper."""
    def strict_after_the_first_update(trainer: ss.Trainer, update: int) -> None:
        if update == 1:   # the first step compiled every frame; from here on any cache miss raises
            torch.compiler.set_stance("fail_on_recompile")

    torch.compiler.reset()
    trainer = ss.Trainer.create(_config(kind, "eager"), tiny_resnet_as(kind), _data(), output=tmp_path, spec={"num_classes": 10},
                                on_update=strict_after_the_first_update)
    try:
        status = trainer.fit()
    finally:
        torch.compiler.set_stance("default")
        torch.compiler.reset()
    assert status["finished"] and trainer.updates == 2 * N // BATCH
    assert is_compiled_module(trainer.model)
    assert not is_compiled_module(trainer.unwrapped)
    assert isinstance(trainer.unwrapped, ss.Subspace) == (kind != "plain")
    evaluated = set(trainer.history[-1]["eval"])
    assert evaluated == ({"model"} if kind == "plain" else {"centre"})   # a subspace is evaluated as one, BN at the centre


def _weights(trainer: ss.Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}


def test_compiled_resume_is_bit_identical_to_a_compiled_run_without_the_stop(tmp_path):
    """A compiled line stopped after epoch 1 and resumed in a new Trainer (a new compile) ends
    with the same bits as the compiled run that was not stopped; its checkpoints are keyed as
    the eager module's (no ``_orig_mod.``), so they also resume without compiling."""
    torch.compiler.reset()
    data = _data()
    try:
        whole = ss.Trainer.create(_config("line", "aot_eager"), tiny_resnet_as("line"), data, output=tmp_path / "whole")
        whole.fit()
        first = ss.Trainer.create(_config("line", "aot_eager"), tiny_resnet_as("line"), data, output=tmp_path / "cut")
        assert not first.fit(train_epochs=1)["finished"]
        second = ss.Trainer.create(_config("line", "aot_eager"), tiny_resnet_as("line"), data, output=tmp_path / "cut")
        assert second.fit(resume=True)["finished"]
    finally:
        torch.compiler.reset()
    expected, got = _weights(whole), _weights(second)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert whole.history[-1]["train_loss"] == second.history[-1]["train_loss"]
    folder = latest_checkpoint(tmp_path / "cut")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("_orig_mod.") for k in keys)
    eager = ss.Trainer.create(_config("line", None), tiny_resnet_as("line"), data, output=tmp_path / "cut")
    assert eager.fit(resume=True)["finished"]   # nothing left to train: the compiled checkpoint loaded eagerly


def test_recipe_compiles_with_timms_flag_and_with_the_launchers_backend(tmp_path, monkeypatch):
    """``recipes/train.py --torchcompile eager`` and ``accelerate launch --dynamo_backend`` (its
    environment variable) train a line, record the backend in config.yaml and export plain
    networks (the exit status was 2: ``save_for_timm: OptimizedModule is not a timm model``)."""
    flag = run(recipe_cmd("train.py", *TINY, "--subspace", "line", "--epochs", "1", "--torchcompile", "eager",
                          "--output", str(tmp_path / "flag")))
    assert flag.rc == 0, flag.explain()
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")   # what `accelerate launch --dynamo_backend eager` exports
    launched = run(recipe_cmd("train.py", *TINY, "--epochs", "1", "--output", str(tmp_path / "launcher")))
    assert launched.rc == 0, launched.explain()
    for name, export in (("flag", "exports/centre.safetensors"), ("launcher", "model.safetensors")):
        assert (tmp_path / name / export).exists()
        assert "torchcompile: eager" in (tmp_path / name / "config.yaml").read_text()


def test_bad_compile_settings_are_config_errors():
    with pytest.raises(ConfigError, match="not a torch.compile backend"):
        ss.TrainConfig(torchcompile="inductr").validate()
    with pytest.raises(ConfigError, match="needs --torchcompile"):
        ss.TrainConfig(torchcompile_mode="max-autotune").validate()
    with pytest.raises(ConfigError, match="must be one of"):
        ss.TrainConfig(torchcompile="inductor", torchcompile_mode="fast").validate()
    ss.TrainConfig(torchcompile="inductor", torchcompile_mode="max-autotune").validate()


def test_compare_workers_share_one_compile_cache(tmp_path, monkeypatch):
    """Every member's worker compiles into OUT/.compile_cache (only the first member of a kind
    pays the compile), unless the user chose a cache folder."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    env = worker_environment(1, tmp_path)
    assert Path(env["TORCHINDUCTOR_CACHE_DIR"]) == tmp_path / ".compile_cache"
    assert Path(env["TRITON_CACHE_DIR"]) == tmp_path / ".compile_cache" / "triton"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/mine")
    assert worker_environment(1, tmp_path)["TORCHINDUCTOR_CACHE_DIR"] == "/mine"
