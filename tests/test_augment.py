"""timm's data pipeline: Fashion-MNIST / CIFAR through resolve_data_config + create_transform
(bit-identical to the arithmetic before it at the native size), augmentation flags in timm's
names, and timm's Mixup / CutMix in the training step."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torchvision import transforms

import subspaces as ss
from helpers import assert_metrics, read_json, read_metrics, recipe_cmd, run
from subspaces import data as D
from subspaces import training
from subspaces.augment import Augmentation, augmentation_from, batch_mixer, mix_batch
from subspaces.errors import ConfigError

FM_MEAN, FM_STD = torch.tensor([0.2860]).view(1, 1, 1), torch.tensor([0.3530]).view(1, 1, 1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("SUBSPACES_OFFLINE", "1")


@pytest.fixture(scope="module")
def raw_fmnist():
    from torchvision.datasets import FashionMNIST

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUBSPACES_OFFLINE", "1")
        root = D.fashion_mnist_root()
    return FashionMNIST(str(root), train=True).data, FashionMNIST(str(root), train=False).data


def _before_timm(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The arithmetic data.py did by hand before timm's transforms: ``(x / 255 - mean) / std``."""
    return (images.to(torch.float32).div_(255.0) - mean) / std


# ---------------------------------------------------------------------------------------- Fashion-MNIST
def test_fashion_mnist_is_bit_identical_to_the_hand_written_pipeline(raw_fmnist):
    train_raw, test_raw = raw_fmnist
    b = D.build_datasets("fashion-mnist", train_subset=300, eval_subset=200, holdout=50, seed=3)
    for split, raw in ((b.train, train_raw), (b.bn, train_raw), (b.holdout, train_raw), (b.eval, test_raw)):
        for i in range(len(split)):
            x, y = split[i]
            assert torch.equal(x, _before_timm(raw[split.indices[i]].unsqueeze(0), FM_MEAN, FM_STD)), i
    three = D.build_datasets("fashion-mnist", train_subset=64, in_chans=3)   # PIL's L -> RGB repeats the channel
    for i in range(len(three.train)):
        assert torch.equal(three.train[i][0], _before_timm(train_raw[three.train.indices[i]].expand(3, -1, -1), FM_MEAN, FM_STD))


def test_fashion_mnist_transforms_are_timms(raw_fmnist):
    b = D.build_datasets("fashion-mnist", train_subset=8)
    tf = b.train.dataset.transform
    expected = timm.data.create_transform(input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,), crop_pct=1.0,
                                          crop_mode="center", interpolation="bilinear", is_training=False)
    assert repr(tf) == repr(expected)
    assert b.train.dataset is b.bn.dataset, "not augmented by default: train and bn are the same dataset"


def test_hflip_one_flips_every_image_and_vflip_one_flips_vertically(raw_fmnist):
    flipped = D.build_datasets("fashion-mnist", train_subset=32, augment=Augmentation(hflip=1.0))
    upside = D.build_datasets("fashion-mnist", train_subset=32, augment=Augmentation(vflip=1.0))
    for i in range(32):
        assert torch.equal(flipped.train[i][0], flipped.bn[i][0].flip(-1))
        assert torch.equal(upside.train[i][0], upside.bn[i][0].flip(-2))
        assert flipped.train[i][1] == flipped.bn[i][1]


@pytest.mark.parametrize("chans", [1, 3])
def test_color_jitter_on_grey_images(chans):
    b = D.build_datasets("fashion-mnist", train_subset=16, in_chans=chans, augment=Augmentation(color_jitter=0.4))
    assert any(isinstance(t, transforms.ColorJitter) for t in b.train.dataset.transform.transforms)
    torch.manual_seed(0)
    changed = 0
    for i in range(16):
        x, plain = b.train[i][0], b.bn[i][0]
        assert x.shape == plain.shape == (chans, 28, 28) and torch.isfinite(x).all()
        changed += not torch.equal(x, plain)
        if chans == 3:   # a grey image stays grey: saturation has nothing to change
            assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    assert changed >= 12, "brightness / contrast jitter should change most images"


def test_random_resized_crop_takes_scale_and_ratio():
    b = D.build_datasets("fashion-mnist", train_subset=4, augment=Augmentation(train_crop_mode="rrc", scale=(0.5, 1.0), ratio=(0.9, 1.1)))
    crop = b.train.dataset.transform.transforms[0]
    assert isinstance(crop, timm.data.transforms.RandomResizedCropAndInterpolation)
    assert crop.scale == (0.5, 1.0) and crop.ratio == (0.9, 1.1) and crop.size == (28, 28)
    assert b.train[0][0].shape == (1, 28, 28)
    assert b.bn.dataset.transform is b.eval.transform, "BatchNorm and evaluation images are never augmented"


