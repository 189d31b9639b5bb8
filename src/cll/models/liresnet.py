"""LiResNet with Cholesky-orthogonalised residual dense layers, as github.com/hukkai/liresnet builds
it (``models/model.py::GloroNet``; Hu et al., NeurIPS 2023, arXiv 2301.12549, and ICLR 2024, arXiv
2310.02513), from the layers of ``cll.layers.liresnet``. ``LiResNet-L{depth}W{width}``:

=========== ==================================================================================
input       x - 0.5 (the reference's shift; factor 1)
stem        Conv(3, width, 5, stride 2, padding 2) with bias, orthogonal init, MinMax
backbone    ``depth`` linear residual blocks x + conv(x; s gamma V) + b (s = depth^-1/2), each
            followed by MinMax
neck        Cholesky 4x4 patch conv width -> width (stride 4, no bias), flatten, Cholesky dense
            -> ``dense_width`` with bias, MinMax
dense       ``dense_depth`` Cholesky residual dense layers dense_width -> dense_width, each + MinMax
head        LLN (unit rows) dense_width -> classes, or the run's head
=========== ==================================================================================

Sizes: L12W512 is the configuration of the reference's CIFAR-10/100 and Tiny-ImageNet configs
(dense 2048 x 8, its fixed values): 82,944,010 / 83,128,420 / 133,664,968 parameters for 10 / 100 /
200 classes, counted on the reference's own builder (tests/test_models.py, HOST_PARAMS). L2W32 is cll's CPU
size of the same skeleton (dense 256 x 2), for tests and the CPU grid. The stem is defined for
32x32 and 64x64 inputs (the reference's ImageNet patchify stem is not built: cll has no ImageNet).

``skeleton`` builds this layout from its parts; BRONet (``cll.models.bronet``) shares it.

The activation is the reference's MinMax (``MaxMinHalves``: channel c sorted with c + n/2, in
place), not cll's adjacent-pair MaxMin, which also permutes the channels and so would make each
block's identity skip a permutation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from .. import layers as L
from .net import ARCHS, LipschitzNet, make_head, scaled

INPUT_SHIFT = 0.5  # the reference subtracts 0.5 from [0, 1] pixels
PATCH = 4  # the neck's patch (and stride)


def check_side(family: str, in_shape: Sequence[int]) -> int:
    """The side of a square 32x32 or 64x64 input, the sizes the stem is defined for."""
    side = in_shape[1]
    if side not in (32, 64) or tuple(in_shape[1:]) != (side, side):
        raise ValueError(f"{family}'s stem is defined for 32x32 and 64x64 inputs, got {tuple(in_shape)}")
    return side


def cholesky_neck(channels: int, cells: int, dense_width: int) -> list[nn.Module]:
    """LiResNet's neck: the Cholesky patch conv and the Cholesky dense map on its ``cells`` positions."""
    return [L.CholeskyPatchConv(channels, channels, PATCH), L.CholeskyLinear(channels * cells, dense_width)]


def cholesky_dense(dense_width: int, dense_depth: int) -> list[nn.Module]:
    """LiResNet's ``dense_depth`` Cholesky residual dense layers."""
    return [L.CholeskyResidualLinear(dense_width, dense_depth) for _ in range(dense_depth)]


def skeleton(
    family: str,
    in_shape: Sequence[int],
    channels: int,
    blocks: Callable[[], list[nn.Module]],
    neck: Callable[[int], list[nn.Module]],
    dense: Callable[[], list[nn.Module]],
    head: Callable[[], nn.Linear],
) -> LipschitzNet:
    """The skeleton LiResNet and BRONet share: x - 0.5, the stem Conv(in, channels, 5, stride 2,
    padding 2) with bias and orthogonal init, then ``blocks()``, ``neck(cells)`` (a patch conv and a
    dense map on the ``cells`` positions it leaves), ``dense()``, each layer of them followed by
    MinMax but the patch conv (followed by the flattening), and the head. The parts are built in
    that order (the reference's), as their builders are called here. ``family`` names the net in the
    error for an input the stem is not defined for."""
    check_side(family, in_shape)
    stem = nn.Conv2d(in_shape[0], channels, 5, stride=2, padding=2)
    nn.init.orthogonal_(stem.weight)
    body: list[nn.Module] = [stem, L.MaxMinHalves()]
    for block in blocks():
        body += [block, L.MaxMinHalves()]
    cells = (in_shape[1] // 2 // PATCH) ** 2  # positions after the stem (stride 2) and the patch conv
    patch, linear = neck(cells)
    body += [patch, nn.Flatten(), linear, L.MaxMinHalves()]
    for layer in dense():
        body += [layer, L.MaxMinHalves()]
    net = LipschitzNet(nn.Sequential(*body), head(), in_shape, mean=[INPUT_SHIFT] * in_shape[0])
    # the references' sub_lipschitz: power iteration without gradient, the last application with it
    net.power.last_step_gradient = True
    return net


def liresnet(
    depth: int,
    channels: int,
    num_classes: int,
    in_shape: Sequence[int],
    dense_width: int = 2048,
    dense_depth: int = 8,
    head: str = "lln",
    mean: Sequence[float] | None = None,
    width: float = 1.0,
) -> LipschitzNet:
    """The skeleton of the module docstring; ``width`` scales ``channels`` and ``dense_width``.
    ``mean`` is accepted and not used: the reference shifts every data set by 0.5."""
    channels, dense_width = scaled(channels, width), scaled(dense_width, width)
    return skeleton(
        "LiResNet",
        in_shape,
        channels,
        blocks=lambda: [L.LiResBlock(channels, depth) for _ in range(depth)],
        neck=lambda cells: cholesky_neck(channels, cells, dense_width),
        dense=lambda: cholesky_dense(dense_width, dense_depth),
        head=lambda: make_head(head, dense_width, num_classes),
    )


SIZES = {"L12W512": (12, 512, 2048, 8), "L2W32": (2, 32, 256, 2)}  # depth, width, dense width, dense depth


def _register(name: str, depth: int, channels: int, dense_width: int, dense_depth: int) -> None:
    ARCHS.register(f"LiResNet-{name}")(
        lambda num_classes, in_shape, **kw: liresnet(
            depth, channels, num_classes, in_shape, dense_width, dense_depth, **kw
        )
    )


for _name, _size in SIZES.items():
    _register(_name, *_size)
