"""Tests for cll.data.

The first part runs everywhere (generated data and small fake files written here). The last part
uses the real data tarballs in ``../shared/data`` (or ``$CLL_SHARED_DATA``) and skips without them.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision import transforms as T

from cll.data import DataError, TinyImageNet, dataset_info, dataset_names, load_dataset
from cll.errors import CllError, ConfigError

FILE_DATASETS = {  # name -> folder the loader looks into, relative to the data root
    "mnist": "MNIST/raw",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "tinyimagenet": "tiny-imagenet-200",
    "cifar10-jpg": "cifar10-jpg",
}


# ------------------------------------------------------------------------- names and info
def test_dataset_names_and_info():
    assert dataset_names() == ["moons", "digits", "mnist", "cifar10", "cifar100", "tinyimagenet", "cifar10-jpg"]
    expected = {
        "moons": (2, (2,)),
        "digits": (10, (1, 8, 8)),
        "mnist": (10, (1, 28, 28)),
        "cifar10": (10, (3, 32, 32)),
        "cifar100": (100, (3, 32, 32)),
        "tinyimagenet": (200, (3, 64, 64)),
        "cifar10-jpg": (10, (3, 32, 32)),
    }
    for name in dataset_names():
        info = dataset_info(name)
        assert (info.name, info.num_classes, info.in_shape) == (name, *expected[name])
        assert isinstance(info.in_shape, tuple)
        # the channel mean the peers' nets subtract: one per channel, in [0, 1]; none for moons/digits
        if name in ("moons", "digits"):
            assert info.mean is None
        else:
            assert len(info.mean) == info.in_shape[0] and all(0 < m < 1 for m in info.mean)


def test_unknown_name_lists_allowed_names():
    for call in (lambda: dataset_info("imagenet"), lambda: load_dataset("imagenet")):
        with pytest.raises(DataError) as err:
            call()
        msg = str(err.value)
        assert "imagenet" in msg and "\n" not in msg
        assert all(name in msg for name in dataset_names())
    assert issubclass(DataError, CllError)


# ------------------------------------------------------------------------------------ moons
def _moon_distance(x: torch.Tensor, y: torch.Tensor, samples: int = 5001) -> torch.Tensor:
    """Distance of each point to a dense sampling of its own noise-free moon (make_moons' curves:
    upper arc (cos t, sin t) for class 0, lower arc (1 - cos t, 0.5 - sin t) for class 1)."""
    t = torch.linspace(0, math.pi, samples, dtype=torch.float64)
    curves = [torch.stack([t.cos(), t.sin()], 1), torch.stack([1 - t.cos(), 0.5 - t.sin()], 1)]
    dist = torch.empty(len(x), dtype=torch.float64)
    for label in (0, 1):
        idx = (y == label).nonzero().flatten()
        for chunk in idx.split(2000):  # keeps the distance matrix small
            dist[chunk] = torch.cdist(x[chunk].double(), curves[label]).min(1).values
    return dist


def test_moons_sizes_types_and_noise_disk():
    train, test, info = load_dataset("moons", seed=0)
    assert info.in_shape == (2,) and (len(train), len(test)) == (2000, 20000)
    x, y = train.tensors
    assert x.dtype == torch.float32 and x.shape == (2000, 2) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [1000, 1000]
    for ds in (train, test):
        d = _moon_distance(*ds.tensors)
        # Sampling the curve every pi/5000 overestimates distances by < 4e-4.
        assert d.max() <= 0.1 + 1e-3
        assert d.max() > 0.09  # the noise is really there and fills the disk
        # Noise uniform in a disk has E r = 2/3 * 0.1; the distance to the curve is about its normal
        # component r |cos phi|, E|cos phi| = 2/pi, so the mean distance is ~0.0424 (curvature aside).
        assert 0.038 < d.mean() < 0.047


def test_moons_deterministic_per_seed():
    a_train, a_test, _ = load_dataset("moons", seed=3)
    b_train, b_test, _ = load_dataset("moons", seed=3, augment=False)  # augment is ignored
    c_train, c_test, _ = load_dataset("moons", seed=4)
    assert torch.equal(a_train.tensors[0], b_train.tensors[0]) and torch.equal(a_test.tensors[0], b_test.tensors[0])
    assert not torch.equal(a_train.tensors[0], c_train.tensors[0])
    assert not torch.equal(a_test.tensors[0], c_test.tensors[0])
    assert not torch.equal(a_train.tensors[0], a_test.tensors[0][:2000])  # separate streams


# ----------------------------------------------------------------------------------- digits
def test_digits_shapes_range_and_stable_split():
    train, test, info = load_dataset("digits", seed=0)
    assert (len(train), len(test)) == (1437, 360) and info.num_classes == 10
    x, y = train.tensors
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1
    assert torch.bincount(test.tensors[1], minlength=10).min() >= 35  # stratified: ~36 per class
    train2, test2, _ = load_dataset("digits", seed=123, augment=False)  # split ignores seed
    assert torch.equal(train.tensors[0], train2.tensors[0]) and torch.equal(test.tensors[1], test2.tensors[1])


# ----------------------------------------------------------------------- max_train/max_test
def test_max_train_and_max_test_take_first_items():
    full_train, _full_test, _ = load_dataset("digits")
    train, test, _ = load_dataset("digits", max_train=10, max_test=5000)
    assert isinstance(train, Subset) and len(train) == 10 and len(test) == 360
    for i in range(10):
        assert torch.equal(train[i][0], full_train[i][0])
    for bad in (0, -1, 2.5):
        with pytest.raises(ConfigError):
            load_dataset("digits", max_train=bad)


# ------------------------------------------------------------------------ missing data sets
@pytest.mark.parametrize("name", list(FILE_DATASETS))
def test_missing_dataset_is_one_line_with_path(name, tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(name, root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and repr(name) in msg
    assert str(tmp_path / FILE_DATASETS[name]) in msg
    assert "data_root" in msg


def test_root_defaults_to_env_then_cwd_data(tmp_path, monkeypatch):
    monkeypatch.setenv("CLL_DATA", str(tmp_path / "from_env"))
    with pytest.raises(DataError, match="from_env"):
        load_dataset("cifar10")
    monkeypatch.delenv("CLL_DATA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10")
    assert str(tmp_path / "data" / "cifar-10-batches-py") in str(err.value)


# --------------------------------------------------------------- small fake files (offline)
def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, n: int = 3) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", 2051, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", 2049, rng.integers(0, 10, n))
    return raw


def test_fake_mnist_loads_and_truncated_file_is_data_error(tmp_path):
    raw = _fake_mnist(tmp_path)
    train, _test, _ = load_dataset("mnist", root=tmp_path)
    x, _y = train[0]
    assert len(train) == 3 and x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", root=tmp_path)


def _fake_cifar10(root: Path, n: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return folder


def _fake_tinyimagenet(root: Path) -> Path:
    folder = root / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)]
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(0)
    for w in wnids[:2]:  # only two classes get images; empty class folders are allowed
        (folder / "train" / w / "images").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            folder / "train" / w / "images" / f"{w}_0.JPEG"
        )
    for w in wnids[2:]:
        (folder / "train" / w / "images").mkdir(parents=True)
    # A greyscale validation image: must still come out with 3 channels.
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L").save(folder / "val" / "images" / "val_0.JPEG")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "val" / "images" / "val_1.JPEG")
    (folder / "val" / "val_annotations.txt").write_text(
        f"val_0.JPEG\t{wnids[7]}\t0\t0\t63\t63\nval_1.JPEG\t{wnids[199]}\t1\t2\t40\t50\n"
    )
    return folder


def _fake_cifar10_jpg(root: Path, per_class: dict[str, int]) -> Path:
    folder = root / "cifar10-jpg"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls, n in per_class.items():
            (folder / split / cls).mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(image).save(folder / split / cls / f"{i:04d}.jpg")
    return folder


def test_cifar10_jpg_labels_go_round_robin_over_the_classes(tmp_path):
    from cll.data import CIFAR10_CLASSES

    counts = dict.fromkeys(CIFAR10_CLASSES, 2) | {"cat": 3}
    _fake_cifar10_jpg(tmp_path, counts)
    train, test, _ = load_dataset("cifar10-jpg", root=tmp_path, augment=False, max_train=10)
    assert [y for _, y in train] == list(range(10))  # the first N are balanced
    assert [y for _, y in test] == [*range(10), *range(10), 3]
    assert test[0][0].shape == (3, 32, 32) and test[0][0].dtype == torch.float32
    (tmp_path / "cifar10-jpg" / "test" / "frog" / "0000.jpg").rename(tmp_path / "x.jpg")
    Image.new("RGB", (31, 32)).save(tmp_path / "cifar10-jpg" / "test" / "frog" / "0000.jpg")
    _, test, _ = load_dataset("cifar10-jpg", root=tmp_path)
    with pytest.raises(DataError, match=r"0000\.jpg is 31x32, expected 32x32"):
        test[6]
    for f in (tmp_path / "cifar10-jpg" / "train" / "truck").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"no images .* in .*truck"):
        load_dataset("cifar10-jpg", root=tmp_path)
    (tmp_path / "cifar10-jpg" / "train" / "truck").rmdir()
    with pytest.raises(DataError, match=r"missing class folder .*truck"):
        load_dataset("cifar10-jpg", root=tmp_path)


def test_fake_tinyimagenet_labels_and_greyscale(tmp_path):
    _fake_tinyimagenet(tmp_path)
    train, test, _ = load_dataset("tinyimagenet", root=tmp_path)
    assert [y for _, y in train] == [0, 1] and len(test) == 2
    (x0, y0), (_x1, y1) = test[0], test[1]
    assert (y0, y1) == (7, 199) and x0.shape == (3, 64, 64) and x0.dtype == torch.float32
    assert torch.equal(x0[0], x0[1]) and torch.equal(x0[1], x0[2])  # grey -> RGB copies the channel


def test_malformed_files_are_data_errors(tmp_path):
    folder = _fake_cifar10(tmp_path / "a")
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="corrupt"):
        load_dataset("cifar10", root=tmp_path / "a")
    folder = _fake_cifar10(tmp_path / "b")
    (folder / "batches.meta").unlink()
    with pytest.raises(DataError, match=r"incomplete CIFAR-10 files .missing batches.meta"):
        load_dataset("cifar10", root=tmp_path / "b")
    folder = _fake_tinyimagenet(tmp_path / "c")
    (folder / "wnids.txt").write_text("n0\nn1\n")
    with pytest.raises(DataError, match="expected 200"):
        load_dataset("tinyimagenet", root=tmp_path / "c")
    folder = _fake_tinyimagenet(tmp_path / "d")
    (folder / "val" / "images" / "val_1.JPEG").unlink()
    with pytest.raises(DataError, match=r"val_1\.JPEG"):
        load_dataset("tinyimagenet", root=tmp_path / "d")


# ----------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("name, make, size", [("cifar10", _fake_cifar10, 32), ("tinyimagenet", _fake_tinyimagenet, 64)])
def test_augment_changes_train_transform_only(name, make, size, tmp_path):
    make(tmp_path)
    aug_train, aug_test, _ = load_dataset(name, root=tmp_path, augment=True)
    plain_train, plain_test, _ = load_dataset(name, root=tmp_path, augment=False)
    steps = [type(t) for t in aug_train.transform.transforms]
    assert steps == [T.RandomCrop, T.RandomHorizontalFlip, T.ColorJitter, T.RandomRotation, T.ToTensor]
    crop = aug_train.transform.transforms[0]
    assert crop.size == (size, size) and crop.padding == size // 8 and crop.fill == 0
    assert isinstance(plain_train.transform, T.ToTensor)
    assert isinstance(aug_test.transform, T.ToTensor) and isinstance(plain_test.transform, T.ToTensor)
    # Behaviour, not just configuration: augmented items are random, plain and test items are not.
    torch.manual_seed(0)
    assert not torch.equal(aug_train[0][0], aug_train[0][0])
    assert torch.equal(plain_train[0][0], plain_train[0][0])
    assert torch.equal(aug_test[0][0], plain_test[0][0])
    assert aug_train[0][0].shape == (3, size, size)


# ------------------------------------------------------------------- real data (shared tarballs)
# (the `unpack` fixture, in conftest.py, unpacks a shared tarball once per session)


@pytest.mark.data
def test_real_mnist(unpack):
    train, test, info = load_dataset("mnist", root=unpack("mnist.tgz"))
    assert (len(train), len(test)) == (60000, 10000)
    x, y = test[0]
    assert x.shape == info.in_shape and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert y == 7  # the first MNIST test digit is a 7


@pytest.mark.data
@pytest.mark.filterwarnings("ignore:dataset 'cifar10'. only data_batch_1")
def test_real_cifar10_pixels_exact(unpack):
    train, test, info = load_dataset("cifar10", root=unpack("cifar10-subset.tgz"), max_test=2)
    assert len(train) == 4000 and len(test) == 2
    expected = [
        "af12e1241a1e7a0c9ba326825279bef5fe961ceb5f95212a99f9b1f22711f913",
        "df20a6f4102c83a7464ad1e47b60fb267ab02e970e13a081e95b223770f5a206",
    ]
    for i, digest in enumerate(expected):
        x, _y = test[i]
        hwc = (x * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
        assert hashlib.sha256(hwc.tobytes()).hexdigest() == digest
    assert [test[0][1], test[1][1]] == [3, 8]  # cat, ship
    assert train[0][0].shape == info.in_shape


@pytest.mark.data
def test_real_cifar10_subset_warns(unpack):
    with pytest.warns(UserWarning, match="only data_batch_1"):
        load_dataset("cifar10", root=unpack("cifar10-subset.tgz"))


@pytest.mark.data
def test_real_cifar100(unpack):
    train, test, info = load_dataset("cifar100", root=unpack("cifar100-20img.tgz"), augment=False)
    assert info.num_classes == 100 and len(train) == len(test) == 20
    labels = [y for _, y in test]
    assert all(0 <= y < 100 for y in labels) and len(set(labels)) > 1
    assert torch.equal(train[5][0], test[5][0])  # this file has train = test
    assert test[0][0].shape == (3, 32, 32)


@pytest.mark.data
def test_real_cifar10_jpg(unpack, tmp_path):
    (tmp_path / "cifar10-jpg").symlink_to(unpack("cifar10-jpg-full.tgz"))
    train, test, info = load_dataset("cifar10-jpg", root=tmp_path, augment=False)
    assert (len(train), len(test), info.num_classes) == (50000, 10000, 10)
    assert train.targets[:20] == [*range(10), *range(10)] and sorted(set(test.targets)) == list(range(10))
    x, _ = test[0]
    assert x.shape == (3, 32, 32) and x.min() >= 0 and x.max() <= 1 and x.std() > 0.05


@pytest.mark.data
def test_real_tinyimagenet(unpack):
    root = unpack("tinyimagenet-subset.tgz")
    train, test, info = load_dataset("tinyimagenet", root=root)
    assert info.num_classes == 200 and len(test) == 10000 and len(train) == 200 * 50
    folder = root / "tiny-imagenet-200"
    wnids = (folder / "wnids.txt").read_text().split()
    assert len(wnids) == 200 and sorted(set(train.targets)) == list(range(200))
    lines = (folder / "val" / "val_annotations.txt").read_text().splitlines()
    for i in (0, 1, 4321, 9999):  # test order and labels follow val_annotations.txt
        assert test[i][1] == wnids.index(lines[i].split("\t")[1])

    # Find a greyscale JPEG (~2%) by reading headers only, and check it comes out as RGB.
    def is_grey(path: Path) -> bool:
        with Image.open(path) as im:
            return im.mode == "L"

    grey = next(i for i, (path, _) in enumerate(test.samples) if is_grey(path))
    x, _ = test[grey]
    assert x.shape == (3, 64, 64) and torch.equal(x[0], x[2])
    assert isinstance(test, TinyImageNet)


@pytest.mark.parametrize("name,max_train,batch,drop_last", [("moons", None, 250, True), ("digits", 300, 128, False)])
def test_in_memory_batches_are_the_dataloaders(name, max_train, batch, drop_last):
    # the training loop's fast path for tensor data sets yields the DataLoader's exact batches
    from torch.utils.data import DataLoader

    from cll import batches

    train, _, _ = load_dataset(name, max_train=max_train)
    fast = batches.in_memory(train, "cpu")
    assert fast is not None and len(fast) == len(train)
    expected = DataLoader(
        train, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(3), drop_last=drop_last
    )
    got = list(fast.epoch(batch, torch.Generator().manual_seed(3), drop_last))
    assert len(got) == len(expected)
    for (x1, y1), (x2, y2) in zip(expected, got):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and y1.dtype == y2.dtype
