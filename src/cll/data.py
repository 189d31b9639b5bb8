"""Data sets for training and certifying Lipschitz classifiers.

Every item is ``(x, y)`` with ``x`` a float32 tensor and ``y`` an integer class index. Image pixels
stay in [0, 1]: there is deliberately no mean/std normalisation, because dividing by a standard
deviation rescales distances in input space and so changes what a certified L2 radius means.

Data sets (``root`` is ``$CLL_DATA`` if set, else ``./data``):

- ``moons``: two interleaving half circles (scikit-learn ``make_moons``) plus uniform noise in a
  disk of radius 0.1; 2000 train / 20000 test points, generated from ``seed``. No files.
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (Alpaydin & Kaynak, UCI 1998),
  fixed stratified split 1437 train / 360 test. No files.
- ``mnist`` (LeCun, Cortes & Burges): ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.
- ``cifar10`` / ``cifar100`` (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images",
  tech. report 2009), the "python version" archives unpacked as ``<root>/cifar-10-batches-py/``
  (``data_batch_1..5``, ``test_batch``, ``batches.meta``) and ``<root>/cifar-100-python/``
  (``train``, ``test``, ``meta``).
- ``tinyimagenet`` (Le & Yang, "Tiny ImageNet Visual Recognition Challenge", 2015):
  ``<root>/tiny-imagenet-200/`` in the official layout (``wnids.txt``, ``train/<wnid>/images/``,
  ``val/images/`` + ``val/val_annotations.txt``); the official val split is our test set.
- ``cifar10-jpg``: CIFAR-10 as image files, ``<root>/cifar10-jpg/{train,test}/<class>/*.jpg`` with
  the ten class folders named as CIFAR-10's classes (``airplane`` ... ``truck``, labels in that
  order); e.g. a lossy JPEG copy, on which a CPU run reads no pickle. Items go round-robin over the
  classes, so the first N of either split (``max_train``, ``max_test``) are balanced.

Nothing is ever downloaded; a missing or malformed data set raises :class:`DataError` with one line
that says what was expected where.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import ConfigError, DataError
from .image_folders import ClassFolders, TinyImageNet, fix_hint


def _transforms():
    """torchvision.transforms, imported on first use: only the file-based image data sets need
    torchvision, and importing it (it pulls in torch._dynamo) costs every process about 2 s."""
    from torchvision import transforms

    return transforms


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set: its class count, the shape of one input, and
    the per-channel training-set mean (the peers' networks subtract it inside the model)."""

    name: str
    num_classes: int
    in_shape: tuple[int, int, int] | tuple[int]  # (C, H, W) for images, (2,) for moons
    mean: tuple[float, ...] | None = None


_INFO = {
    "moons": DatasetInfo("moons", 2, (2,)),
    "digits": DatasetInfo("digits", 10, (1, 8, 8)),
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,)),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465)),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409)),
    "tinyimagenet": DatasetInfo("tinyimagenet", 200, (3, 64, 64), (0.4802, 0.4481, 0.3975)),
    "cifar10-jpg": DatasetInfo("cifar10-jpg", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465)),
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The folder of each file-based data set under the data root (moons and digits are made in memory).
FOLDERS = {
    "mnist": "MNIST",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "tinyimagenet": "tiny-imagenet-200",
    "cifar10-jpg": "cifar10-jpg",
}


def dataset_names() -> list[str]:
    """All data set names accepted by :func:`load_dataset`."""
    return list(_INFO)


def dataset_info(name: str) -> DatasetInfo:
    """Shape and class count of a data set, without touching any file."""
    if name not in _INFO:
        raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(_INFO)}")
    return _INFO[name]


def _augmented(size: int, padding: int):
    """Train-time augmentation of the reference setup: zero-padded random crop, horizontal flip,
    mild colour jitter and a +-2 degree rotation, all on PIL images before ``ToTensor``."""
    T = _transforms()
    return T.Compose(
        [
            T.RandomCrop(size, padding=padding),  # fill=0: zero padding
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25),
            T.RandomRotation(2),
            T.ToTensor(),
        ]
    )


# --------------------------------------------------------------------------------------- moons
def _moons(n: int, rng: np.random.Generator) -> TensorDataset:
    """``sklearn.datasets.make_moons`` without noise, then noise uniform in a disk of radius 0.1.

    Uniform in a disk needs ``r = R * sqrt(u)``: the area within radius r grows like r**2.
    """
    from sklearn.datasets import make_moons

    x, y = make_moons(n, noise=0.0, random_state=int(rng.integers(2**31 - 1)))
    r = 0.1 * np.sqrt(rng.random(n))
    theta = rng.uniform(0.0, 2.0 * math.pi, n)
    x = x + np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))


def _load_moons(seed: int) -> tuple[Dataset, Dataset]:
    # Two independent child streams, so the test set does not change if the train size does.
    train_ss, test_ss = np.random.SeedSequence(seed).spawn(2)
    return _moons(2000, np.random.default_rng(train_ss)), _moons(20000, np.random.default_rng(test_ss))


