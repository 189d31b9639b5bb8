"""The peers' model families, built from the layers in ``cll.layers`` (sizes: the papers cited below).

========== =============================================================================================
LipConv-N  SOC LipConvNet (Singla & Feizi, ICML 2021): 5 stages of N/5 SOC convs + HH1; the last
           conv of each stage has stride 2 and doubles the width (32 -> 64 ... 1024), the very last
           is 1x1. Inputs (x - mean) / 0.2507 with CIFAR-10's mean for every data set, as SOC's
           code normalises them, so the body's factor is 1/0.2507.
CPL-*      CPL net (Meunier et al., ICML 2022): zero-pad the channels to w, ``depth`` CPL convs (5
           inner channels, 3x3), sum/4 pooling over 4x4 blocks, ``depth_linear`` dense CPLs (2048
           inner features). Sizes (depth, depth_linear, w): S (20, 7, 45), M (30, 10, 60),
           L (50, 10, 90), XL (70, 15, 120). Mean subtraction only.
SLL-*      SLL net (Araujo et al., ICLR 2023): the same skeleton with SLL layers and the same sizes;
           64x64 inputs (Tiny-ImageNet) are shifted by ImageNet's mean, as SLL's code does.
Sandwich   LBDN "DNN" (Wang & Manchester, ICML 2023): Sandwich convs 64, 64/s2, 128, 128/s2, 256,
           256/s2 (+ 512, 512/s2 for 64x64 inputs), then Sandwich dense 2048, 2048, 1024.
           Mean subtraction only.
========== =============================================================================================

The head is chosen by the run (``head``: the peers' own losses use LLN, CLL an unconstrained
linear layer, as the CLL reference does). ``width`` scales every channel/feature count but the
5 inner channels of CPL/SLL convs (tests and CPU runs use small versions of the same skeletons).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .. import layers as L
from .net import ARCHS, LipschitzNet, make_head, scaled

SOC_STD = 0.2507  # SOC's input standard deviation, the same for every channel
SOC_MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10's: SOC's code subtracts it from every data set
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SLL's code subtracts it from Tiny-ImageNet
FAMILY_SIZES = {"S": (20, 7, 45), "M": (30, 10, 60), "L": (50, 10, 90), "XL": (70, 15, 120)}
INNER_CONV = 5  # CPL's conv_size / SLL's conv_inner_dim
INNER_DENSE = 2048  # CPL's and SLL's n_features / dense_inner_dim


def lipconv(
    blocks: int,
    num_classes: int,
    in_shape: Sequence[int],
    head: str = "linear",
    mean: Sequence[float] | None = None,
    init_channels: int = 32,
    width: float = 1.0,
) -> LipschitzNet:
    """SOC LipConvNet with ``blocks`` convs per stage (LipConv-N has N = 5 * blocks)."""
    init_channels = scaled(init_channels, width)
    if in_shape[1] % 32 or in_shape[2] % 32:
        raise ValueError(f"LipConv nets need inputs whose sides are multiples of 32, got {tuple(in_shape)}")
    layers: list[nn.Module] = []
    channels, planes = in_shape[0], init_channels
    for stage in range(5):
        for b in range(blocks):
            stride = 2 if b == blocks - 1 else 1
            kernel = 1 if (stage == 4 and b == blocks - 1) else 3
            out = planes * stride
            layers += [L.SOC(channels, out, kernel, stride), L.HouseHolder(out)]
            channels = out
        planes = channels
    layers.append(nn.Flatten())
    features = channels * (in_shape[1] // 32) * (in_shape[2] // 32)
    return LipschitzNet(
        nn.Sequential(*layers),
        make_head(head, features, num_classes),
        in_shape,
        mean=SOC_MEAN if in_shape[0] == 3 else mean or [0.0] * in_shape[0],  # (``mean`` for other channel counts)
        std=SOC_STD,
    )


def residual_net(
    conv,
    dense,
    depth: int,
    depth_linear: int,
    channels: int,
    num_classes: int,
    in_shape: Sequence[int],
    head: str = "linear",
    mean: Sequence[float] | None = None,
    inner_conv: int = INNER_CONV,
    inner_dense: int = INNER_DENSE,
) -> LipschitzNet:
    """The CPL/SLL skeleton: pad channels, ``depth`` conv layers ``conv(channels, inner, hw)``,
    4x4 sum/4 pooling, ``depth_linear`` dense layers ``dense(features, inner)``, the head."""
    hw = tuple(in_shape[1:])
    if hw[0] % 4 or hw[1] % 4:
        raise ValueError(f"CPL/SLL nets need inputs whose sides are multiples of 4, got {tuple(in_shape)}")
    layers: list[nn.Module] = [L.PaddingChannels(channels)]
    layers += [conv(channels, inner_conv, hw) for _ in range(depth)]
    layers += [nn.AvgPool2d(4, divisor_override=4), nn.Flatten()]
    features = channels * (hw[0] // 4) * (hw[1] // 4)
    layers += [dense(features, inner_dense) for _ in range(depth_linear)]
    return LipschitzNet(
        nn.Sequential(*layers), make_head(head, features, num_classes), in_shape, mean=mean or [0.0] * in_shape[0]
    )


def residual_family(conv, dense, shift: Sequence[float] | None = None):
    """The builder of a CPL/SLL-style family: ``builder(size, num_classes, in_shape, width, ...)``
    with the depths and widths of ``FAMILY_SIZES[size]`` scaled by ``width``; ``shift``: the mean
    it subtracts from 64x64 (Tiny-ImageNet) inputs instead of the data set's own."""

    def build(size: str, num_classes: int, in_shape: Sequence[int], width: float = 1.0, **kw) -> LipschitzNet:
        depth, depth_linear, channels = FAMILY_SIZES[size]
        if shift is not None and tuple(in_shape) == (3, 64, 64):
            kw["mean"] = shift
        return residual_net(
            conv,
            dense,
            depth,
            depth_linear,
            scaled(channels, width),
            num_classes,
            in_shape,
            inner_dense=scaled(INNER_DENSE, width),
            **kw,
        )

    return build


