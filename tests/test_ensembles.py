import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from subspaces.ensembles import Ensemble, evaluate
from subspaces.metrics import metrics_from_probs


class FixedLogits(nn.Module):
    """Ignores the input's values and returns the same logits row for every example."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


class CountingLoader:
    """Wraps a loader and counts passes (iter calls) and batches drawn."""

    def __init__(self, loader) -> None:
        self.loader, self.passes, self.batches = loader, 0, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        for batch in self.loader:
            self.batches += 1
            yield batch


def _members(seed: int = 0, n: int = 3) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(n)]


def _data(n: int = 37, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_averages_probabilities_not_logits():
    # logit average [0, 0.5, 0] -> argmax 1; probability average ~[0.46, 0.38, 0.16] -> argmax 0
    a, b = FixedLogits([3.0, 0.0, 0.0]), FixedLogits([-3.0, 1.0, 0.0])
    x = torch.zeros(2, 1)
    assert (a(x) + b(x)).argmax(-1).tolist() == [1, 1]
    ensemble = Ensemble([a, b])
    probs = ensemble(x)
    expected = (torch.softmax(a(x), -1) + torch.softmax(b(x), -1)) / 2
    torch.testing.assert_close(probs, expected)
    assert probs.argmax(-1).tolist() == [0, 0]
    assert ensemble.forward_members(x).shape == (2, 2, 3)


def test_lazy_and_offloaded_members_match_in_memory(tmp_path):
    members = _members()
    x = _data()[:][0]
    for m in members:  # give BN non-trivial running statistics
        m.train()(x * 3 + 1)
    reference = Ensemble(members)(x)

    paths = []
    for k, m in enumerate(members):
        paths.append(tmp_path / f"m{k}.pt")
        torch.save(m.state_dict(), paths[-1])
    builds = []

    def load(path):
        builds.append(path)
        fresh = _members(seed=99, n=1)[0]
        fresh.load_state_dict(torch.load(path, weights_only=True))
        return fresh

    factories = [lambda m=m: m for m in members]
    variants = {
        "offload": Ensemble(members, device="cpu", offload=True),
        "factories": Ensemble(factories, offload=True),
        "paths": Ensemble(paths, load_fn=load),
        "paths_offload": Ensemble([str(p) for p in paths], load_fn=load, offload=True),
        "mixed": Ensemble([members[0], factories[1], paths[2]], load_fn=load),
    }
    for name, ensemble in variants.items():
        torch.testing.assert_close(ensemble(x), reference, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ensemble.forward_members(x).mean(0), reference, msg=name)
    assert all(not m.training for m in members)  # members ran in eval mode
    # cached lazy members are built once; offloaded lazy ones are rebuilt per call
    assert builds.count(paths[0]) == 1 and builds.count(str(paths[0])) == 2


def test_path_member_requires_load_fn():
    with pytest.raises(ValueError, match="load_fn"):
        Ensemble(["model.safetensors"])


def test_by_size_prefixes_from_one_pass():
    members = _members()
    ensemble = Ensemble(members)
    loader = CountingLoader(DataLoader(_data(), batch_size=8))
    result = evaluate(ensemble, loader, per_member=True)
    assert loader.passes == 1 and loader.batches == len(loader)
    by_size = result["by_size"]
    assert len(by_size) == 3
    full = evaluate(ensemble, loader)
    alone = evaluate(members[0], loader)
    for key in ("acc", "nll", "ece", "brier", "count"):
        assert by_size[-1][key] == pytest.approx(full[key], rel=1e-6)
        assert result[key] == by_size[-1][key]
        assert by_size[0][key] == pytest.approx(alone[key], rel=1e-6)
    # the members differ, so the prefix metrics are not all equal
    assert by_size[0]["nll"] != pytest.approx(by_size[1]["nll"])
    # each member alone, from the same pass
    assert len(result["members"]) == 3
    for m, metrics in zip(members, result["members"]):
        alone = evaluate(m, loader)
        for key in ("acc", "nll", "ece", "brier", "count"):
            assert metrics[key] == pytest.approx(alone[key], rel=1e-6)


def test_evaluate_known_accuracy_on_synthetic_data():
    # predicts class (x > 0): labels agree on 6 of 8 examples
    class Sign(nn.Module):
        def forward(self, x):
            return torch.stack([-x[:, 0], x[:, 0]], dim=1) * 5

    x = torch.tensor([[1.0], [2.0], [-1.0], [-3.0], [0.5], [-0.5], [4.0], [-2.0]])
    y = torch.tensor([1, 1, 0, 0, 1, 0, 0, 1])
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    result = evaluate(Sign(), loader)
    assert result["acc"] == pytest.approx(6 / 8)
    assert result["count"] == 8
    probs = torch.softmax(Sign()(x), -1)
    assert result == pytest.approx(metrics_from_probs(probs, y))

    dict_loader = [{"image": x[:4], "label": y[:4]}, {"x": x[4:], "y": y[4:]}]
    assert evaluate(Sign(), dict_loader, progress=True) == pytest.approx(result)

    # an ensemble of two copies of the same model gives the same metrics
    assert evaluate(Ensemble([Sign(), Sign()]), loader) == pytest.approx(result)


def test_evaluate_ensemble_of_three_reads_loader_once_and_restores_mode():
    members = _members()
    ensemble = Ensemble(members).train()
    loader = CountingLoader(DataLoader(_data(), batch_size=10))
    evaluate(ensemble, loader, num_classes=3)
    assert loader.passes == 1 and loader.batches == 4
    assert ensemble.training


class TwoProcessAccelerator:
    """Stands in for accelerate.Accelerator on 2 processes holding identical shards:
    gather_for_metrics concatenates every tensor with itself along dim 0."""

    device = torch.device("cpu")
    is_main_process = False

    def __init__(self) -> None:
        self.gathered_shapes = []

    def gather_for_metrics(self, tensors):
        self.gathered_shapes.append(tuple(t.shape for t in tensors))
        return tuple(torch.cat([t, t]) for t in tensors)


def test_evaluate_gathers_along_batch_dim():
    members = _members()
    loader = DataLoader(_data(), batch_size=8)
    expected = evaluate(Ensemble(members), loader, per_member=True)
    accelerator = TwoProcessAccelerator()
    result = evaluate(Ensemble(members), loader, accelerator=accelerator, per_member=True, progress=True)
    assert accelerator.gathered_shapes[0] == ((8, 3, 3), (8,))  # [B, M, C] and [B]
    assert result["count"] == 2 * expected["count"] == 74
    for got, want in zip(result["by_size"], expected["by_size"]):
        assert got["count"] == 2 * want["count"]
        for key in ("acc", "nll", "ece", "brier"):
            assert got[key] == pytest.approx(want[key], rel=1e-6)