def test_pretrained_normalisation_comes_from_the_model(raw_fmnist):
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    stats = timm.data.resolve_data_config({}, model=model)
    b = D.build_datasets("fashion-mnist", train_subset=4, model=model, mean=stats["mean"], std=stats["std"])
    luma = (0.2989, 0.587, 0.114)   # ImageNet's RGB statistics adapted to one channel
    assert b.mean == pytest.approx((sum(w * m for w, m in zip(luma, stats["mean"])),))
    mean, std = torch.tensor(b.mean).view(1, 1, 1), torch.tensor(b.std).view(1, 1, 1)
    assert torch.equal(b.train[0][0], _before_timm(raw_fmnist[0][b.train.indices[0]].unsqueeze(0), mean, std))


# ---------------------------------------------------------------------------------------- CIFAR (synthetic arrays)
@pytest.fixture
def fake_cifar(monkeypatch):
    """Synthetic uint8 CIFAR arrays fed to build_datasets' own CIFAR path (no files, no network)."""
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)   # as torchvision stores them
    test = torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    targets = torch.arange(40) % 10, torch.arange(12) % 10
    monkeypatch.setattr(D, "load_cifar", lambda name, root: (train, targets[0], test, targets[1], 10))
    return train, test


def test_cifar_default_is_the_papers_crop_and_flip_bit_for_bit(fake_cifar):
    train, _ = fake_cifar
    mean, std = torch.tensor(D.CIFAR10_MEAN).view(3, 1, 1), torch.tensor(D.CIFAR10_STD).view(3, 1, 1)
    b = D.build_datasets("cifar10", holdout=4)
    before = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()])  # on [0, 1] tensors
    torch.manual_seed(7)
    new = [b.train[i][0] for i in range(len(b.train))]
    torch.manual_seed(7)
    old = [(before(train[b.train.indices[i]].float().div(255.0)) - mean) / std for i in range(len(b.train))]
    assert all(torch.equal(n, o) for n, o in zip(new, old)), "same random draws, same tensors as the papers' torchvision pipeline"
    assert any(not torch.equal(n, b.bn[i][0]) for i, n in enumerate(new)), "the train split is augmented"
    for i in range(len(b.bn)):
        assert torch.equal(b.bn[i][0], _before_timm(train[b.bn.indices[i]], mean, std))
    plain = D.build_datasets("cifar10", augment=False)
    assert plain.train is plain.bn
    no_flip = D.build_datasets("cifar10", augment=Augmentation(hflip=0.0, train_crop_mode="none"))
    assert no_flip.train is no_flip.bn, "every augmentation turned off: no augmentation"


def test_cifar_grey_and_resized(fake_cifar):
    train, _ = fake_cifar
    from PIL import Image

    grey = D.build_datasets("cifar100", in_chans=1, img_size=40, augment=False, train_subset=10)
    assert (grey.in_chans, grey.img_size, len(grey.mean)) == (1, 40, 1)
    expected = Image.fromarray(train[grey.train.indices[0]].permute(1, 2, 0).numpy()).convert("L").resize((40, 40), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(expected).copy()).float().div(255)
    mean, std = torch.tensor(grey.mean).view(1, 1, 1), torch.tensor(grey.std).view(1, 1, 1)
    assert torch.equal(grey.train[0][0], (x.unsqueeze(0) - mean) / std)