# -------------------------------------------------------------------------------------- digits
def _load_digits() -> tuple[Dataset, Dataset]:
    """scikit-learn's bundled 8x8 digits; the split is fixed (``random_state=0``), independent of
    the run seed, so that all runs are evaluated on the same 360 test images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 1, 8, 8)  # pixel values are 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=360, stratify=y, random_state=0)

    def tensors(xs: np.ndarray, ys: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.as_tensor(xs, dtype=torch.float32), torch.as_tensor(ys, dtype=torch.int64))

    return tensors(x_tr, y_tr), tensors(x_te, y_te)


# --------------------------------------------------------------------------------------- mnist
def _check_idx(path: Path, magic: int, dims: tuple[int, ...]) -> int:
    """Cheap header check of an IDX file (big-endian magic, then one uint32 per dimension);
    returns the item count. Catches truncated or swapped files before torchvision asserts."""
    with open(path, "rb") as f:
        header = f.read(4 + 4 * (1 + len(dims)))
    values = [int.from_bytes(header[i : i + 4], "big") for i in range(0, len(header), 4)]
    # `and` short-circuits, so a header that is too short never reaches the indexing.
    ok = (
        len(values) == 2 + len(dims)
        and values[0] == magic
        and tuple(values[2:]) == dims
        and path.stat().st_size == len(header) + values[1] * math.prod(dims)
    )
    if not ok:
        raise DataError(
            f"dataset 'mnist': {path} is not a valid IDX file of shape ({', '.join(['N', *map(str, dims)])}) "
            "(truncated or corrupt?); replace it with the original file"
        )
    return values[1]


def _load_mnist(root: Path) -> tuple[Dataset, Dataset]:
    raw = root / FOLDERS["mnist"] / "raw"
    names = [f"{split}-{kind}" for split in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    missing = [n for n in names if not (raw / n).is_file()]
    if missing:
        what = (
            "no MNIST files" if len(missing) == len(names) else f"incomplete MNIST files (missing {', '.join(missing)})"
        )
        raise DataError(
            f"dataset 'mnist': {what} under {raw} (expected the four gunzipped files "
            f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte){fix_hint(FOLDERS['mnist'])}"
        )
    for split in ("train", "t10k"):
        n_images = _check_idx(raw / f"{split}-images-idx3-ubyte", 2051, (28, 28))
        n_labels = _check_idx(raw / f"{split}-labels-idx1-ubyte", 2049, ())
        if n_images != n_labels:
            raise DataError(f"dataset 'mnist': {split} has {n_images} images but {n_labels} labels in {raw}")
    # MNIST has no augmentation in the reference setup; download=False: we never fetch anything.
    from torchvision.datasets import MNIST

    to_tensor = _transforms().ToTensor()
    train = MNIST(str(root), train=True, transform=to_tensor, download=False)
    test = MNIST(str(root), train=False, transform=to_tensor, download=False)
    return train, test


# --------------------------------------------------------------------------------------- CIFAR
class _FilesExistMixin:
    """Replace torchvision's md5 check by "the files exist": our test data are pixel-exact subsets
    of CIFAR whose checksums differ from the official archives. ``train_files`` lets a subset with
    fewer CIFAR-10 batches load."""

    def __init__(self, root: str, train: bool, transform, train_files: list[str]):
        self.train_list = [[f, None] for f in train_files]  # instance attributes shadow the class lists
        self.test_list = [[f, None] for f, _ in type(self).test_list]
        self.meta = {**type(self).meta, "md5": None}  # check_integrity(path, None) == "is a file"
        super().__init__(root, train=train, transform=transform, download=False)


@functools.cache
def _cifar_class(name: str) -> type:
    """torchvision's CIFAR10 or CIFAR100 with the mixin above (built on first use, see _transforms)."""
    from torchvision import datasets

    base = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    return type(f"_{base.__name__}", (_FilesExistMixin, base), {})


