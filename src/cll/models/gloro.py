"""GloRo-family nets, as the CLL reference configures them (docs/recipes.md; Leino, Wang,
Fredrikson, "Globally-Robust Neural Networks", ICML 2021, arXiv 2102.08452). ``C(out, k, s, p)``
is a conv with bias followed by MaxMin; ``F(n)`` a dense layer followed by MaxMin; the head is the
last dense layer. Sizes of the dense layers after Flatten follow from ``in_shape``.

======== ======================================================================================
2C2F     C(16,4,2,1) C(32,4,2,1) F(100)                                   (GloRo's MNIST net)
4C3F     C(32,3,1,1) C(32,3,2,1) C(64,3,1,1) C(64,3,2,1) F(512) F(512)
6C2F     C(32,3,1,1) C(32,3,1,1) C(32,4,2,1) C(64,3,1,1) C(64,3,1,1) C(64,4,2,1) F(512)
8C2F     C(64,3,1,1) C(64,3,1,1) C(64,4,2,0) C(128,3,1,1) C(128,3,1,1) C(128,4,2,0)
         C(256,3,1,1) C(256,4,2,0) F(256)
moons-mlp  F(10) F(20) F(40) F(40) F(20) F(10)  on 2-d inputs
======== ======================================================================================

The activation is MaxMin unless the run asks for another registered one (``activation``:
``clipped_maxmin`` or ``clipped_relu``, the clipped layers of Local-Lip-B, with thresholds
initialised to ``clip_init``: one value, or one per activation layer). ``8C2F`` is the same
network whatever the activation.

Initialisation: Kaiming-normal weights, zero biases (the reference's ``init_weights``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import ACTIVATIONS
from .net import ARCHS, LipschitzNet, make_head, scaled

GLORO_FAMILY = ("2C2F", "4C3F", "6C2F", "8C2F", "moons-mlp")  # the archs built by gloro_net


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        params = getattr(module, "parametrizations", None)  # an LLN head: initialise the free W
        nn.init.kaiming_normal_(params.weight.original if params is not None else module.weight)
        nn.init.zeros_(module.bias)


def gloro_net(
    convs: Sequence[tuple[int, int, int, int]],
    dense: Sequence[int],
    num_classes: int,
    in_shape: Sequence[int],
    head: str = "linear",
    mean: Sequence[float] | None = None,
    width: float = 1.0,
    activation: str = "maxmin",
    clip_init: float | Sequence[float] = 1.0,
) -> LipschitzNet:
    """Conv layers ``(out_channels, kernel, stride, padding)``, then dense widths, then the head;
    the activation after every layer but the head; ``width`` scales the channel and dense sizes.
    ``mean`` is accepted and not used: the GloRo family is trained on raw [0,1] inputs, as in the
    reference."""
    n_act = len(convs) + len(dense)
    inits = list(clip_init) if isinstance(clip_init, Sequence) else [clip_init] * n_act
    if len(inits) != n_act:
        raise ConfigError(f"clip_init: {len(inits)} values for the {n_act} activation layers of this architecture")
    layers: list[nn.Module] = []
    convs = [(scaled(out, width), k, s, p) for out, k, s, p in convs]
    dense = [scaled(n, width) for n in dense]
    x = torch.zeros(1, *in_shape)  # traces the feature shapes: activations hold one threshold per neuron

    def add(layer: nn.Module) -> None:  # a conv/dense layer and its activation
        nonlocal x
        with torch.no_grad():
            x = layer(x)
        init = inits[sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in layers)]
        layers.extend([layer, ACTIVATIONS.get(activation)(tuple(x.shape[1:]), init)])

    for out, k, s, p in convs:
        add(nn.Conv2d(x.shape[1], out, k, stride=s, padding=p))
    if len(in_shape) > 1:
        layers.append(nn.Flatten())
        x = x.flatten(1)
    for n in dense:
        add(nn.Linear(x.shape[1], n))
    model = LipschitzNet(nn.Sequential(*layers), make_head(head, x.shape[1], num_classes), in_shape)
    model.apply(_init)
    return model


@ARCHS.register("2C2F")
def gloro_2c2f(num_classes: int, in_shape: Sequence[int], **kw) -> LipschitzNet:
    return gloro_net([(16, 4, 2, 1), (32, 4, 2, 1)], [100], num_classes, in_shape, **kw)


@ARCHS.register("4C3F")
def gloro_4c3f(num_classes: int, in_shape: Sequence[int], **kw) -> LipschitzNet:
    return gloro_net(
        [(32, 3, 1, 1), (32, 3, 2, 1), (64, 3, 1, 1), (64, 3, 2, 1)], [512, 512], num_classes, in_shape, **kw
    )


@ARCHS.register("6C2F")
def gloro_6c2f(num_classes: int, in_shape: Sequence[int], **kw) -> LipschitzNet:
    return gloro_net(
        [(32, 3, 1, 1), (32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 3, 1, 1), (64, 4, 2, 1)],
        [512],
        num_classes,
        in_shape,
        **kw,
    )


@ARCHS.register("8C2F")
def gloro_8c2f(num_classes: int, in_shape: Sequence[int], **kw) -> LipschitzNet:
    return gloro_net(
        [
            (64, 3, 1, 1),
            (64, 3, 1, 1),
            (64, 4, 2, 0),
            (128, 3, 1, 1),
            (128, 3, 1, 1),
            (128, 4, 2, 0),
            (256, 3, 1, 1),
            (256, 4, 2, 0),
        ],
        [256],
        num_classes,
        in_shape,
        **kw,
    )


@ARCHS.register("moons-mlp")
def moons_mlp(num_classes: int, in_shape: Sequence[int], **kw) -> LipschitzNet:
    return gloro_net([], [10, 20, 40, 40, 20, 10], num_classes, in_shape, **kw)


GLORO_OPTIONS = ("activation", "clip_init")  # keywords only gloro_net takes


def without_gloro_options(arch: str, options: dict) -> dict:
    """``options`` for another family's builder: the GloRo-only keywords dropped where they hold
    gloro_net's own defaults (a run config always carries them), refused where they ask for more."""
    defaults = inspect.signature(gloro_net).parameters
    for key in GLORO_OPTIONS:
        if key in options and options[key] != defaults[key].default:
            raise ConfigError(
                f"{key}: {options[key]!r} applies to the GloRo-family architectures "
                f"({', '.join(GLORO_FAMILY)}); {arch} has its own activations"
            )
    return {k: v for k, v in options.items() if k not in GLORO_OPTIONS}
