"""Shared fixtures for the core tests: small timm models, tiny hand-made nets, anchor setters."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

@pytest.fixture
def make_timm():
    """make_timm(name, seed=0, num_classes=5, **kw) -> a seeded timm model."""

    def make(name: str, seed: int = 0, num_classes: int = 5, **kwargs) -> nn.Module:
        torch.manual_seed(seed)
        return timm.create_model(name, num_classes=num_classes, **kwargs)

    return make


@pytest.fixture
def timm_input():
    """timm_input(model, batch=2, seed=0) -> a random batch at the model's pretrained input size."""

    def make(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, *model.pretrained_cfg["input_size"], generator=gen)

    return make


@pytest.fixture
def small_cnn():
    """small_cnn(seed=0): conv -> BN -> ReLU -> pool -> linear, input (B, 3, 8, 8), 3 outputs."""

    def make(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        )

    return make


@pytest.fixture
def set_anchor():
    """set_anchor(sub, k, values): write a flat vector (subspace parameters, in group order) into anchor k."""

    def write(sub, k: int, values) -> None:
        vec = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        params = sub.anchor_parameters(k)
        assert vec.numel() == sum(p.numel() for p in params), "vector length != subspace size"
        with torch.no_grad():
            offset = 0
            for p in params:
                p.copy_(vec[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    return write