# ---------------------------------------------------------------------------------------- image folders
def test_image_folders_keep_timms_default_training_transform(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    model = timm.create_model("test_resnet", num_classes=2)
    b = D.build_datasets(f"imagefolder:{tmp_path}", model=model)
    cfg = dict(timm.data.resolve_data_config({}, model=model))
    assert repr(b.train.transform) == repr(timm.data.create_transform(**cfg, is_training=True))
    assert repr(b.eval.transform) == repr(timm.data.create_transform(**cfg, is_training=False))
    no_jitter = D.build_datasets(f"imagefolder:{tmp_path}", model=model, augment=Augmentation(color_jitter=0.0, hflip=1.0))
    assert repr(no_jitter.train.transform) == repr(timm.data.create_transform(**cfg, is_training=True, color_jitter=None, hflip=1.0))
    with pytest.raises(ConfigError, match="--train-crop-mode pad needs images of one native size"):
        D.build_datasets(f"imagefolder:{tmp_path}", augment=Augmentation(train_crop_mode="pad"))


# ---------------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("kwargs, message", [
    ({"hflip": 1.5}, "--hflip is a probability: it must be in [0, 1], got 1.5"),
    ({"vflip": -0.1}, "--vflip is a probability: it must be in [0, 1], got -0.1"),
    ({"color_jitter": -1.0}, "--color-jitter must be >= 0 (0 = off, timm uses 0.4), got -1.0"),
    ({"train_crop_mode": "random"}, "--train-crop-mode 'random': use one of pad, none, rrc, rkrc, rkrr"),
    ({"scale": (0.9, 0.5), "train_crop_mode": "rrc"}, "--scale takes two numbers LO HI with 0 < LO <= HI <= 1, got (0.9, 0.5)"),
    ({"ratio": (0.0, 1.0)}, "--ratio takes two numbers LO HI with 0 < LO <= HI, got (0.0, 1.0)"),
    ({"scale": (0.5, 1.0), "train_crop_mode": "pad"}, "--scale sets timm's random resized crop: use it with --train-crop-mode rrc | rkrc | rkrr, not pad"),
])
def test_bad_augmentation_values_name_the_flag(kwargs, message):
    with pytest.raises(ConfigError) as info:
        Augmentation(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize("field, value, message", [
    ("mixup", -0.2, "mixup is a Beta(alpha, alpha) parameter: it must be >= 0 (0 = off, timm uses e.g. 0.8), got -0.2"),
    ("cutmix", -1.0, "cutmix is a Beta(alpha, alpha) parameter: it must be >= 0 (0 = off, timm uses e.g. 1.0), got -1.0"),
    ("mixup_prob", 2.0, "mixup{_}prob is a probability: it must be in [0, 1], got 2.0"),
    ("mixup_switch_prob", -1.0, "mixup{_}switch{_}prob is a probability: it must be in [0, 1], got -1.0"),
    ("mixup_mode", "rows", "mixup{_}mode 'rows': use one of batch, pair, elem"),
    ("smoothing", 1.0, "smoothing is label smoothing: it must be in [0, 1), got 1.0"),
])
def test_bad_mixing_values_name_the_flag(field, value, message):
    with pytest.raises(ConfigError) as info:
        ss.TrainConfig(**{field: value})
    assert str(info.value) == "--" + message.replace("{_}", "-")
    with pytest.raises(ConfigError) as info:
        ss.TrainRunConfig(**{field: value})
    assert str(info.value) == "--" + message.replace("{_}", "-")


def test_flags_map_onto_augmentation_and_the_settings():
    from subspaces.cli_flags import AUGMENT, DATA, build_flags

    p = build_flags(ss.TrainRunConfig, None, DATA, AUGMENT)
    args = p.parse_args(["--hflip", "0.25", "--color-jitter", "0.3", "--train-crop-mode", "rrc", "--scale", "0.5", "1",
                         "--mixup", "0.8", "--cutmix", "1", "--mixup-mode", "pair"])
    assert augmentation_from(args) == Augmentation(hflip=0.25, color_jitter=0.3, train_crop_mode="rrc", scale=(0.5, 1.0))
    settings = ss.TrainRunConfig(**vars(args))
    assert augmentation_from(settings) == augmentation_from(args)
    assert (settings.mixup, settings.cutmix, settings.mixup_mode) == (0.8, 1.0, "pair")
    defaults = ss.TrainRunConfig()
    assert augmentation_from(defaults) == Augmentation() and batch_mixer(defaults, 10) is None
    with pytest.raises(ConfigError, match="--train-crop-mode pad needs images of one native size"):
        ss.TrainRunConfig(dataset="imagefolder:/data", train_crop_mode="pad")


# ---------------------------------------------------------------------------------------- mixing
def test_mixup_mixes_the_batch_and_its_targets():
    np.random.seed(0)
    mixer = batch_mixer(ss.TrainConfig(mixup=1.0, smoothing=0.1), num_classes=10)
    assert isinstance(mixer, Mixup) and mixer.label_smoothing == 0.1
    x, y = torch.randn(8, 1, 6, 6), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    original = x.clone()
    mixed, target = mix_batch(mixer, x, y)
    assert target.shape == (8, 10) and torch.allclose(target.sum(1), torch.ones(8))
    off = 0.1 / 10
    lam = (target[0, 0].item() - off) / (1 - 0.1)   # row 0 holds lam * smooth(0) + (1 - lam) * smooth(7)
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * original + (1 - lam) * original.flip(0))
    # an odd batch: the first B-1 images are mixed, the last keeps its own (smoothed) label
    odd_x, odd_y = torch.randn(5, 1, 6, 6), torch.tensor([1, 2, 3, 4, 9])
    last = odd_x[-1].clone()
    mixed, target = mix_batch(mixer, odd_x, odd_y)
    assert target.shape == (5, 10) and torch.equal(mixed[-1], last)
    assert target[-1, 9].item() == pytest.approx(1 - 0.1 + off) and target[-1].sum().item() == pytest.approx(1.0)


