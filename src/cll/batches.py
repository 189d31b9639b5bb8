"""Training batches of a data set held in memory (moons, digits): gathered by indexing on the
device, in the order a shuffling DataLoader would give (file-backed sets go through a DataLoader)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset


class TensorBatches:
    """A data set held in memory as tensors (moons, digits, or a ``Subset`` of one), copied once to
    ``device`` and batched by indexing: no per-sample ``__getitem__`` and collate, and on a GPU no
    host-to-device copy per batch. ``epoch`` yields exactly the batches of
    ``DataLoader(ds, batch_size, shuffle=True, generator=generator, drop_last=drop_last)`` (the
    shuffled order comes from that very DataLoader, run over the indices)."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], device: torch.device | str):
        self.tensors = tuple(t.to(device) for t in tensors)

    def __len__(self) -> int:
        return len(self.tensors[0])

    def epoch(self, batch_size: int, generator: torch.Generator, drop_last: bool):
        order = DataLoader(
            range(len(self)), batch_size=batch_size, shuffle=True, generator=generator, drop_last=drop_last
        )
        device = self.tensors[0].device
        for idx in order:
            idx = idx.to(device)
            yield tuple(t[idx] for t in self.tensors)


def in_memory(ds: Dataset, device: torch.device | str) -> TensorBatches | None:
    """``TensorBatches`` of ``ds`` if it is a ``TensorDataset`` (or a ``Subset`` of one), else None
    (file-backed sets with transforms go through a DataLoader)."""
    if isinstance(ds, Subset) and isinstance(ds.dataset, TensorDataset):
        idx = torch.as_tensor(list(ds.indices), dtype=torch.long)
        return TensorBatches(tuple(t[idx] for t in ds.dataset.tensors), device)
    if isinstance(ds, TensorDataset):
        return TensorBatches(ds.tensors, device)
    return None
