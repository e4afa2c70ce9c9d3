"""Tests for subspaces.data and subspaces.data_sources (Fashion-MNIST discovery, dataset bundles, loaders)."""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from subspaces import data as D
from subspaces import data_sources as S

RAW_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
RAW_SIZES = {
    "train-images-idx3-ubyte": 16 + 60000 * 784,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 784,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}

needs_debian = pytest.mark.skipif(
    not all((S.DEBIAN_FASHION_MNIST_DIR / f"{n}.gz").is_file() for n in RAW_NAMES),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No test sees the developer's own data/cache settings."""
    for var in ("SUBSPACES_DATA", "SUBSPACES_CACHE", "SUBSPACES_OFFLINE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory):
    """A Fashion-MNIST root decompressed once from the Debian files (session-wide)."""
    if not all((S.DEBIAN_FASHION_MNIST_DIR / f"{n}.gz").is_file() for n in RAW_NAMES):
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    cache = tmp_path_factory.mktemp("fmnist-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SUBSPACES_DATA", raising=False)
        mp.setenv("SUBSPACES_CACHE", str(cache))
        mp.setenv("SUBSPACES_OFFLINE", "1")
        root = D.fashion_mnist_root()
    assert root == cache
    return root


def _raw_dir(root: pathlib.Path) -> pathlib.Path:
    return root / "FashionMNIST" / "raw"


def _link_raw(src_root: pathlib.Path, dest_root: pathlib.Path) -> None:
    raw = _raw_dir(dest_root)
    raw.mkdir(parents=True)
    for n in RAW_NAMES:
        os.symlink(_raw_dir(src_root) / n, raw / n)


# --------------------------------------------------------------------------- #
# Discovery
# --------------------------------------------------------------------------- #
@needs_debian
def test_debian_files_decompressed_once_into_cache(tmp_path, monkeypatch):
    from torchvision.datasets import FashionMNIST

    cache = tmp_path / "cache"
    monkeypatch.setenv("SUBSPACES_CACHE", str(cache))
    monkeypatch.setenv("SUBSPACES_OFFLINE", "1")  # must not need the network

    root = D.fashion_mnist_root()
    assert root == cache
    raw = _raw_dir(cache)
    for n in RAW_NAMES:
        assert (raw / n).stat().st_size == RAW_SIZES[n]
    assert not list(raw.glob("*.tmp")), "temporary files left behind"
    assert len(FashionMNIST(str(root), train=True, download=False)) == 60000
    assert len(FashionMNIST(str(root), train=False, download=False)) == 10000

    before = {n: ((raw / n).stat().st_mtime_ns, (raw / n).stat().st_ino) for n in RAW_NAMES}
    assert D.fashion_mnist_root() == cache
    after = {n: ((raw / n).stat().st_mtime_ns, (raw / n).stat().st_ino) for n in RAW_NAMES}
    assert before == after, "second call rewrote the cached files"


def test_cache_location_defaults_to_xdg(fmnist_root, tmp_path, monkeypatch):
    _link_raw(fmnist_root, tmp_path / "xdg" / "subspaces")
    monkeypatch.setattr(S, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("SUBSPACES_OFFLINE", "1")
    assert D.fashion_mnist_root() == tmp_path / "xdg" / "subspaces"
    monkeypatch.setenv("SUBSPACES_CACHE", str(tmp_path / "explicit"))  # takes precedence over XDG
    with pytest.raises(D.DatasetNotFoundError, match="explicit"):
        D.fashion_mnist_root()


def test_truncated_cache_file_is_replaced(fmnist_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _link_raw(fmnist_root, cache)
    raw = _raw_dir(cache)
    (raw / "train-labels-idx1-ubyte").unlink()
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 100)  # half-written
    monkeypatch.setenv("SUBSPACES_CACHE", str(cache))
    monkeypatch.setenv("SUBSPACES_OFFLINE", "1")
    assert D.fashion_mnist_root() == cache
    assert (raw / "train-labels-idx1-ubyte").stat().st_size == RAW_SIZES["train-labels-idx1-ubyte"]
    assert (raw / "train-images-idx3-ubyte").is_symlink(), "complete files must not be rewritten"


def _rank_worker(cache: str, queue) -> None:
    os.environ["SUBSPACES_CACHE"] = cache
    os.environ["SUBSPACES_OFFLINE"] = "1"
    try:
        queue.put(str(D.fashion_mnist_root()))
    except BaseException as exc:  # report instead of hanging the parent
        queue.put(f"error: {exc!r}")


@needs_debian
def test_concurrent_ranks_share_one_cache(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    cache = tmp_path / "cache"
    procs = [ctx.Process(target=_rank_worker, args=(str(cache), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [str(cache), str(cache)]
    for n in RAW_NAMES:
        assert (_raw_dir(cache) / n).stat().st_size == RAW_SIZES[n]
    assert not list(_raw_dir(cache).glob("*.tmp"))


def test_subspaces_data_folder_wins(fmnist_root, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    _link_raw(fmnist_root, data_dir)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SUBSPACES_DATA", str(data_dir))
    monkeypatch.setenv("SUBSPACES_CACHE", str(cache))
    assert D.fashion_mnist_root() == data_dir
    assert not cache.exists(), "nothing should be decompressed when SUBSPACES_DATA is complete"

    # an explicit root argument is searched before $SUBSPACES_DATA
    other = tmp_path / "other"
    _link_raw(fmnist_root, other)
    assert D.fashion_mnist_root(other) == other


@needs_debian
def test_subspaces_data_with_gz_files(tmp_path, monkeypatch):
    gz_dir = tmp_path / "gz"
    gz_dir.mkdir()
    for n in RAW_NAMES:
        os.symlink(S.DEBIAN_FASHION_MNIST_DIR / f"{n}.gz", gz_dir / f"{n}.gz")
    monkeypatch.setattr(S, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("SUBSPACES_DATA", str(gz_dir))
    monkeypatch.setenv("SUBSPACES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SUBSPACES_OFFLINE", "1")
    root = D.fashion_mnist_root()
    assert root == tmp_path / "cache"
    assert all((_raw_dir(root) / n).stat().st_size == RAW_SIZES[n] for n in RAW_NAMES)


def test_missing_dataset_raises_with_instructions(tmp_path, monkeypatch):
    from torchvision.datasets import FashionMNIST

    calls = []

    def no_network(self):
        calls.append(self.root)
        raise urllib.error.URLError("network disabled by test")

    monkeypatch.setattr(FashionMNIST, "download", no_network)
    missing_debian = tmp_path / "no-debian"
    cache = tmp_path / "cache"
    monkeypatch.setattr(S, "DEBIAN_FASHION_MNIST_DIR", missing_debian)
    monkeypatch.setenv("SUBSPACES_CACHE", str(cache))
    monkeypatch.setenv("SUBSPACES_DATA", str(tmp_path / "empty-data"))

    with pytest.raises(D.DatasetNotFoundError) as info:
        D.fashion_mnist_root(tmp_path / "bad-root")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "SUBSPACES_DATA" in msg and "FashionMNIST/raw" in msg
    for place in (tmp_path / "bad-root", tmp_path / "empty-data", missing_debian, cache):
        assert str(place) in msg
    assert "network disabled by test" in msg
    assert len(calls) == 1, "torchvision download should have been tried once"
    assert not list(cache.rglob("*-ubyte")), "a failed download must not leave files in the cache"

    with pytest.raises(D.DatasetNotFoundError):
        D.build_datasets("fashion-mnist")


def test_corrupt_gz_folder_is_reported(tmp_path, monkeypatch):
    bad = tmp_path / "bad-gz"
    bad.mkdir()
    for n in RAW_NAMES:
        (bad / f"{n}.gz").write_bytes(b"not a gzip file")
    monkeypatch.setattr(S, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("SUBSPACES_DATA", str(bad))
    monkeypatch.setenv("SUBSPACES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SUBSPACES_OFFLINE", "1")
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.fashion_mnist_root()
    assert f"{bad}: found files but could not install them" in str(info.value)
    assert not list((tmp_path / "cache").rglob("*-ubyte*")), "no partial files may be left"


def test_offline_skips_download(tmp_path, monkeypatch):
    from torchvision.datasets import FashionMNIST

    def must_not_run(self):
        raise AssertionError("download attempted although SUBSPACES_OFFLINE=1")

    monkeypatch.setattr(FashionMNIST, "download", must_not_run)
    monkeypatch.setattr(S, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("SUBSPACES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SUBSPACES_OFFLINE", "1")
    with pytest.raises(D.DatasetNotFoundError, match="SUBSPACES_OFFLINE"):
        D.fashion_mnist_root()


# --------------------------------------------------------------------------- #
# Fashion-MNIST bundles
# --------------------------------------------------------------------------- #
def _raw_train_images(root: pathlib.Path) -> torch.Tensor:
    from torchvision.datasets import FashionMNIST

    return FashionMNIST(str(root), train=True, download=False).data  # [60000, 28, 28] uint8


def test_fashion_mnist_bundle_shapes_and_normalisation(fmnist_root):
    b = D.build_datasets("fashion-mnist", root=fmnist_root, train_subset=64, eval_subset=32, holdout=16)
    assert (b.num_classes, b.in_chans, b.img_size) == (10, 1, 28)
    assert b.mean == pytest.approx((0.2860,)) and b.std == pytest.approx((0.3530,))
    assert (len(b.train), len(b.bn), len(b.eval), len(b.holdout)) == (64, 64, 32, 16)
    for ds in (b.train, b.bn, b.eval, b.holdout):
        x, y = ds[0]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32
        assert isinstance(y, int) and 0 <= y < 10

    raw = _raw_train_images(fmnist_root)
    idx = b.train.indices[5]
    x, _ = b.train[5]
    torch.testing.assert_close(x * 0.3530 + 0.2860, raw[idx].float().unsqueeze(0) / 255, atol=1e-5, rtol=0)
    # no augmentation for Fashion-MNIST: train == bn
    torch.testing.assert_close(b.train[5][0], b.bn[5][0])

    big = D.build_datasets("fashion-mnist", root=fmnist_root, train_subset=512)
    xs = torch.stack([big.train[i][0] for i in range(len(big.train))])
    assert abs(xs.mean().item()) < 0.1 and abs(xs.std().item() - 1) < 0.1


def test_fashion_mnist_three_channels_resized(fmnist_root):
    b = D.build_datasets("fashion-mnist", root=fmnist_root, train_subset=8, eval_subset=8,
                         in_chans=3, img_size=32)
    assert (b.in_chans, b.img_size) == (3, 32)
    assert len(b.mean) == 3 and len(b.std) == 3
    x, _ = b.train[0]
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x[0], x[1])
    torch.testing.assert_close(x[0], x[2])
    assert b.eval[0][0].shape == (3, 32, 32)
    # documented: resized (PIL bilinear, antialiased, on the uint8 image), not padded
    from PIL import Image

    raw = _raw_train_images(fmnist_root)[b.train.indices[0]]
    pil = np.asarray(Image.fromarray(raw.numpy()).resize((32, 32), Image.BILINEAR))
    expected = torch.from_numpy(pil.copy()).float() / 255
    torch.testing.assert_close(x[0] * 0.3530 + 0.2860, expected, atol=1e-5, rtol=0)
    # within one grey level of the float resize (torch, antialiased) used before timm's transforms
    before = F.interpolate(raw.float()[None, None] / 255, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    assert (expected - before).abs().max() <= 1 / 255 + 1e-6

    small = D.build_datasets("fashion-mnist", root=fmnist_root, train_subset=4, img_size=20)
    assert small.train[0][0].shape == (1, 20, 20)
    with pytest.raises(ValueError, match="in_chans"):
        D.build_datasets("fashion-mnist", root=fmnist_root, in_chans=2)


def test_subsets_deterministic_and_holdout_disjoint(fmnist_root):
    kw = dict(root=fmnist_root, train_subset=64, eval_subset=32, holdout=100)
    a = D.build_datasets("fashion-mnist", seed=1, **kw)
    b = D.build_datasets("fashion-mnist", seed=1, **kw)
    c = D.build_datasets("fashion-mnist", seed=2, **kw)
    assert list(a.train.indices) == list(b.train.indices)
    assert list(a.eval.indices) == list(b.eval.indices)
    assert list(a.holdout.indices) == list(b.holdout.indices)
    assert list(a.train.indices) != list(c.train.indices)
    assert list(a.bn.indices) == list(a.train.indices)
    assert len(set(a.train.indices)) == 64 and len(set(a.holdout.indices)) == 100
    assert set(a.train.indices).isdisjoint(a.holdout.indices)
    assert all(0 <= i < 10000 for i in a.eval.indices)
    # labels follow the indices
    assert [a.train[i][1] for i in range(4)] == [b.train[i][1] for i in range(4)]
    # larger subset with the same seed/holdout extends the smaller one; holdout unchanged
    bigger = D.build_datasets("fashion-mnist", seed=1, **{**kw, "train_subset": 128})
    assert set(a.train.indices) <= set(bigger.train.indices)
    assert list(bigger.holdout.indices) == list(a.holdout.indices)
    # holdout without train_subset: everything else is training data
    full = D.build_datasets("fashion-mnist", root=fmnist_root, holdout=10)
    assert len(full.train) == 60000 - 10 and len(full.eval) == 10000
    assert D.build_datasets("fashion-mnist", root=fmnist_root).holdout is None
    with pytest.raises(ValueError, match="--train-subset 60000 exceeds the 59999 examples available"):
        D.build_datasets("fashion-mnist", root=fmnist_root, train_subset=60000, holdout=1)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        D.build_datasets("mnist-fashion")
    msg = str(info.value)
    for name in (*D.DATASETS, "imagefolder:"):
        assert name in msg


# --------------------------------------------------------------------------- #
# Loader
# --------------------------------------------------------------------------- #
def test_make_loader_reproducible(fmnist_root):
    b = D.build_datasets("fashion-mnist", root=fmnist_root, train_subset=64)

    def epochs(seed, n=2):
        loader = D.make_loader(b.train, 16, shuffle=True, seed=seed)
        return [torch.cat([y for _, y in loader]).tolist() for _ in range(n)]

    first = epochs(3)
    assert first == epochs(3)
    assert first[0] != first[1], "each epoch should draw a new order"
    assert first != epochs(4)

    loader = D.make_loader(b.train, 16, shuffle=False)
    batch = next(iter(loader))
    assert isinstance(batch, tuple) and len(batch) == 2
    x, y = batch
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    assert y.tolist() == [b.train[i][1] for i in range(16)]
    assert len(D.make_loader(b.train, 24, shuffle=False, drop_last=True)) == 2
    assert len(D.make_loader(b.train, 24, shuffle=False)) == 3


# --------------------------------------------------------------------------- #
# CIFAR (offline: error path, and a fake on-disk copy)
# --------------------------------------------------------------------------- #
def test_cifar_offline_raises(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def no_network(self):
        raise urllib.error.URLError("network disabled by test")

    monkeypatch.setattr(CIFAR10, "download", no_network)
    monkeypatch.setenv("SUBSPACES_CACHE", str(tmp_path / "cache"))
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.build_datasets("cifar10")
    msg = str(info.value)
    assert "cifar10" in msg and "network disabled by test" in msg and str(tmp_path / "cache") in msg


def _write_fake_cifar10(root: pathlib.Path, n_per_batch: int = 8) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        arrays.append(data)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": [int(v) for v in rng.integers(0, 10, n_per_batch)]}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    return np.concatenate(arrays[:5]).reshape(-1, 3, 32, 32)


def test_cifar10_from_disk(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    raw = torch.from_numpy(_write_fake_cifar10(tmp_path))  # [40, 3, 32, 32]
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # fake files have other md5s

    b = D.build_datasets("cifar10", root=tmp_path, holdout=4)
    assert (b.num_classes, b.in_chans, b.img_size, len(b.train), len(b.eval), len(b.holdout)) == (10, 3, 32, 36, 8, 4)
    mean = torch.tensor(D.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(D.CIFAR10_STD).view(3, 1, 1)
    idx = b.bn.indices[0]
    x_bn, _ = b.bn[0]
    torch.testing.assert_close(x_bn * std + mean, raw[idx].float() / 255, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.bn[0][0], x_bn)  # bn is deterministic
    torch.manual_seed(0)
    draws = [b.train[0][0] for _ in range(8)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.equal(d, x_bn) for d in draws), "train split should be augmented"

    plain = D.build_datasets("cifar10", root=tmp_path, augment=False)
    torch.testing.assert_close(plain.train[3][0], plain.bn[3][0])

    grey = D.build_datasets("cifar10", root=tmp_path, in_chans=1, train_subset=4)
    assert grey.in_chans == 1 and len(grey.mean) == 1 and grey.train[0][0].shape == (1, 32, 32)


# --------------------------------------------------------------------------- #
# Image folders (timm transforms)
# --------------------------------------------------------------------------- #
def _write_image_folder(root: pathlib.Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    layout = {"train": {"a": 4, "b": 4, "c": 4}, "val": {"a": 2, "c": 2}}  # val lacks class b
    for split, classes in layout.items():
        for cls, count in classes.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                arr = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(arr, "RGB").save(root / split / cls / f"{i}.png")


def test_imagefolder_with_timm_model(tmp_path):
    import timm

    _write_image_folder(tmp_path / "imgs")
    model = timm.create_model("test_resnet", num_classes=3)
    b = D.build_datasets(f"imagefolder:{tmp_path / 'imgs'}", model=model, holdout=2, seed=0)
    assert (b.num_classes, b.in_chans, b.img_size) == (3, 3, 160)  # from the model's data config
    assert (len(b.train), len(b.bn), len(b.holdout), len(b.eval)) == (10, 10, 2, 4)
    assert set(b.train.indices).isdisjoint(b.holdout.indices)
    x, y = b.train[0]
    assert x.shape == (3, 160, 160) and x.dtype == torch.float32
    torch.testing.assert_close(b.bn[0][0], b.bn[0][0])
    assert b.bn[0][0].shape == (3, 160, 160)
    # eval labels use the training class->index map even though val has no "b"
    assert sorted({y for _, y in (b.eval[i] for i in range(len(b.eval)))}) == [0, 2]
    with torch.no_grad():
        out = model(torch.stack([b.eval[0][0], b.eval[1][0]]))
    assert out.shape == (2, 3)

    loader = D.make_loader(b.eval, 4, shuffle=False)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 160, 160) and yb.dtype == torch.int64


def test_imagefolder_size_and_grey_overrides(tmp_path):
    _write_image_folder(tmp_path / "imgs")
    b = D.build_datasets(f"imagefolder:{tmp_path / 'imgs'}", img_size=32, in_chans=1, train_subset=3)
    assert (b.in_chans, b.img_size, len(b.train), len(b.mean)) == (1, 32, 3, 1)
    assert b.train[0][0].shape == (1, 32, 32) and b.eval[0][0].shape == (1, 32, 32)


def test_imagefolder_missing_folder(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.build_datasets(f"imagefolder:{tmp_path / 'nope'}")
    assert str(tmp_path / "nope" / "train") in str(info.value)

    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    with pytest.raises(D.DatasetNotFoundError, match="val"):
        D.build_datasets(f"imagefolder:{tmp_path / 'half'}")


# --------------------------------------------------------------------------- #
# Model input spec
# --------------------------------------------------------------------------- #
def test_infer_input_spec():
    import timm

    assert D.infer_input_spec(timm.create_model("test_vit", num_classes=3)) == (3, 160)
    # channels come from the instantiated stem, not the pretrained config (which says 3)
    assert D.infer_input_spec(timm.create_model("test_resnet", in_chans=1, num_classes=3)) == (1, 160)
    assert D.infer_input_spec(torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3))) == (2, None)
    assert D.infer_input_spec(torch.nn.Linear(4, 2)) == (None, None)


def test_build_datasets_follows_model(fmnist_root):
    import timm

    fixed_vit = timm.create_model("test_vit", in_chans=1, num_classes=10, dynamic_img_size=False)
    b = D.build_datasets("fashion-mnist", root=fmnist_root, train_subset=2, model=fixed_vit)
    assert (b.in_chans, b.img_size) == (1, 160)
    assert b.train[0][0].shape == (1, 160, 160)

    resnet = timm.create_model("test_resnet", num_classes=10)  # size-agnostic: keep 28 px
    b = D.build_datasets("fashion-mnist", root=fmnist_root, train_subset=2, model=resnet)
    assert (b.in_chans, b.img_size) == (3, 28)
    with torch.no_grad():
        assert resnet(torch.stack([b.train[0][0], b.train[1][0]])).shape == (2, 10)


def test_unaugmented_images_are_transformed_once_and_handed_out_as_copies(monkeypatch):
    """Deterministic splits keep each transformed image (up to CACHE_BYTES) and return copies;
    an augmented training split draws anew every time."""
    from subspaces.augment import Augmentation

    bundle = D.build_datasets("fashion-mnist", train_subset=16, eval_subset=8, seed=0)
    plain = bundle.eval.dataset
    first, _ = bundle.eval[0]
    reference = first.clone()
    first.add_(1.0)                                   # the caller's copy, not the kept one
    again, _ = bundle.eval[0]
    torch.testing.assert_close(again, reference, rtol=0, atol=0)
    assert len(plain.cache) == 1 and plain.cached_bytes == again.nbytes

    monkeypatch.setattr(D, "CACHE_BYTES", 2 * again.nbytes)
    small = D.build_datasets("fashion-mnist", train_subset=16, eval_subset=8, seed=0)
    for i in range(5):
        small.eval[i]
    assert len(small.eval.dataset.cache) == 2, "the cache stops at CACHE_BYTES"

    flipped = D.build_datasets("fashion-mnist", train_subset=16, eval_subset=8, seed=0, augment=Augmentation(hflip=0.5))
    assert flipped.train.dataset.cache is None and flipped.bn.dataset.cache is not None


def _pil_reference(ds, indices):
    """What the per-image path gives: PIL image in the split's mode, through its transform."""
    from PIL import Image

    return torch.stack([ds.transform(Image.fromarray(ds.pixels[i].numpy()).convert(ds.mode)) for i in indices])


@pytest.mark.parametrize("case", ["grey", "rgb", "rgb_to_grey"])
def test_batched_fetch_gives_the_per_image_bits(case, tmp_path, monkeypatch):
    """A loader's batch of an unaugmented split (stacked at once by the dataset) holds exactly the
    images and labels the per-image PIL path gives, in the loader's order; a split whose images
    need a mode conversion takes the per-image path, with the same result."""
    if case == "grey":
        bundle = D.build_datasets("fashion-mnist", train_subset=300, eval_subset=200, holdout=50, seed=1)
    else:
        import torchvision.datasets.cifar as tv_cifar

        _write_fake_cifar10(tmp_path)
        monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
        bundle = D.build_datasets("cifar10", root=tmp_path, holdout=4, in_chans=1 if case == "rgb_to_grey" else None)
    for split in (bundle.eval, bundle.bn, bundle.holdout):
        base = getattr(split, "dataset", split)
        order = list(split.indices) if base is not split else list(range(len(split)))
        assert (base.batched is None) == (case == "rgb_to_grey")
        xs, ys = [], []
        for x, y in D.make_loader(split, 32, shuffle=False):
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            xs.append(x)
            ys.append(y)
        assert torch.equal(torch.cat(xs), _pil_reference(base, order))
        assert torch.equal(torch.cat(ys), base.targets[order])
        pairs = split.__getitems__([0, 1])   # any collate still sees (image, label) pairs
        assert torch.equal(pairs[1][0], split[1][0]) and pairs[1][1] == split[1][1]