cpl_net = residual_family(lambda c, inner, hw: L.CPLConv(c, inner, hw), L.CPLLinear)
sll_net = residual_family(lambda c, inner, hw: L.SLLConv(c, inner), L.SLLLinear, shift=IMAGENET_MEAN)


def sandwich_net(
    num_classes: int,
    in_shape: Sequence[int],
    head: str = "linear",
    mean: Sequence[float] | None = None,
    width: float = 1.0,
) -> LipschitzNet:
    """LBDN's DNN: 3 stages of Sandwich convs (w, w/s2) for 32x32 inputs, 4 for 64x64, then dense
    2048, 2048, 1024 (all scaled by ``width``)."""
    side = in_shape[1]
    stages = {32: 3, 64: 4}.get(side)
    if stages is None or in_shape[2] != side:
        raise ValueError(f"the Sandwich net is defined for 32x32 and 64x64 inputs, got {tuple(in_shape)}")
    layers: list[nn.Module] = []
    channels, hw = in_shape[0], side
    for stage in range(stages):
        out = scaled(64 * 2**stage, width)
        layers += [L.SandwichConv(channels, out, 3, (hw, hw)), L.SandwichConv(out, out, 3, (hw, hw), stride=2)]
        channels, hw = out, hw // 2
    layers.append(nn.Flatten())
    features = channels * hw * hw
    for n in (2048, 2048, 1024):
        n = scaled(n, width)
        layers.append(L.SandwichLinear(features, n))
        features = n
    return LipschitzNet(
        nn.Sequential(*layers), make_head(head, features, num_classes), in_shape, mean=mean or [0.0] * in_shape[0]
    )


def _register_lipconv(n: int) -> None:
    ARCHS.register(f"LipConv-{n}")(lambda num_classes, in_shape, **kw: lipconv(n // 5, num_classes, in_shape, **kw))


def _register_family(prefix: str, builder, size: str) -> None:
    ARCHS.register(f"{prefix}-{size}")(lambda num_classes, in_shape, **kw: builder(size, num_classes, in_shape, **kw))


for _n in (5, 10, 15, 20, 25, 30, 40):  # the SOC and CLL scripts use 10, 15, 20 and 40
    _register_lipconv(_n)
for _size in FAMILY_SIZES:
    _register_family("CPL", cpl_net, _size)
    _register_family("SLL", sll_net, _size)
ARCHS.register("Sandwich")(sandwich_net)