def _load_cifar(name: str, root: Path, augment: bool) -> tuple[Dataset, Dataset]:
    if name == "cifar10":
        title, folder = "CIFAR-10", root / FOLDERS[name]
        all_train, others = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch", "batches.meta"]
        expected = "data_batch_1..5, test_batch, batches.meta"
    else:
        title, folder = "CIFAR-100", root / FOLDERS[name]
        all_train, others = ["train"], ["test", "meta"]
        expected = "train, test, meta"
    expected += " from the 'python version' archive"
    train_files = [f for f in all_train if (folder / f).is_file()]
    missing = [f for f in others if not (folder / f).is_file()] + ([] if train_files else all_train)
    if missing:
        nothing = len(missing) == len(others) + len(all_train)
        what = f"no {title} files" if nothing else f"incomplete {title} files (missing {', '.join(missing)})"
        raise DataError(f"dataset {name!r}: {what} under {folder} (expected {expected}){fix_hint(folder.name)}")
    if len(train_files) < len(all_train):
        # Legitimate for subsets (e.g. test data), but a full run should know it trains on less.
        warnings.warn(
            f"dataset {name!r}: only {', '.join(train_files)} found under {folder}; training on this subset",
            stacklevel=3,
        )

    num_classes = _INFO[name].num_classes
    T, cls = _transforms(), _cifar_class(name)
    splits = []
    for train, transform in ((True, _augmented(32, 4) if augment else T.ToTensor()), (False, T.ToTensor())):
        try:
            ds = cls(str(root), train, transform, train_files)
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, RuntimeError) as e:
            reason = " ".join(str(e).split())  # keep the message on one line
            raise DataError(
                f"dataset {name!r}: could not read {folder} ({type(e).__name__}: {reason}); "
                "the files look corrupt, unpack the archive again"
            ) from None
        # Cheap sanity checks that a wrong file (e.g. CIFAR-100 in the CIFAR-10 folder) cannot pass.
        labels = np.asarray(ds.targets)
        if len(labels) != len(ds.data) or labels.size == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise DataError(
                f"dataset {name!r}: labels in {folder} do not match {num_classes} classes "
                f"and {len(ds.data)} images; is this the right archive?"
            )
        splits.append(ds)
    return splits[0], splits[1]


def _load_tinyimagenet(root: Path, augment: bool) -> tuple[Dataset, Dataset]:
    folder = root / FOLDERS["tinyimagenet"]
    needed = ["wnids.txt", "train", "val/images", "val/val_annotations.txt"]
    missing = [n for n in needed if not (folder / n).exists()]
    if missing:
        what = (
            "no Tiny-ImageNet files"
            if len(missing) == len(needed)
            else f"incomplete Tiny-ImageNet files (missing {', '.join(missing)})"
        )
        raise DataError(
            f"dataset 'tinyimagenet': {what} under {folder} (expected wnids.txt, train/<wnid>/images/"
            f"*.JPEG, val/images/*.JPEG and val/val_annotations.txt from tiny-imagenet-200.zip){fix_hint(folder.name)}"
        )
    T = _transforms()
    train = TinyImageNet(folder, True, _augmented(64, 8) if augment else T.ToTensor())
    return train, TinyImageNet(folder, False, T.ToTensor())


def _load_class_folders(name: str, root: Path, augment: bool) -> tuple[Dataset, Dataset]:
    folder = root / FOLDERS[name]
    if not all((folder / split).is_dir() for split in ("train", "test")):
        raise DataError(
            f"dataset {name!r}: no train/ and test/ folders under {folder} (expected "
            f"{{train,test}}/<class>/*.jpg, classes {', '.join(CIFAR10_CLASSES)}){fix_hint(folder.name)}"
        )
    T = _transforms()
    train = ClassFolders(name, folder / "train", CIFAR10_CLASSES, 32, _augmented(32, 4) if augment else T.ToTensor())
    return train, ClassFolders(name, folder / "test", CIFAR10_CLASSES, 32, T.ToTensor())


# ------------------------------------------------------------------------------------ public API
def default_root() -> Path:
    """``$CLL_DATA`` if set, else ``./data`` (relative to the working directory)."""
    return Path(os.environ.get("CLL_DATA") or "./data")


def _root(root: str | os.PathLike | None) -> Path:
    """The data root as an absolute path: ``root``, else :func:`default_root`."""
    return Path(root if root is not None else default_root()).expanduser().absolute()


def data_folder(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """The folder a file-based data set is read from (``root`` as for :func:`load_dataset`); None
    for moons and digits, which are made in memory."""
    return _root(root) / FOLDERS[name] if name in FOLDERS else None


def _first(ds: Dataset, n: int | None, what: str) -> Dataset:
    if n is None:
        return ds
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"{what} must be a positive integer or None, got {n!r}")
    return Subset(ds, range(min(n, len(ds))))


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    augment: bool = True,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Return ``(train, test, info)`` for a data set from :func:`dataset_names`.

    ``augment`` only affects the train split of cifar10/cifar100/tinyimagenet; ``seed`` only the
    generated moons. ``max_train``/``max_test`` keep the first N items (deterministic) for quick runs.
    """
    info = dataset_info(name)
    root = _root(root)
    if name == "moons":
        train, test = _load_moons(seed)
    elif name == "digits":
        train, test = _load_digits()
    elif name == "mnist":
        train, test = _load_mnist(root)
    elif name in ("cifar10", "cifar100"):
        train, test = _load_cifar(name, root, augment)
    elif name == "cifar10-jpg":
        train, test = _load_class_folders(name, root, augment)
    else:
        train, test = _load_tinyimagenet(root, augment)
    return _first(train, max_train, "max_train"), _first(test, max_test, "max_test"), info
