"""BatchNorm recomputation weights batches by their number of samples ([G]'s ``utils.bn_update``).

With 70 samples in batches of 32 (32, 32, 6), the recomputed statistics of a first BatchNorm layer
(whose input does not depend on any BatchNorm) must be those of the data:
mean_bn = sum_b n_b mean(x_b) / sum_b n_b (the one-pass mean over all 70 samples) and
var_bn = sum_b n_b var_unbiased(x_b) / sum_b n_b; the equal-batch-weight average
(``momentum=None``, ``torch.optim.swa_utils.update_bn``) gives the partial batch 1/3 of the weight.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn as torch_update_bn
from torch.utils.data import DataLoader, TensorDataset

import subspaces as ss
from subspaces.bn import BATCHNORM_TYPES
from subspaces.ensembles import evaluate
from subspaces.pointwise import bn_statistics, point_coefficients

N, BATCH = 70, 32  # batches of 32, 32, 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards on a shared CPU: one intra-op thread is faster; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def conv_net(seed: int = 0) -> nn.Module:
    """conv -> BN -> ReLU -> conv -> BN -> pool -> linear on (B, 3, 8, 8), 3 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=10, in_chans=1)


def loader(n: int = N, shape: tuple[int, ...] = (3, 8, 8), seed: int = 0, batch_size: int = BATCH) -> DataLoader:
    """(x, y) batches; the last 6 samples are shifted so a partial last batch moves the mean a lot."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen) * 1.5 + 0.5
    x[-(n % batch_size or batch_size):] += 2.0
    y = torch.randint(0, 3, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def first_bn(model: nn.Module) -> tuple[str, nn.Module]:
    return next((n, m) for n, m in model.named_modules() if isinstance(m, BATCHNORM_TYPES))


def first_bn_input(model: nn.Module, x: Tensor) -> Tensor:
    """Input of the first BN layer in one train-mode forward of ``x`` (on a copy: buffers untouched)."""
    model = copy.deepcopy(model).train()
    got: list[Tensor] = []
    handle = first_bn(model)[1].register_forward_pre_hook(lambda mod, args: got.append(args[0].detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return got[0]


def channel_mean_var(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance of z: Tensor[B, C, ...] over all dims but 1."""
    flat = z.transpose(0, 1).reshape(z.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=True)


def data_statistics(model: nn.Module, data: DataLoader) -> tuple[Tensor, Tensor, Tensor]:
    """(one-pass mean over all samples, sample-weighted mean of per-batch unbiased variances,
    equal-batch-weight mean of per-batch means) of the first BN layer's input, per channel."""
    xs = [x for x, _ in data]
    mean_all = channel_mean_var(first_bn_input(model, torch.cat(xs)))[0]
    stats = [(len(x), *channel_mean_var(first_bn_input(model, x))) for x in xs]
    total = sum(n for n, _, _ in stats)
    var_w = sum(n * v for n, _, v in stats) / total
    mean_equal = sum(m for _, m, _ in stats) / len(stats)
    return mean_all, var_w, mean_equal


def bn_buffers(model: nn.Module) -> dict[str, Tensor]:
    return {n: b for n, b in model.named_buffers() if "running" in n or "num_batches" in n}


def assert_buffers_close(a: dict[str, Tensor], b: dict[str, Tensor], tol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=tol, rtol=tol)


# --------------------------------------------------------------------------- (a) the data's statistics
@pytest.mark.parametrize("make, shape", [(conv_net, (3, 8, 8)), (resnet, (1, 28, 28))], ids=["conv_net", "test_resnet"])
def test_update_bn_partial_last_batch_gives_the_data_statistics(make, shape):
    data = loader(shape=shape)
    assert [len(x) for x, _ in data] == [32, 32, 6]
    model = make()
    mean_all, var_w, mean_equal = data_statistics(model, data)
    assert (mean_all - mean_equal).abs().max() > 1e-2  # the equal-batch-weight average is far off here
    model.eval()
    ss.update_bn(model, data)
    bn = first_bn(model)[1]
    torch.testing.assert_close(bn.running_mean, mean_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, var_w, atol=1e-5, rtol=1e-5)
    assert int(bn.num_batches_tracked) == 3
    assert bn.momentum == 0.1 and not model.training  # momentum and mode restored


def test_update_bn_weights_by_samples_with_forward_fn_and_dicts():
    data = loader()
    ref = ss.update_bn(conv_net(), data)
    # a custom forward_fn: the size still comes from batch_inputs(batch)
    via_fn = ss.update_bn(conv_net(), data, forward_fn=lambda model, batch: model(batch[0]))
    assert_buffers_close(bn_buffers(via_fn), bn_buffers(ref), tol=1e-6)
    # dict batches, and dict inputs (the first tensor's dim 0)
    dicts = [{"image": x, "label": y} for x, y in data]
    assert_buffers_close(bn_buffers(ss.update_bn(conv_net(), dicts)), bn_buffers(ref), tol=1e-6)
    kwargs = [({"input": x}, y) for x, y in data]
    assert_buffers_close(bn_buffers(ss.update_bn(conv_net(), kwargs)), bn_buffers(ref), tol=1e-6)


def test_update_bn_unknown_batch_size_falls_back_to_equal_weights():
    class Opaque:  # a batch batch_inputs cannot read: only forward_fn knows how to run it
        def __init__(self, x: Tensor) -> None:
            self.x = x

    data = loader()
    got = ss.update_bn(conv_net(), [Opaque(x) for x, _ in data], forward_fn=lambda model, batch: model(batch.x))
    want = conv_net()
    torch_update_bn(data, want)  # equal batch weights (momentum=None)
    assert_buffers_close(bn_buffers(got), bn_buffers(want), tol=1e-6)


# --------------------------------------------------------------------------- (b) equal batches: unchanged
@pytest.mark.parametrize("make, shape", [(conv_net, (3, 8, 8)), (resnet, (1, 28, 28))], ids=["conv_net", "test_resnet"])
def test_update_bn_equal_batches_equal_torch_swa_update_bn(make, shape):
    data = loader(n=64, shape=shape)
    assert [len(x) for x, _ in data] == [32, 32]
    ours, theirs = make(), make()
    ss.update_bn(ours, data)
    torch_update_bn(data, theirs)
    assert_buffers_close(bn_buffers(ours), bn_buffers(theirs), tol=1e-6)


# --------------------------------------------------------------------------- (c) many points in one pass
def test_bn_statistics_and_evaluate_points_equal_update_bn_per_point():
    data = loader(seed=1)
    eval_data = loader(n=40, seed=2)
    sub = ss.Line(conv_net(), seed=0)
    points = [0.2, 0.7]
    states = bn_statistics(sub, point_coefficients(sub, points), data)
    assert states.batches == 3
    metrics = ss.evaluate_points(sub, points, loaders=eval_data, bn_loader=data)
    for i, t in enumerate(points):
        ref = ss.update_bn(sub.export(t), data)
        want = bn_buffers(ref)
        got = {f"{name}.{buf}": v for name, bufs in states.states[i].items() for buf, v in bufs.items()}
        assert_buffers_close(got, want)
        # and they are the data's statistics, not the equal-batch-weight ones
        name, _ = first_bn(ref)
        mean_all, var_w, _ = data_statistics(sub.export(t), data)
        torch.testing.assert_close(got[f"{name}.running_mean"], mean_all, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[f"{name}.running_var"], var_w, atol=1e-5, rtol=1e-5)
        m = evaluate(ref, eval_data)
        assert abs(m["acc"] - float(metrics.acc[i])) < 1e-6
        assert abs(m["nll"] - float(metrics.loss[i])) < 1e-5