def test_trainer_steps_on_soft_targets_and_keeps_hard_label_smoothing(tmp_path, monkeypatch):
    data = D.build_datasets("fashion-mnist", train_subset=64, eval_subset=32, in_chans=1)
    seen = []
    original = training.Trainer._loss

    def spy(self, logits, target):
        seen.append(target.detach().clone())
        return original(self, logits, target)

    monkeypatch.setattr(training.Trainer, "_loss", spy)
    torch.manual_seed(0)
    net = ss.Line(timm.create_model("test_resnet", num_classes=10, in_chans=1), seed=0)
    config = ss.TrainConfig(epochs=1, batch_size=16, lr=0.05, bn_batches=1, mixup=0.8, cutmix=1.0, smoothing=0.1)
    trainer = ss.Trainer.create(config, net, data, output=tmp_path / "mix")
    trainer.fit()
    assert len(seen) == 4 and all(t.shape == (16, 10) for t in seen), "every step's loss target is soft"
    assert any((t.max(1).values < 1 - 0.1 + 0.01 - 1e-6).any() for t in seen), "some targets are mixed"
    assert 0 <= trainer.history[-1]["train_acc"] <= 1
    logits, y = torch.randn(6, 10), torch.tensor([0, 1, 2, 3, 4, 5])
    soft = F.one_hot(y, 10).float() * 0.5 + F.one_hot(y.flip(0), 10).float() * 0.5
    assert torch.equal(trainer._loss(logits, soft), SoftTargetCrossEntropy()(logits, soft))
    assert torch.equal(trainer._loss(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1)), "without mixing: cross-entropy with label smoothing"


def test_train_recipe_with_mixup_end_to_end(tmp_path):
    out = tmp_path / "line"
    result = run(recipe_cmd("train.py", "--subspace", "line", "--model", "test_resnet", "--train-subset", "256", "--eval-subset", "128",
                            "-b", "32", "--bn-batches", "2", "--epochs", "1", "--mixup", "0.8", "--cutmix", "1.0", "--hflip", "0.5",
                            "--output", out))
    assert result.rc == 0, result.explain()
    config = (out / "config.yaml").read_text()
    assert "mixup: 0.8" in config and "hflip: 0.5" in config
    [record] = read_metrics(out)
    assert 0 <= record["train_acc"] <= 1 and np.isfinite(record["train_loss"])
    results = read_json(out / "results.json")["results"]
    for name in ("centre", "anchor0", "anchor1"):
        assert_metrics(results[name], count=128)


def test_a_mixup_run_stopped_mid_epoch_resumes_exactly(tmp_path):
    import os
    import signal

    from subspaces.errors import Preempted

    data = D.build_datasets("fashion-mnist", train_subset=96, eval_subset=32, in_chans=1)

    def trainer(folder, on_update=None):
        np.random.seed(0)   # timm's Mixup draws lam and the CutMix box from numpy's global generator
        torch.manual_seed(0)
        net = ss.Line(timm.create_model("test_resnet", num_classes=10, in_chans=1), seed=0)
        config = ss.TrainConfig(epochs=2, batch_size=16, lr=0.05, bn_batches=1, log_interval=2, mixup=0.8, cutmix=1.0)
        return ss.Trainer.create(config, net, data, output=tmp_path / folder, on_update=on_update)

    reference = trainer("ref")
    reference.fit()

    def preempt(_, update):
        if update == 9:   # step 3 of epoch 2
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted, match=r"at epoch 2, step 3 of 6 \(update 9\)"):
        trainer("run", preempt).fit()
    resumed = trainer("run")
    np.random.seed(123)   # the checkpoint's generator states must win over whatever the process holds
    assert resumed.fit(resume=True) == {"epochs_done": 2, "finished": True}
    for (name, a), (_, b) in zip(reference.unwrapped.state_dict().items(), resumed.unwrapped.state_dict().items()):
        if not name.endswith("_extra_state"):
            assert torch.equal(a, b), name
