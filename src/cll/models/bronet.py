"""BRONet, as github.com/ntuaislab/BRONet builds it (``bronet/models/model.py::BRONet`` with
``backbone_type: bro``; Lai, Huang, Kung, Chen, ICML 2025, arXiv 2505.15174): LiResNet's skeleton
(``cll.models.liresnet.skeleton``: x - 0.5, the 5x5 stride-2 stem, a 4x4 patch neck, residual dense
layers, LLN head, MinMax after every layer) with BRO convolutions as the backbone
(``cll.layers.bro``). ``BRONet-L{depth}W{width}``:

=========== ==================================================================================
input       x - 0.5 (the reference's shift; factor 1)
stem        Conv(3, width, 5, stride 2, padding 2) with bias, orthogonal init, MinMax
backbone    ``depth`` BRO convolutions (rank ``width * rank_ratio``, s = depth^-1/2) with bias and
            centring, each followed by MinMax
neck        4x4 patch conv width -> width (stride 4, no bias), flatten, dense -> ``dense_width``
            with bias, MinMax: Cholesky-orthogonalised, or BRO (the first rows of a block reflector)
dense       ``dense_depth`` residual dense layers dense_width -> dense_width, each + MinMax:
            Cholesky (LiResNet's), or BRO (rank ``dense_width * dense_rank_ratio``)
head        LLN (unit rows) dense_width -> classes, or the run's head
=========== ==================================================================================

Sizes, the reference's benchmark configs (``bronet/configs/benchmark_reproduce``): L12W512 is
``cifar10.yaml`` and ``cifar100.yaml`` (rank ratio 1/2, Cholesky neck, Cholesky dense 2048 x 8),
L6W512 is ``tiny_imagenet.yaml`` (rank ratio 1/8, BRO neck, BRO dense 2048 x 4 of rank ratio 1/8).
Parameters, counted on the reference's builder (tests/test_models.py, HOST_PARAMS): 68,788,234 / 68,972,644
(L12W512, 10 / 100 classes), 75,643,080 (L6W512, 200 classes at 64x64). L2W32 is cll's CPU size of
L12W512's skeleton (dense 256 x 2), the size of ``LiResNet-L2W32``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .. import layers as L
from ..layers.bro import bro_rank
from .liresnet import PATCH, cholesky_dense, cholesky_neck, skeleton
from .net import ARCHS, LipschitzNet, make_head, scaled

KINDS = ("cholesky", "bro")  # the neck's and the dense layers' orthogonalisation


def _neck(kind: str, channels: int, cells: int, dense_width: int) -> list[nn.Module]:
    if kind == "cholesky":
        return cholesky_neck(channels, cells, dense_width)
    return [L.BROPatchConv(channels, channels, PATCH), L.BROLinear(channels * cells, dense_width)]


def _dense(kind: str, dense_width: int, dense_depth: int, rank_ratio: float) -> list[nn.Module]:
    if kind == "cholesky":
        return cholesky_dense(dense_width, dense_depth)
    rank = bro_rank(dense_width, rank_ratio)
    return [L.BROResidualLinear(dense_width, rank, dense_depth) for _ in range(dense_depth)]


def bronet(
    depth: int,
    channels: int,
    num_classes: int,
    in_shape: Sequence[int],
    rank_ratio: float = 0.5,
    neck: str = "cholesky",
    dense: str = "cholesky",
    dense_width: int = 2048,
    dense_depth: int = 8,
    dense_rank_ratio: float = 0.5,
    head: str = "lln",
    mean: Sequence[float] | None = None,
    width: float = 1.0,
) -> LipschitzNet:
    """The network of the module docstring; ``width`` scales ``channels`` and ``dense_width`` (the
    ranks follow from the scaled widths). ``mean`` is accepted and not used: the reference shifts
    every data set by 0.5."""
    if neck not in KINDS or dense not in KINDS:
        raise ValueError(f"BRONet's neck and dense layers are one of {', '.join(KINDS)}, got {neck!r}, {dense!r}")
    channels, dense_width = scaled(channels, width), scaled(dense_width, width)
    rank = bro_rank(channels, rank_ratio)
    return skeleton(
        "BRONet",
        in_shape,
        channels,
        blocks=lambda: [L.BROConv(channels, rank, depth) for _ in range(depth)],
        neck=lambda cells: _neck(neck, channels, cells, dense_width),
        dense=lambda: _dense(dense, dense_width, dense_depth, dense_rank_ratio),
        head=lambda: make_head(head, dense_width, num_classes),
    )


SIZES = {  # depth, width, and the rest of the reference's config
    "L12W512": dict(depth=12, channels=512),
    "L6W512": dict(
        depth=6, channels=512, rank_ratio=0.125, neck="bro", dense="bro", dense_depth=4, dense_rank_ratio=0.125
    ),
    "L2W32": dict(depth=2, channels=32, dense_width=256, dense_depth=2),
}


def _register(name: str, size: dict) -> None:
    ARCHS.register(f"BRONet-{name}")(
        lambda num_classes, in_shape, **kw: bronet(num_classes=num_classes, in_shape=in_shape, **size, **kw)
    )


for _name, _size in SIZES.items():
    _register(_name, _size)
