"""Image data sets stored as one file per image in class folders (read lazily, one PIL image per
item): Tiny-ImageNet in its official layout, and CIFAR-10 as JPEG files in ``train/<class>/`` and
``test/<class>/`` (``ClassFolders``). ``cll.data.load_dataset`` builds them."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def fix_hint(top: str) -> str:
    """How to repair a missing file-based data set; ``top`` is its folder directly under the root."""
    return f"; unpack it there, or point data_root (or $CLL_DATA) at the folder that contains {top}/"


class ImageFiles(Dataset):
    """``samples``, a list of (image file, label), read lazily: each item one RGB image (greyscale
    files are converted) of ``size`` x ``size`` through ``transform``."""

    name: str
    size: int
    transform: object
    samples: list[tuple[Path, int]]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        with Image.open(path) as im:
            img = im.convert("RGB")
        if img.size != (self.size, self.size):
            width, height = img.size
            raise DataError(f"dataset {self.name!r}: {path} is {width}x{height}, expected {self.size}x{self.size}")
        return self.transform(img), label


class ClassFolders(ImageFiles):
    """The images of ``folder/<class>/`` for the given ``classes`` (label = position in the list),
    ordered round-robin over the classes (the first image of every class, then the second, ...) so
    that a first-N subset (``max_train``) is balanced. Every image must be ``size`` x ``size``."""

    def __init__(self, name: str, folder: Path, classes: list[str], size: int, transform):
        self.name, self.size, self.transform = name, size, transform
        self.classes = classes
        per_class = []
        for label, cls in enumerate(classes):
            images = folder / cls
            if not images.is_dir():
                raise DataError(f"dataset {name!r}: missing class folder {images}{fix_hint(folder.parent.name)}")
            files = sorted(f for f in os.listdir(images) if f.lower().endswith(IMAGE_SUFFIXES))
            if not files:
                raise DataError(f"dataset {name!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in {images}")
            per_class.append([(images / f, label) for f in files])
        longest = max(len(files) for files in per_class)
        self.samples = [files[i] for i in range(longest) for files in per_class if i < len(files)]
        self.targets = [label for _, label in self.samples]


class TinyImageNet(ImageFiles):
    """Tiny-ImageNet-200 read from the official layout, one JPEG per item (loaded lazily).

    Labels are line indices of ``wnids.txt``. Train images are taken class by class in sorted file
    order; the test split is the official validation set, in the order and with the labels of
    ``val/val_annotations.txt`` (tab-separated: file name, wnid, bounding box).
    """

    def __init__(self, folder: Path, train: bool, transform):
        self.name, self.size, self.transform = "tinyimagenet", 64, transform
        wnids = [w.strip() for w in (folder / "wnids.txt").read_text().splitlines() if w.strip()]
        if len(wnids) != 200 or len(set(wnids)) != 200:
            raise DataError(
                f"dataset 'tinyimagenet': {folder / 'wnids.txt'} lists {len(set(wnids))} distinct "
                "class ids, expected 200"
            )
        self.classes = wnids
        index = {w: i for i, w in enumerate(wnids)}
        self.samples: list[tuple[Path, int]] = []
        if train:
            for wnid in wnids:
                images = folder / "train" / wnid / "images"
                if not images.is_dir():
                    raise DataError(f"dataset 'tinyimagenet': missing class folder {images}{fix_hint(folder.name)}")
                self.samples += [
                    (images / f, index[wnid])
                    for f in sorted(os.listdir(images))
                    if f.lower().endswith((".jpeg", ".jpg"))
                ]
        else:
            images = folder / "val" / "images"
            present = set(os.listdir(images))  # one listdir instead of 10000 stat calls
            for line_no, line in enumerate((folder / "val" / "val_annotations.txt").read_text().splitlines(), 1):
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) < 2 or fields[1] not in index or fields[0] not in present:
                    raise DataError(
                        f"dataset 'tinyimagenet': line {line_no} of {folder / 'val' / 'val_annotations.txt'}"
                        f" names an unknown class or a missing image: {line.strip()!r}"
                    )
                self.samples.append((images / fields[0], index[fields[1]]))
        if not self.samples:
            raise DataError(f"dataset 'tinyimagenet': no {'train' if train else 'val'} images under {folder}")
        self.targets = [label for _, label in self.samples]
